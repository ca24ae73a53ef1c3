"""EBC at its defaults against the base optimizer alone, on a zoo of models.

For every model of ``ebc_optax.experiments.zoo.MODELS`` (Hugging Face Flax
GPT-2 and llama, ``eqx.nn``, linen auto-named / named / ``nn.scan``, NNX
``nnx.List`` / ``nnx.scan``, the repository's GPT; width 32, 2 blocks, vocab
48, sequence 32, batch 8) and every base (``adam`` 2e-3, ``adam_warmup`` 100
steps, ``prodigy``), :func:`~ebc_optax.experiments.zoo.compare` trains the base
alone and ``ebc_optax.wrap(base, ...)`` from one init on identical batches of
a Markov language, and the script prints a markdown table: refused steps
(``c = 0`` with ``S > 0``, or the batch refused by ``wrap``'s gradient-norm
check), cut steps (``0 < c < 0.999``), final train loss (mean
of the last 20 steps) EBC / base and their ratio, the range of the probe's
``ρ``, and the compiles of each arm's step (one program per arm serves every
base and the burst run of a model). Then the burst check: the windows of
steps ``[start, start + length)`` of both arms are uniformly random tokens,
and the table counts how many of them EBC refused. Last, the layers EBC
budgets for each model (``ebc_optax.layers.budget_layers``).

Run (≈6 min for the full grid on the 2-core VM, most of it compiling):

  python benchmarks/zoo.py
  python benchmarks/zoo.py --models repo_gpt,linen_scan --bases adam --steps 300
  python benchmarks/zoo.py --seeds 3 --out outputs/zoo.md
"""

from __future__ import annotations

import argparse
import math
import pathlib
import platform
import sys
import time
import warnings

import jax

from ebc_optax.experiments import zoo


def _names(text: str, choices: dict) -> list[str]:
  names = [n for n in text.split(",") if n]
  unknown = [n for n in names if n not in choices]
  if unknown:
    raise SystemExit(f"unknown {unknown}; choose from {list(choices)}.")
  return names


def _range(lo: float, hi: float) -> str:
  return "—" if math.isnan(lo) else f"{lo:.2f} – {hi:.2f}"


def results_row(r: dict) -> str:
  """One markdown row of a :func:`zoo.compare` result."""
  return (f"| {r['model']} | {r['base']} | {r['seed']} | {r['steps']} | "
          f"{r['refused']} | {r['cut']} | {r['ebc_final']:.4f} / "
          f"{r['base_final']:.4f} ({r['loss_ratio']:.4f}) | "
          f"{_range(r['rho_min'], r['rho_max'])} | "
          f"{r['compiles_base']} / {r['compiles_ebc']} | {r['wall_s']:.1f} |")


def burst_row(r: dict) -> str:
  """One markdown row of a burst run."""
  start, length = r["burst"]
  outside = r["refused"] - r["refused_in_burst"]
  return (f"| {r['model']} | {r['base']} | {r['seed']} | {start}–"
          f"{start + length - 1} | {r['refused_in_burst']} / {length} | "
          f"{outside} | {r['loss_ratio']:.4f} |")


RESULTS_HEADER = (
    "| model | base | seed | steps | refused | cut | final loss EBC / base "
    "(ratio) | ρ range | compiles base / EBC | wall s |\n"
    "|---|---|---|---|---|---|---|---|---|---|")
BURST_HEADER = (
    "| model | base | seed | burst steps | refused in burst | refused outside "
    "| final loss ratio |\n|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default=",".join(zoo.MODELS),
                      help="comma-separated keys of zoo.MODELS")
  parser.add_argument("--bases", default=",".join(zoo.BASES),
                      help="comma-separated keys of zoo.BASES")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--seeds", type=int, default=1,
                      help="runs seeds 0 .. seeds-1 (init and data)")
  parser.add_argument("--burst-start", type=int, default=150)
  parser.add_argument("--burst-length", type=int, default=10,
                      help="0 skips the burst check")
  parser.add_argument("--burst-base", default="adam")
  parser.add_argument("--out", type=pathlib.Path, default=None,
                      help="also write the markdown here")
  args = parser.parse_args(argv)
  models = _names(args.models, zoo.MODELS)
  bases = _names(args.bases, zoo.BASES)
  _names(args.burst_base, zoo.BASES)
  burst = (args.burst_start, args.burst_length) if args.burst_length else None
  if burst is not None and args.burst_start + args.burst_length > args.steps:
    raise SystemExit("the burst must end before --steps.")

  lines = [
      f"# EBC defaults vs the base alone, {args.steps} steps "
      f"({platform.machine()}, {jax.devices()[0].platform}, jax "
      f"{jax.__version__})", "", RESULTS_HEADER]
  bursts, layers = [BURST_HEADER], []
  start = time.perf_counter()
  for model in models:
    layers.append(f"| {model} | {zoo.build(model).stacked} | "
                  f"{', '.join(zoo.budgeted_layers(model))} |")
    for seed in range(args.seeds):
      for base in bases:
        lines.append(results_row(zoo.compare(model, base, args.steps, seed)))
        print(lines[-1], flush=True)
      if burst is not None:
        bursts.append(burst_row(zoo.compare(model, args.burst_base, args.steps,
                                            seed, burst=burst)))
        print(bursts[-1], flush=True)
  lines += ["", "Burst of uniformly random tokens (both arms):", ""]
  lines += bursts if burst is not None else ["(skipped)"]
  lines += ["", "Budgeted layers (`ebc_optax.layers.budget_layers`):", "",
            "| model | stacked | budgeted layers |", "|---|---|---|"] + layers
  lines += ["", f"Total wall time {time.perf_counter() - start:.0f} s."]
  text = "\n".join(lines) + "\n"
  print("\n" + text)
  if args.out is not None:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
  return text


if __name__ == "__main__":
  # transformers warns that its Flax classes are deprecated.
  warnings.filterwarnings("ignore", category=FutureWarning)
  main(sys.argv[1:])
