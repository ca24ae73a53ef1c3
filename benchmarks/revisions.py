"""Step-time and compile-time ratios of EBC's default, revision against revision.

A reorganisation that promises "same behaviour, same cost" needs the cost
measured side by side, not read off two benchmark runs made weeks apart on a
shared machine. This script exports each ``--revisions`` entry's ``ebc_optax/``
with ``git archive`` and, in interleaved rounds, runs one child process per
revision with that copy first on ``PYTHONPATH``. Each child builds the harness
GPT at the sizes of ``configs/shakespeare_char_cpu.json`` (3 blocks, d 128,
batch 16, seq 128, vocab 65) and measures, in one process:

  * the compile-time ratio: ``jit(step).lower(...).compile()`` of
    adam + ``ellipsotope_budget_clip`` (the default) over adam alone, each
    compiled ``--compiles`` times from a fresh function after
    ``jax.clear_caches()``, arms alternating;
  * the step-time ratio: the two compiled steps timed in interleaved blocks
    of ``--block-steps`` steps.

It prints one row per revision: the median and quartiles over the children's
ratios. Only the front door (``ebc_optax.ellipsotope_budget_clip``) and the
harness's ``init_gpt`` / ``next_token_loss`` are used, names every revision
since 0.1 has.

Run:  python benchmarks/revisions.py --revisions 96db581 da94842 HEAD --rounds 5
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
  """Measure one revision (the ``ebc_optax`` found first on the path)."""
  import jax
  import jax.numpy as jnp
  import optax

  import ebc_optax
  from ebc_optax.experiments import model as model_lib
  from ebc_optax.experiments import optim as optim_lib

  cfg = json.loads(pathlib.Path(args.config).read_text())
  m, t = cfg["model"], cfg["train"]
  apply_fn, params = model_lib.init_gpt(
      jax.random.PRNGKey(0), args.vocab, num_blocks=m["num_blocks"],
      d_embed=m["d_embed"], num_heads=m["num_heads"], seq_len=m["seq_len"],
      positions=m.get("positions", "rope"))
  tokens = jax.random.randint(jax.random.PRNGKey(1),
                              (t["batch_size"], m["seq_len"] + 1), 0, args.vocab)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def loss(p):
    logp = jax.nn.log_softmax(apply_fn(p, inputs))
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))

  def optimizer(ebc: bool):
    adam = optax.adam(2e-3)
    return optax.chain(adam, ebc_optax.ellipsotope_budget_clip(
        apply_fn, loss_fn=optim_lib.next_token_loss)) if ebc else adam

  def compile_step(ebc: bool):
    tx = optimizer(ebc)

    def step(p, s):
      grads = jax.grad(loss)(p)
      updates, s = tx.update(grads, s, p, batch=inputs)
      return optax.apply_updates(p, updates), s

    state = tx.init(params)
    jax.clear_caches()
    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(params, state).compile()
    return time.perf_counter() - t0, compiled, (params, state)

  compile_s = {False: [], True: []}
  for _ in range(args.compiles):
    for ebc in (False, True):
      compile_s[ebc].append(compile_step(ebc)[0])
  arms = {ebc: compile_step(ebc)[1:] for ebc in (False, True)}
  carry = {}
  for ebc, (fn, c) in arms.items():
    for _ in range(args.block_steps):  # warm up
      c = fn(*c)
    carry[ebc] = jax.block_until_ready(c)
  step_s = {False: [], True: []}
  for _ in range(args.blocks):
    for ebc, (fn, _) in arms.items():
      c = carry[ebc]
      t0 = time.perf_counter()
      for _ in range(args.block_steps):
        c = fn(*c)
      carry[ebc] = jax.block_until_ready(c)
      step_s[ebc].append((time.perf_counter() - t0) / args.block_steps)
  med = statistics.median
  print(json.dumps({
      "module": ebc_optax.__file__,
      "compile_ratio": med(compile_s[True]) / med(compile_s[False]),
      "compile_s_adam": med(compile_s[False]),
      "compile_s_ebc": med(compile_s[True]),
      "step_ratio": med(step_s[True]) / med(step_s[False]),
      "step_ms_adam": 1e3 * med(step_s[False]),
  }))


def export(rev: str, root: pathlib.Path,
           paths: tuple[str, ...] = ("ebc_optax",)) -> pathlib.Path:
  """``paths`` of ``rev`` (``git archive``) under ``root/<rev>``; returns that
  folder."""
  dest = root / rev.replace("/", "_")
  dest.mkdir(parents=True)
  archive = subprocess.run(["git", "archive", rev, *paths], cwd=REPO,
                           check=True, capture_output=True).stdout
  with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
    if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4
      tar.extractall(dest, filter="data")
    else:
      tar.extractall(dest)
  return dest


def quartiles(xs: list[float]) -> tuple[float, float, float]:
  if len(xs) < 2:
    return xs[0], xs[0], xs[0]
  q = statistics.quantiles(xs, n=4)
  return q[0], statistics.median(xs), q[2]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--revisions", nargs="+", default=["HEAD"],
                      help="git revisions to compare (default: HEAD)")
  parser.add_argument("--rounds", type=int, default=5,
                      help="interleaved rounds, one child per revision each")
  parser.add_argument("--compiles", type=int, default=2,
                      help="compiles of each arm per child")
  parser.add_argument("--blocks", type=int, default=5,
                      help="timed blocks of each arm per child")
  parser.add_argument("--block-steps", type=int, default=40,
                      help="steps per timed block (a multiple of the cadences)")
  parser.add_argument("--config", default=str(REPO / "configs" / "shakespeare_char_cpu.json"))
  parser.add_argument("--vocab", type=int, default=65)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    return child(args)
  for name in ("rounds", "compiles", "blocks", "block_steps"):
    if getattr(args, name) < 1:
      parser.error(f"--{name.replace('_', '-')} must be >= 1")

  print(f"# machine: {platform.machine()}, {os.cpu_count()} CPUs; "
        f"{args.rounds} rounds x {len(args.revisions)} revisions, "
        f"{args.compiles} compiles and {args.blocks} blocks of "
        f"{args.block_steps} steps per arm per child")
  results = {rev: [] for rev in args.revisions}
  with tempfile.TemporaryDirectory() as tmp:
    roots = {rev: export(rev, pathlib.Path(tmp)) for rev in args.revisions}
    flags = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
             ("compiles", "blocks", "block_steps", "config", "vocab")]
    for r in range(args.rounds):
      order = args.revisions[r % len(args.revisions):] + args.revisions[
          :r % len(args.revisions)]  # rotate who goes first
      for rev in order:
        env = dict(os.environ, PYTHONPATH=str(roots[rev]))
        out = subprocess.run(
            [sys.executable, __file__, "--child", *flags], env=env,
            check=True, capture_output=True, text=True).stdout
        res = json.loads(out.strip().splitlines()[-1])
        if not res["module"].startswith(str(roots[rev])):
          raise SystemExit(f"{rev}: imported {res['module']}, not the export")
        results[rev].append(res)
        print(f"# round {r} {rev}: compile {res['compile_ratio']:.2f} "
              f"step {res['step_ratio']:.3f}", flush=True)
  print("revision,compile_ratio_median,p25,p75,compile_s_adam,compile_s_ebc,"
        "step_ratio_median,p25,p75,adam_step_ms")
  for rev, rows in results.items():
    c25, c50, c75 = quartiles([x["compile_ratio"] for x in rows])
    s25, s50, s75 = quartiles([x["step_ratio"] for x in rows])
    med = lambda k: statistics.median(x[k] for x in rows)  # noqa: E731
    print(f"{rev},{c50:.2f},{c25:.2f},{c75:.2f},{med('compile_s_adam'):.2f},"
          f"{med('compile_s_ebc'):.2f},{s50:.3f},{s25:.3f},{s75:.3f},"
          f"{med('step_ms_adam'):.2f}")


if __name__ == "__main__":
  main()
