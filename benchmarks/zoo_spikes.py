"""Spike guards on models built by other libraries: random-token bursts.

For the Hugging Face Flax llama layout and the equinox decoder of
:mod:`ebc_optax.experiments.zoo` (``--models``), Adam alone, EBC's default
around it, skip-step on loss and gradient norm (6σ / 128 steps, skipped
values kept in the statistics or left out) and ZClip are trained 400 steps
(``--steps``) from one init on one batch stream, without a burst and with a
10-step and a 50-step random-token burst from step 200
(:data:`~ebc_optax.experiments.zoo.ZOO_BURSTS`), for seeds 0, 1, 2. It
prints, per model, kind and guard (mean ± sd over seeds), the peak and the
final excess of the smoothed loss over the same guard's run without the
burst, the peak over Adam's, the share of burst steps skipped and the
steps skipped on the clean run (:func:`~ebc_optax.experiments.zoo.
spike_compare`); ``--json`` also writes the per-seed rows.

Run:  python benchmarks/zoo_spikes.py [--models hf_llama equinox --seeds 0 1 2
      --guards adam ebc_default ...]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform

import jax

from ebc_optax.experiments import zoo


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", nargs="*", default=["hf_llama", "equinox"])
  parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
  parser.add_argument("--guards", nargs="*", default=list(zoo.GUARDS),
                      help="arms (adam for the vs-Adam column)")
  parser.add_argument("--steps", type=int, default=400)
  parser.add_argument("--json", default=None, help="write the per-seed rows here")
  args = parser.parse_args()
  print(f"# {platform.processor() or platform.machine()}, jax {jax.__version__}; "
        f"{args.steps} steps, seeds {args.seeds}, bursts {zoo.ZOO_BURSTS}")
  print("| model | kind | guard | seeds | peak excess | vs Adam | final excess "
        "| burst steps skipped | clean steps skipped |")
  print("|---|---|---|---|---|---|---|---|---|")
  rows = []
  for model in args.models:
    found = zoo.spike_compare(model, args.guards, seeds=args.seeds,
                              steps=args.steps)
    rows += found
    for t in zoo.spike_table(found):
      vs = "—" if t["vs_adam"] is None else f"{t['vs_adam']:.1%}"
      print(f"| {t['model']} | {t['kind']} | {t['guard']} | {t['seeds']} "
            f"| {t['peak']:+.3f} ± {t['peak_sd']:.3f} | {vs} "
            f"| {t['final']:+.3f} ± {t['final_sd']:.3f} "
            f"| {t['skipped_in_burst']:.0%} | {t['clean_skipped']} |", flush=True)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
  main()
