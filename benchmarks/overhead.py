"""EBC overhead on the CPU GPT config, every mode, measured side by side.

Prints, for the harness GPT at the sizes of ``configs/shakespeare_char_cpu.json``
(3 blocks, d 128, 4 heads, seq 128, batch 16, vocab 65):

  * per mode, the median step-time ratio (adam + EBC) / (adam alone), every arm
    a jitted train step called once per step and timed in interleaved blocks in
    one process (quartiles of the per-round paired ratios alongside);
  * peak-memory ratio (XLA's buffer assignment of the compiled step:
    ``memory_analysis().peak_memory_in_bytes``), compile-time ratio, number of
    compilations after all the timed steps (must be 1), and the size of EBC's
    own state (float elements beyond adam's; must be O(layers), no
    parameter-sized buffer);
  * the cost of one β probe (one layer's JVP) relative to one forward pass,
    on the same rows and on the default probe rows (a quarter of the batch);
  * how the overhead grows with depth (``--depths``, default 2 4 8 12 blocks)
    for the default mode and the exact Fisher clip on a 1/8 probe sub-batch,
    with and without the trust-region radius.

Run:  python benchmarks/overhead.py [--rounds 5 --block-steps 40 --depths 2 4 8 12]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ebc_optax
from ebc_optax import advanced
from ebc_optax import layers
from ebc_optax.experiments import model as model_lib
from ebc_optax.experiments import optim as optim_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
TARGET_KL = 0.05

# Every mode of the transform; kwargs of ellipsotope_budget_clip.
MODES = {
    "default (relative radius; l1, bound, probes on B/4)": {},
    "default, full-batch probes": {"probe_batch_size": None},
    "l1, fisher": {"kl": "fisher"},
    "l2, bound": {"aggregate": "l2"},
    "fd sensitivities": {"sensitivity": "fd"},
    "exact, bound, every step, B/8": {"aggregate": "exact",
                                      "probe_batch_size": 0.125},
    "exact, fisher, every step, B/8": {"aggregate": "exact", "kl": "fisher",
                                       "probe_batch_size": 0.125},
    "exact, fisher, every 4th step, B/8": {
        "aggregate": "exact", "kl": "fisher", "exact_every": 4,
        "probe_batch_size": 0.125},
    "exact, fisher, trust-region radius, B/8": {
        "aggregate": "exact", "kl": "fisher", "probe_batch_size": 0.125,
        "controller": "trust_region"},
    "exact, fisher, trust-region radius, every 4th step, B/8": {
        "aggregate": "exact", "kl": "fisher", "exact_every": 4,
        "probe_batch_size": 0.125, "controller": "trust_region"},
    "beta + probe every step, B/4": {"update_every": 1, "probe_every": 1},
    "relative radius, cut back (overshoot='scale')": {"overshoot": "scale"},
    "relative radius, exact fisher every 4th step, B/8": {
        "controller": "relative", "aggregate": "exact", "kl": "fisher",
        "exact_every": 4, "probe_batch_size": 0.125},
    "seeds' recipe": dict(ebc_optax.SEEDS_RECIPE),
}
DEPTH_MODES = ("default (relative radius; l1, bound, probes on B/4)",
               "exact, fisher, every step, B/8",
               "exact, fisher, trust-region radius, B/8")


def timed(fn, *args, repeats):
  out = fn(*args)
  jax.block_until_ready(out)
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / repeats


def float_elements(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)
             if jnp.issubdtype(x.dtype, jnp.floating))


class Problem:
  """The GPT, one fixed batch and the train step for any optimizer."""

  def __init__(self, cfg: dict, blocks: int, vocab: int):
    m, t = cfg["model"], cfg["train"]
    self.blocks = blocks
    self.seq, self.batch_size = m["seq_len"], t["batch_size"]
    self.apply_fn, self.params = model_lib.init_gpt(
        jax.random.PRNGKey(0), vocab, num_blocks=blocks, d_embed=m["d_embed"],
        num_heads=m["num_heads"], seq_len=m["seq_len"],
        positions=m.get("positions", "rope"))
    tokens = jax.random.randint(jax.random.PRNGKey(1),
                                (self.batch_size, self.seq + 1), 0, vocab)
    self.inputs, self.targets = tokens[:, :-1], tokens[:, 1:]

  def loss(self, params):
    logp = jax.nn.log_softmax(self.apply_fn(params, self.inputs))
    return -jnp.mean(jnp.take_along_axis(logp, self.targets[..., None], -1))

  def optimizer(self, mode: dict | None) -> optax.GradientTransformation:
    adam = optax.adam(2e-3)
    if mode is None:
      return adam
    if mode.get("controller", "relative") != "relative":
      mode = {"target_kl": TARGET_KL, **mode}  # the relative radius has none
    return optax.chain(adam, ebc_optax.ellipsotope_budget_clip(
        self.apply_fn, loss_fn=optim_lib.next_token_loss, **mode))

  def step_fn(self, tx):
    def step(params, state):  # one jitted call per step, as a trainer does
      grads = jax.grad(self.loss)(params)
      updates, state = tx.update(grads, state, params, batch=self.inputs)
      return optax.apply_updates(params, updates), state
    return jax.jit(step)


def measure_arms(problem: Problem, arms: dict[str, dict | None], rounds: int,
                 block_steps: int) -> dict[str, dict]:
  """Compile, warm up and time every arm in interleaved blocks."""
  out = {}
  for name, mode in arms.items():
    tx = problem.optimizer(mode)
    step = problem.step_fn(tx)
    state = tx.init(problem.params)
    t0 = time.perf_counter()
    compiled = step.lower(problem.params, state).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    carry = jax.block_until_ready(step(problem.params, state))
    for _ in range(block_steps):  # warm up
      carry = step(*carry)
    jax.block_until_ready(carry)
    out[name] = {"step": step, "carry": carry, "times": [],
                 "compile_s": compile_s,
                 "peak_bytes": getattr(mem, "peak_memory_in_bytes", 0) or (
                     mem.temp_size_in_bytes + mem.argument_size_in_bytes
                     + mem.output_size_in_bytes - mem.alias_size_in_bytes),
                 "state_floats": float_elements(state)}
  for _ in range(rounds):
    for name, arm in out.items():  # interleaved: one block of each arm
      carry = arm["carry"]
      t0 = time.perf_counter()
      for _ in range(block_steps):
        carry = arm["step"](*carry)
      jax.block_until_ready(carry)
      arm["times"].append((time.perf_counter() - t0) / block_steps)
      arm["carry"] = carry
  for arm in out.values():
    arm["compiles"] = arm["step"]._cache_size()
  return out


def ratios(arms: dict[str, dict], base: str = "adam") -> dict[str, dict]:
  b = arms[base]
  res = {}
  for name, arm in arms.items():
    paired = [t / tb for t, tb in zip(arm["times"], b["times"])]
    q = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
    res[name] = {
        "step_ms": 1e3 * statistics.median(arm["times"]),
        "ratio": statistics.median(arm["times"]) / statistics.median(b["times"]),
        "p25": q[0], "p75": q[-1],
        "memory_ratio": arm["peak_bytes"] / b["peak_bytes"],
        "compile_ratio": arm["compile_s"] / b["compile_s"],
        "compiles": arm["compiles"],
        "ebc_state_floats": arm["state_floats"] - b["state_floats"],
    }
  return res


def probe_costs(problem: Problem, rounds: int) -> list[tuple[str, float, float]]:
  """(layer, JVP/forward on the same rows, JVP on B/4 rows / full forward)."""
  params, inputs = problem.params, problem.inputs
  quarter = inputs[:max(1, -(-inputs.shape[0] // 4))]
  part = layers.partition_layers(params)
  leaves, treedef = jax.tree.flatten(params)
  forward = jax.jit(problem.apply_fn)
  rows = []
  for layer, idx in zip(part.labels, part.leaf_indices):
    direction = [jnp.ones_like(leaves[i]) for i in idx]
    probe = jax.jit(lambda lv, d, b, idx=idx: advanced.directional_logit_change(
        problem.apply_fn, lv, treedef, idx, d, b))
    same, sub = [], []
    for _ in range(rounds):
      t_fwd = timed(forward, params, inputs, repeats=10)
      same.append(timed(probe, leaves, direction, inputs, repeats=10) / t_fwd)
      sub.append(timed(probe, leaves, direction, quarter, repeats=10) / t_fwd)
    rows.append((layer, statistics.median(same), statistics.median(sub)))
  return rows


def modes_and_probes(cfg: dict, blocks: int, args: argparse.Namespace) -> None:
  problem = Problem(cfg, blocks, args.vocab)
  chosen = args.modes or list(MODES)
  unknown = sorted(set(chosen) - set(MODES))
  if unknown:
    raise SystemExit(f"unknown --modes {unknown}; modes: {list(MODES)}")
  arms = {"adam": None, **{name: MODES[name] for name in chosen}}
  res = ratios(measure_arms(problem, arms, args.rounds, args.block_steps))
  num_layers = len(layers.budget_layers(problem.params))
  m = cfg["model"]
  print(f"# model: {args.config}: {blocks} blocks, d {m['d_embed']}, "
        f"{m['num_heads']} heads, seq {problem.seq}, batch {problem.batch_size}, "
        f"vocab {args.vocab}, {model_lib.count_params(problem.params):,} params, "
        f"{num_layers} budgeted layers; {args.rounds} interleaved rounds of "
        f"{args.block_steps} steps")
  print("arm,median_step_ms,ratio_vs_adam,ratio_p25,ratio_p75,peak_memory_ratio,"
        "compile_time_ratio,compiles,ebc_state_floats")
  for name, r in res.items():
    print(f"{name},{r['step_ms']:.2f},{r['ratio']:.3f},{r['p25']:.3f},"
          f"{r['p75']:.3f},{r['memory_ratio']:.3f},{r['compile_ratio']:.2f},"
          f"{r['compiles']},{r['ebc_state_floats']}")

  probes = probe_costs(problem, args.rounds)
  print("layer,beta_probe_vs_forward_same_rows,beta_probe_on_B/4_vs_forward")
  for layer, same, sub in probes:
    print(f"{layer},{same:.2f},{sub:.2f}")
  print(f"mean,{statistics.mean(p[1] for p in probes):.2f},"
        f"{statistics.mean(p[2] for p in probes):.2f}")


def depth_sweep(cfg: dict, args: argparse.Namespace) -> None:
  if args.depths:
    print(f"# depth sweep: {args.depth_rounds} interleaved rounds of "
          f"{args.block_steps} steps")
    print("blocks,budgeted_layers," + ",".join(
        f"ratio[{name}],p25,p75" for name in DEPTH_MODES)
          + ",ebc_state_floats[default]")
  for depth in args.depths:
    problem = Problem(cfg, depth, args.vocab)
    arms = {"adam": None, **{name: MODES[name] for name in DEPTH_MODES}}
    r = ratios(measure_arms(problem, arms, args.depth_rounds, args.block_steps))
    print(f"{depth},{len(layers.budget_layers(problem.params))}," + ",".join(
        f"{r[name]['ratio']:.3f},{r[name]['p25']:.3f},{r[name]['p75']:.3f}"
        for name in DEPTH_MODES)
          + f",{r[DEPTH_MODES[0]]['ebc_state_floats']}", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(REPO / "configs" / "shakespeare_char_cpu.json"))
  parser.add_argument("--vocab", type=int, default=65)
  parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
  parser.add_argument("--block-steps", type=int, default=40,
                      help="steps per timed block (a multiple of the cadences)")
  parser.add_argument("--depths", type=int, nargs="*", default=[2, 4, 8, 12])
  parser.add_argument("--depth-rounds", type=int, default=3)
  parser.add_argument("--depth-only", action="store_true",
                      help="skip the per-mode table and the β-probe costs")
  parser.add_argument("--modes", nargs="*", default=None,
                      help="time only these modes (names as printed; default all)")
  args = parser.parse_args()
  cfg = json.loads(pathlib.Path(args.config).read_text())
  blocks = cfg["model"]["num_blocks"]

  print(f"# machine: {platform.machine()} {platform.processor() or ''}, "
        f"{jax.device_count()} x {jax.devices()[0].platform}, jax {jax.__version__}")
  if not args.depth_only:
    modes_and_probes(cfg, blocks, args)
  depth_sweep(cfg, args)


if __name__ == "__main__":
  main()
