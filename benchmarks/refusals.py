"""What keeping the base's state on a refused step costs: time and memory.

``ebc_optax.wrap`` with ``skip_refused=True`` (the default) selects, leaf by
leaf, between the base's old and new state after EBC has judged the step, so
both are live at once; its gradient-norm check adds one reduction. This
prints, on the harness GPT of ``configs/shakespeare_char_cpu.json`` at 3 and
32 blocks (``--depths``), side by side in one process (interleaved timed
blocks; median and quartiles of the per-round paired ratios):

  * ``adam`` — the base alone;
  * ``wrap, skip_refused=False, no gradient check`` — EBC around Adam as it was
    before refused batches were kept out of the base;
  * ``wrap (default)`` — ``skip_refused=True`` and the gradient-norm check;

the step-time ratio of each to Adam and of the default to the old wrap, and
the peak-memory ratio (XLA's buffer assignment of the compiled step,
``memory_analysis``), which counts the two live base states.

Run:  python benchmarks/refusals.py [--depths 3 32 --rounds 5 --block-steps 20]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys

import jax
import optax

import ebc_optax
from ebc_optax.experiments import optim as optim_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import overhead  # noqa: E402  (the same GPT, batch and interleaved timing)

ARMS = {
    "adam": None,
    "wrap, skip_refused=False, no gradient check": {
        "skip_refused": False, "grad_norm_multiple": None},
    "wrap (default)": {},
}


class WrapProblem(overhead.Problem):
  """The overhead benchmark's GPT with ``ebc_optax.wrap`` arms."""

  def optimizer(self, mode):
    adam = optax.adam(2e-3)
    if mode is None:
      return adam
    return ebc_optax.wrap(adam, self.apply_fn,
                          loss_fn=optim_lib.next_token_loss, **mode)

  def step_fn(self, tx):
    takes_loss = isinstance(tx.init(self.params), ebc_optax.WrapState)

    def step(params, state):  # the wrap arms get the batch's loss, as advised
      loss, grads = jax.value_and_grad(self.loss)(params)
      extra = {"loss": loss} if takes_loss else {}
      updates, state = tx.update(grads, state, params, batch=self.inputs, **extra)
      return optax.apply_updates(params, updates), state
    return jax.jit(step)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(
      overhead.REPO / "configs" / "shakespeare_char_cpu.json"))
  parser.add_argument("--vocab", type=int, default=65)
  parser.add_argument("--depths", type=int, nargs="*", default=[3, 32])
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--block-steps", type=int, default=20,
                      help="steps per timed block (a multiple of the cadence, 20)")
  args = parser.parse_args()
  cfg = json.loads(pathlib.Path(args.config).read_text())
  print(f"# {platform.processor() or platform.machine()}, jax {jax.__version__}, "
        f"{args.rounds} interleaved rounds of {args.block_steps} steps")
  print("blocks,arm,median_step_ms,ratio_vs_adam,p25,p75,"
        "ratio_vs_old_wrap,peak_memory_vs_adam,peak_memory_vs_old_wrap")
  old = "wrap, skip_refused=False, no gradient check"
  for depth in args.depths:
    problem = WrapProblem(cfg, depth, args.vocab)
    arms = overhead.measure_arms(problem, ARMS, args.rounds, args.block_steps)
    vs_adam = overhead.ratios(arms, "adam")
    vs_old = overhead.ratios(arms, old)
    for name in ARMS:
      r, o = vs_adam[name], vs_old[name]
      print(f"{depth},{name},{r['step_ms']:.2f},{r['ratio']:.3f},{r['p25']:.3f},"
            f"{r['p75']:.3f},{o['ratio']:.3f},{r['memory_ratio']:.3f},"
            f"{o['memory_ratio']:.3f}", flush=True)


if __name__ == "__main__":
  main()
