"""EBC at depth: program size, compile time, step time and memory, 2 to 64 blocks.

For the harness GPT at a small width (d 32, 2 heads, seq 32, batch 8, vocab
65), unrolled (``nnx.List`` of blocks, a Python loop) and scanned
(``scan_layers=True``: stacked blocks under ``nnx.scan``, EBC with
``stacked=("blocks",)``), per EBC mode (defaults; the exact Fisher clip on a
1/8 probe batch; the same with the trust-region radius), relative to
``optax.adam`` alone on the same model, all in one process:

  * ``program``: characters of the lowered StableHLO of the jitted train step;
  * ``compile``: lowering + XLA compile time;
  * ``peak_mem``: XLA's peak buffer bytes of the compiled step;
  * ``step`` (``--time-depths`` only, at ``--time-width`` 128, the CPU
    config's width): mean step time over whole cadence
    windows of one sweep interval (``full_sweep_every="auto"``: 200 steps up
    to 8 layers, 800 at 32) — the round-robin refreshes, probes and the full
    β sweep amortised as in training — with quartiles of the per-round
    paired ratios; ``sweep_step``: the full-sweep step alone (the first step
    of each window) over adam's median step;
  * ``--kinds-depths``: each kind of step of that cadence (plain,
    round-robin refresh + probe, sweep + probe) at the CPU config's 2,048
    tokens per step, timed in adjacent (Adam, EBC) pairs, and the window mean
    they make;
  * ``--compile-parts``: what each piece of EBC's step costs XLA to compile,
    over Adam's whole step (the compile-time floor of an unrolled model).

And, per depth (unrolled), the β-refresh kernels on the default probe rows
(B/4), over one forward pass on the full batch: ``per_layer_jvp`` (the old
refresh: a JVP in one layer's leaves, mean over the first, middle and last
block), ``masked_jvp`` (one JVP over all budgeted leaves with the tangent
masked to one layer — the other one-program design), ``linearize_1`` /
``linearize_2`` (``jax.linearize`` once, then the linear map on 1 / 2 masked
layers: the refresh EBC runs) and ``sweep`` (linearize, then every layer).

Run:  python benchmarks/depth.py            # ≈10 min on the 2-core VM
      python benchmarks/depth.py --unrolled-max 64 --rounds 3   # the full table, ≈40 min
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import ebc_optax
from ebc_optax import advanced
from ebc_optax import layers as layers_lib
from ebc_optax.experiments import model as model_lib
from ebc_optax.experiments import optim as optim_lib

VOCAB, D, HEADS, SEQ, BATCH = 65, 32, 2, 32, 8
MODES = {
    "default": {},
    "exact_fisher": {"aggregate": "exact", "kl": "fisher",
                     "probe_batch_size": 0.125},
    "trust_region": {"aggregate": "exact", "kl": "fisher",
                     "probe_batch_size": 0.125, "controller": "trust_region"},
}


class Problem:
  def __init__(self, blocks: int, scanned: bool, width: int = D,
               batch: int = BATCH, seq: int = SEQ, heads: int = HEADS):
    self.scanned = scanned
    self.fns = model_lib.functional(model_lib.GPT(
        VOCAB, num_blocks=blocks, d_embed=width, num_heads=heads, seq_len=seq,
        scan_layers=scanned, rngs=nnx.Rngs(0)))
    self.params = self.fns.params
    tokens = jax.random.randint(jax.random.PRNGKey(1), (batch, seq + 1), 0, VOCAB)
    self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]
    self.stacked = ("blocks",) if scanned else None

  def loss(self, params):
    logp = jax.nn.log_softmax(self.fns.apply_fn(params, self.inputs))
    return -jnp.mean(jnp.take_along_axis(logp, self.targets[..., None], -1))

  def optimizer(self, mode):
    adam = optax.adam(2e-3)
    if mode is None:
      return adam
    if mode.get("controller", "relative") != "relative":
      mode = {"target_kl": 0.05, **mode}  # the relative radius has no target
    return optax.chain(adam, ebc_optax.ellipsotope_budget_clip(
        self.fns.apply_fn, loss_fn=optim_lib.next_token_loss,
        stacked=self.stacked, **mode))

  def step_fn(self, tx):
    def step(params, state):
      grads = jax.grad(self.loss)(params)
      updates, state = tx.update(grads, state, params, batch=self.inputs)
      return optax.apply_updates(params, updates), state
    return jax.jit(step)


def build(problem: Problem, mode) -> dict:
  tx = problem.optimizer(mode)
  step = problem.step_fn(tx)
  state = tx.init(problem.params)
  t0 = time.perf_counter()
  lowered = step.lower(problem.params, state)
  text = lowered.as_text()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  return {"step": compiled, "carry": (problem.params, state), "chars": len(text),
          "compile_s": compile_s,
          "peak": getattr(mem, "peak_memory_in_bytes", 0) or mem.temp_size_in_bytes,
          "means": [], "sweeps": []}


def time_window(arm: dict, window: int) -> None:
  """One cadence window, each step timed on its own."""
  carry, times = arm["carry"], []
  for _ in range(window):
    t0 = time.perf_counter()
    carry = jax.block_until_ready(arm["step"](*carry))
    times.append(time.perf_counter() - t0)
  arm["carry"] = carry
  arm["means"].append(statistics.mean(times))
  arm["sweeps"].append(times[0])  # a sweep step after the warm-up window
  arm.setdefault("medians", []).append(statistics.median(times))


def arms_table(depth: int, scanned: bool, rounds: int, timed: bool,
               width: int) -> list[str]:
  problem = Problem(depth, scanned, width)
  arms = {"adam": build(problem, None)}
  arms.update({name: build(problem, mode) for name, mode in MODES.items()})
  if timed:
    window = ebc_optax.cadence.sweep_interval("auto", len(ebc_optax.layers.budget_layers(
        problem.params, stacked=problem.stacked)))
    for arm in arms.values():  # warm-up window: the next one starts on a sweep
      time_window(arm, window)
      arm["means"], arm["sweeps"], arm["medians"] = [], [], []
    for _ in range(rounds):
      for arm in arms.values():  # interleaved
        time_window(arm, window)
  base = arms["adam"]
  rows = []
  for name in MODES:
    a = arms[name]
    row = (f"{depth},{width},{'scanned' if scanned else 'unrolled'},{name},"
           f"{a['chars'] / base['chars']:.2f},{a['compile_s'] / base['compile_s']:.2f},"
           f"{a['peak'] / base['peak']:.3f}")
    if timed:
      paired = [x / y for x, y in zip(a["means"], base["means"])]
      q = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
      ratio = statistics.median(a["means"]) / statistics.median(base["means"])
      sweep = statistics.median(a["sweeps"]) / statistics.median(base["medians"])
      row += f",{ratio:.3f},{q[0]:.3f},{q[-1]:.3f},{sweep:.2f}"
    else:
      row += ",,,,"
    rows.append(row + f",{1e3 * base['compile_s']:.0f},{base['chars']}")
  return rows


def at_step(state, step: int):
  """``state`` with EBC's step counter set to ``step`` (selects the cadence
  branch the next update takes: plain, round-robin + probe, or sweep)."""
  return jax.tree.map(
      lambda x: x._replace(ebc_step=jnp.asarray(step, jnp.int32))
      if isinstance(x, ebc_optax.advanced.BudgetClipState) else x,
      state, is_leaf=lambda x: isinstance(x, ebc_optax.advanced.BudgetClipState))


def kind_steps(num_layers: int) -> tuple[dict[str, int], dict[str, int]]:
  """Counter values that select each kind of step of the default cadence,
  and how many of each one sweep interval holds (update_every = probe_every
  = 20, the sweep every ``cadence.sweep_interval("auto", L)`` steps: 200 up
  to 8 layers, 800 at 32; :func:`ebc_optax.cadence.kinds_in_interval`)."""
  kinds = ebc_optax.cadence.kinds_in_interval(
      ebc_optax.cadence.sweep_interval("auto", num_layers), update_every=20,
      probe_every=20)
  return ({k: first for k, (first, _) in kinds.items()},
          {k: count for k, (_, count) in kinds.items()})


def _one_step(arm: dict, counter: int | None) -> float:
  params, state = arm["carry"]
  if counter is not None:
    state = at_step(state, counter)
  t0 = time.perf_counter()
  arm["carry"] = jax.block_until_ready(arm["step"](params, state))
  return time.perf_counter() - t0


def step_kinds_table(depth: int, scanned: bool, width: int, batch: int,
                     seq: int, rounds: int, reps: int) -> list[str]:
  """Each kind of step of the default cadence over Adam's step, timed in
  adjacent pairs (an Adam step, then an EBC step of that kind; the order
  alternates), so the machine's drift cancels in each pair's ratio. Per
  kind: the median of the paired ratios (``reps`` pairs per round for the
  plain step, a third as many for the others); the window mean weights the
  kinds as one sweep interval holds them, with the quartiles of the
  per-round window means."""
  problem = Problem(depth, scanned, width, batch, seq, heads=4)
  arms = {"adam": build(problem, None), "default": build(problem, {})}
  layers = len(ebc_optax.layers.budget_layers(problem.params, stacked=problem.stacked))
  steps, counts = kind_steps(layers)
  for kind, k in steps.items():  # warm-up
    _one_step(arms["adam"], None), _one_step(arms["default"], k)
  ratios = {(r, kind): [] for r in range(rounds) for kind in steps}
  adam_times = []
  for r in range(rounds):
    for kind, k in steps.items():
      for i in range(reps if kind == "plain" else max(3, reps // 3)):
        if i % 2:
          t_e = _one_step(arms["default"], k)
          t_a = _one_step(arms["adam"], None)
        else:
          t_a = _one_step(arms["adam"], None)
          t_e = _one_step(arms["default"], k)
        ratios[(r, kind)].append(t_e / t_a)
        adam_times.append(t_a)
  total = sum(counts.values())
  kinds = {kind: statistics.median(
      [x for r in range(rounds) for x in ratios[(r, kind)]]) for kind in steps}
  plain_q = statistics.quantiles(
      [x for r in range(rounds) for x in ratios[(r, "plain")]], n=4)
  window = sum(counts[k] * kinds[k] for k in steps) / total
  per_round = [sum(counts[k] * statistics.median(ratios[(r, k)]) for k in steps)
               / total for r in range(rounds)]
  q = statistics.quantiles(per_round, n=4) if rounds > 1 else per_round * 3
  return [f"{depth},{width},{batch}x{seq},{'scanned' if scanned else 'unrolled'},"
          f"{layers},{steps['sweep+probe'] // 2},"
          f"{1e3 * statistics.median(adam_times):.1f},{kinds['plain']:.3f},"
          f"{plain_q[0]:.3f},{plain_q[-1]:.3f},{kinds['refresh+probe']:.3f},"
          f"{kinds['sweep+probe']:.3f},{window:.3f},{q[0]:.3f},{q[-1]:.3f}"]


def timed(fn, *args, repeats=5):
  jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / repeats


def refresh_costs(depth: int, rounds: int) -> str:
  """β-refresh kernels on B/4 rows over one full-batch forward (unrolled)."""
  problem = Problem(depth, scanned=False)
  params, apply_fn = problem.params, problem.fns.apply_fn
  rows = problem.inputs[:max(1, BATCH // 4)]
  part = layers_lib.partition_layers(params)
  leaves, treedef = jax.tree.flatten(params)
  updates = [jnp.ones_like(x) for x in leaves]
  num_layers = len(part.labels)
  sub_idx = part.budgeted_leaves
  weights = lambda layer: jnp.where(jnp.arange(num_layers) == layer, 1.0, 0.0)

  def per_layer(lv, b, layer):
    idx = part.leaf_indices[layer]
    return advanced.directional_logit_change(
        apply_fn, lv, treedef, idx, [updates[i] for i in idx], b)

  def masked(lv, b, layer):
    f = advanced.logits_of(apply_fn, lv, treedef, sub_idx, b)
    return jax.jvp(f, ([lv[i] for i in sub_idx],),
                   (advanced.masked_direction(updates, part, weights(layer)),))[1]

  def linearized(lv, b, count):
    change = advanced.layer_change_fn(apply_fn, lv, treedef, part, b)

    def body(j, acc):
      return acc + jnp.sum(jnp.square(change(
          advanced.masked_direction(updates, part, weights(j)), 1.0)[1]))
    return jax.lax.fori_loop(0, count, body, jnp.zeros([]))

  forward = jax.jit(apply_fn)
  layers = sorted({0, num_layers // 2, num_layers - 1})
  kernels = {
      "per_layer_jvp": [jax.jit(lambda lv, b, l=l: per_layer(lv, b, l)) for l in layers],
      "masked_jvp": [jax.jit(lambda lv, b, l=l: masked(lv, b, l)) for l in layers],
      "linearize_1": [jax.jit(lambda lv, b: linearized(lv, b, 1))],
      "linearize_2": [jax.jit(lambda lv, b: linearized(lv, b, 2))],
      "sweep": [jax.jit(lambda lv, b: linearized(lv, b, num_layers))],
  }
  out = {k: [] for k in kernels}
  for _ in range(rounds):
    t_fwd = timed(forward, params, problem.inputs)
    for name, fns in kernels.items():
      out[name].append(statistics.mean(timed(f, leaves, rows) for f in fns) / t_fwd)
  return f"{depth}," + ",".join(f"{statistics.median(v):.2f}" for v in out.values())


def compile_parts(depth: int, rounds: int) -> str:
  """Compile time of each piece of EBC's default step, over Adam's step
  (unrolled, d 32, B/4 probe rows; min over ``rounds`` fresh compiles)."""
  problem = Problem(depth, scanned=False)
  params, apply_fn = problem.params, problem.fns.apply_fn
  rows = problem.inputs[::4]
  part = layers_lib.partition_layers(params)
  leaves, treedef = jax.tree.flatten(params)
  num_layers, idx = len(part.labels), part.budgeted_leaves

  def on_sub(lv):
    return advanced.logits_of(apply_fn, lv, treedef, idx, rows)

  def mask(upd, n):
    return advanced.masked_direction(
        upd, part, jnp.where(jnp.arange(num_layers) == n, 1.0, 0.0))

  def adam(lv, upd, n):
    del upd, n
    p = jax.tree.unflatten(treedef, lv)
    tx = optax.adam(1e-3)
    u, _ = tx.update(jax.grad(problem.loss)(p), tx.init(p), p)
    return optax.apply_updates(p, u)

  def forward(lv, upd, n):
    return apply_fn(jax.tree.unflatten(treedef, lv), rows)

  def probe(lv, upd, n):  # the probe's two forwards, one lax.map
    return advanced.measure_applied_change(
        apply_fn, jax.tree.unflatten(treedef, lv),
        jax.tree.unflatten(treedef, upd), rows)

  def jvp(lv, upd, n):
    return jax.jvp(on_sub(lv), ([lv[i] for i in idx],), ([upd[i] for i in idx],))

  def masked_jvp(lv, upd, n):
    return jax.jvp(on_sub(lv), ([lv[i] for i in idx],), (mask(upd, n),))

  def refresh(lv, upd, n):  # what a β refresh compiles: linearize, loop, cond
    def run():
      change = advanced.layer_change_fn(apply_fn, lv, treedef, part, rows)
      return jax.lax.fori_loop(0, n, lambda j, a: a + jnp.sum(
          jnp.square(change(mask(upd, j), 1.0)[1])), 0.0)
    return jax.lax.cond(n > 0, run, lambda: 0.0)

  pieces = {"adam_step": adam, "forward": forward, "probe": probe, "jvp": jvp,
            "masked_jvp": masked_jvp, "refresh": refresh}
  secs = {name: [] for name in list(pieces) + ["ebc_step"]}
  for _ in range(rounds):
    for name, fn in pieces.items():
      t0 = time.perf_counter()
      jax.jit(lambda a, b, c, fn=fn: fn(a, b, c)).lower(leaves, leaves, 2).compile()
      secs[name].append(time.perf_counter() - t0)
    secs["ebc_step"].append(build(problem, {})["compile_s"])
  adam_s = min(secs["adam_step"])
  return f"{depth},{1e3 * adam_s:.0f}," + ",".join(
      f"{min(v) / adam_s:.2f}" for k, v in secs.items() if k != "adam_step")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--depths", type=int, nargs="*", default=[2, 4, 8, 16, 32, 64])
  parser.add_argument("--unrolled-max", type=int, default=16,
                      help="largest unrolled depth (XLA compiles an unrolled "
                           "64-block step for minutes per arm; 64 for the full table)")
  parser.add_argument("--time-depths", type=int, nargs="*", default=[3, 32],
                      help="depths whose step times are measured (at --time-width)")
  parser.add_argument("--time-width", type=int, default=128,
                      help="d_embed of the timed rows (the CPU config's width: "
                           "at d 32 per-op dispatch, not compute, dominates a step)")
  parser.add_argument("--layouts", nargs="*", default=["unrolled", "scanned"])
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--refresh-depths", type=int, nargs="*", default=[8, 32])
  parser.add_argument("--kinds-depths", type=int, nargs="*", default=[],
                      help="depths whose default-cadence step kinds are timed at "
                           "--kinds-batch x --kinds-seq tokens (default none)")
  parser.add_argument("--kinds-batch", type=int, default=16)
  parser.add_argument("--kinds-seq", type=int, default=128,
                      help="with --kinds-batch: the CPU config's 2,048 tokens per step")
  parser.add_argument("--kinds-reps", type=int, default=30,
                      help="adjacent (Adam, EBC) pairs per round for the plain "
                           "step; a third as many for the other kinds")
  parser.add_argument("--compile-parts", type=int, nargs="*", default=[],
                      help="depths (unrolled) whose compile time is split into "
                           "EBC's pieces (default none)")
  args = parser.parse_args()
  print(f"# machine: {platform.machine()} {platform.processor() or ''}, "
        f"{jax.device_count()} x {jax.devices()[0].platform}, jax {jax.__version__}; "
        f"GPT d {D}, {HEADS} heads, seq {SEQ}, batch {BATCH}, vocab {VOCAB}; "
        f"{args.rounds} interleaved rounds of one sweep interval "
        f"(200 steps up to 8 layers, 200·⌈L/8⌉ beyond)")
  print("blocks,d_embed,layout,mode,program_vs_adam,compile_vs_adam,peak_mem_vs_adam,"
        "step_vs_adam,p25,p75,sweep_step_vs_adam_step,adam_compile_ms,adam_program_chars")
  runs = [(d, D, False) for d in args.depths] + [
      (d, args.time_width, True) for d in args.time_depths]
  for depth, width, timed_row in runs:
    for layout in args.layouts:
      if layout == "unrolled" and depth > args.unrolled_max:
        continue
      for row in arms_table(depth, layout == "scanned", args.rounds, timed_row,
                            width):
        print(row, flush=True)
  if args.kinds_depths:
    print(f"# default cadence by step kind, over adam's step: median of paired "
          f"ratios, {args.kinds_reps} pairs per round for the plain step, "
          f"{max(3, args.kinds_reps // 3)} for the others, {args.rounds} rounds")
    print("blocks,d_embed,tokens,layout,layers,sweep_every,adam_step_ms,plain,"
          "plain_p25,plain_p75,refresh+probe,sweep+probe,window_mean,p25,p75")
    for depth in args.kinds_depths:
      for layout in args.layouts:
        if layout == "unrolled" and depth > args.unrolled_max:
          continue
        for row in step_kinds_table(depth, layout == "scanned", args.time_width,
                                    args.kinds_batch, args.kinds_seq,
                                    args.rounds, args.kinds_reps):
          print(row, flush=True)
  if args.compile_parts:
    print("# compile time of each piece over adam's step (unrolled, d 32, "
          f"B/4 rows; min of {args.rounds} compiles)")
    print("blocks,adam_compile_ms,forward,probe,jvp,masked_jvp,refresh,ebc_step")
    for depth in args.compile_parts:
      print(compile_parts(depth, args.rounds), flush=True)
  if args.refresh_depths:
    print("# beta refresh on B/4 rows, over one full-batch forward (unrolled)")
    print("blocks,per_layer_jvp,masked_jvp,linearize_1,linearize_2,sweep")
    for depth in args.refresh_depths:
      print(refresh_costs(depth, args.rounds), flush=True)


if __name__ == "__main__":
  main()
