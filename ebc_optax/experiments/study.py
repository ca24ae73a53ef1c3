"""The study: does EBC train better than what a user would pick instead?
(``ebc-optax study``; its spike suite is :mod:`~ebc_optax.experiments.spikes`).

Protocol (all runs with fixed seeds, resumable: a run whose ``summary.json``
exists is read back, not rerun, so the study can be finished in sittings; runs
are ordered seed by seed, so a partial study covers every cell):

1. **tune** — Adam and schedule-free AdamW, no clipping, seed 0, at
   ``TUNE_LRS`` (×0.5 … ×2 of 2e-3), the grid extended by √2 steps past an
   edge that holds the best LR; the best final val loss is each base's LR ×1.
   Prodigy is LR-free: its LR ×1 is its own default, 1.
2. **arms** (:func:`peer_arms`) — at LR ×1, ×2, ×4, ×8 of each arm's base,
   3 seeds at ×1 and ×8 (the cells that decide), 2 at ×2 and ×4: Adam,
   global-norm clipping before Adam, Prodigy, schedule-free AdamW; EBC at
   the seeds' recipe around each base and the exact Fisher clip (δ = 0.01)
   around Adam and Prodigy; and the knob-free candidates
   (:func:`candidate_arms`: the relative radius, around every base).
3. **report** — ``study.md``: the tuning, per arm and LR the val loss with
   the paired difference to Adam ×1 (same seed), telemetry, bar (a) — no
   worse than tuned Adam at ×1 and within 1% of it at every LR (of its own
   ×1 on an LR-free base) — and the noise floor; ``study.csv`` (one row per
   run), ``study.json``; figures: final val loss vs LR scale per arm, loss
   curves at ×2 and ×4.

``legacy=True`` adds the first study's arms (Adam only: the seeds' fixed δ,
the exact Fisher clip at three δ, the trust-region radius from three starts,
the energy clip) and their knob sweeps, with their tables.

Sizes (``STUDY_BASE``): a 2-block, d 64 char GPT on Shakespeare, batch 16 ×
seq 64, 1500 steps (~40 s per run on one CPU core; the final val loss is on
64 fixed batches, 65k characters of the validation split), evaluated also
around the spike suite's burst window (:data:`EVAL_STEPS`) so that every
run without a burst is a reference for the suite. The CPU config (3 blocks,
d 128, batch 16 × 128) takes ~6.5 minutes per 2000-step run.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Sequence
from typing import Any

from ebc_optax.experiments import config as config_lib
from ebc_optax.experiments import study_design as design
from ebc_optax.experiments import study_report
from ebc_optax.experiments import study_stats as stats
from ebc_optax.experiments import sweeps


def _base_config(base: dict[str, Any], steps: int | None) -> config_lib.Config:
  cfg = config_lib.from_dict(base)
  if steps is not None:
    cfg = sweeps.with_values(cfg, train={"steps": steps})
  return cfg


def _scale_name(scale: float) -> str:
  return f"x{scale:g}"


def tune_arms(cfg: config_lib.Config, lrs: Sequence[float] = design.TUNE_LRS,
              base: str = "adam") -> list[sweeps.Arm]:
  """Stage 1: ``base`` (no clipping, seed 0) at each LR of ``lrs``."""
  prefix = "tune_lr" if base == "adam" else f"tune_{base}_lr"
  return [sweeps.Arm(f"{prefix}{lr:g}",
                     sweeps.with_values(cfg, optim={"optimizer": base, "lr": lr,
                                                    "lr_scale": 1.0},
                                        train={"seed": 0}),
                     {"arm": "tune", "base": base, "lr_scale": 1.0, "seed": 0})
          for lr in lrs]


def seeds_for(scale: float, seeds: Sequence[int] | None) -> tuple[int, ...]:
  """The seeds of a cell: 3 at the deciding scales (×1, ×8), else 2; or
  ``seeds`` for every cell when given."""
  if seeds is not None:
    return tuple(seeds)
  return design.SEEDS if scale in design.DECISIVE_SCALES else design.OTHER_SEEDS


def run_name(arm: str, scale: float, seed: int, burst: str = "none") -> str:
  """``<arm>_x<scale>_s<seed>``, plus ``_<burst>`` for a burst run."""
  name = f"{arm}_{_scale_name(scale)}_s{seed}"
  return name if burst == "none" else f"{name}_{burst}"


def study_arms(cfg: config_lib.Config, lrs: dict[str, float] | float,
               arms: Sequence[design.StudyArm], seeds: Sequence[int] | None = None,
               burst: str = "none") -> list[sweeps.Arm]:
  """The runs of ``arms``: every LR scale and seed (``seeds_for``), at LR
  ``lrs[arm.base] × scale`` (a float: the same LR ×1 for every base)."""
  out = []
  for arm in arms:
    lr = lrs if isinstance(lrs, (int, float)) else lrs[arm.base]
    for scale in arm.lr_scales:
      for seed in seeds_for(scale, seeds):
        sections = {k: dict(v) for k, v in arm.overrides.items()}
        sections.setdefault("optim", {}).update(lr=lr, lr_scale=scale)
        sections.setdefault("train", {}).update(seed=seed, burst=burst)
        out.append(sweeps.Arm(
            run_name(arm.name, scale, seed, burst),
            sweeps.with_values(cfg, **sections),
            {"arm": arm.name, "base": arm.base, "lr_scale": scale,
             "seed": seed, "knob": arm.knob, "burst": burst}))
  return out


def run_study(out_dir: pathlib.Path, *, base: dict[str, Any] | None = None,
              steps: int | None = None, seeds: Sequence[int] | None = None,
              tune_lrs: Sequence[float] = design.TUNE_LRS,
              lr_scales: Sequence[float] | None = None,
              only: Sequence[str] | None = None,
              legacy: bool = False,
              progress: bool = True, workers: int = 1,
              tune_extensions: int | None = None) -> dict[str, Any]:
  """Runs (or resumes) the study and writes its tables and figures.

  Args:
    out_dir: the study directory (one sub-directory per run).
    base: the base config mapping (default :data:`design.STUDY_BASE`).
    steps: override ``train.steps`` of every run.
    seeds: seeds of every stage-2 cell (default: 3 at ×1 and ×8, 2 else).
    tune_lrs: the LRs of stage 1.
    lr_scales: override the LR scales of every stage-2 arm.
    only: run only the arms with these names (any of :func:`design.all_arms`); the
      tables then cover the tuning runs and these arms (rerun without
      ``only`` to tabulate every arm: finished runs are read back).
    legacy: also run the first study's arms (:func:`design.legacy_arms`, Adam only)
      with their knob sweeps.
    progress: show progress bars.
    workers: train this many runs at once, one CPU core each.
    tune_extensions: grid steps the tuning may add past an edge that holds
      the best LR (default :data:`design.MAX_EXTENSIONS`).

  Returns:
    ``{"lrs": {base: LR ×1}, "baseline": ..., "rows": [...], "summary": [...]}``.
  """
  cfg = _base_config(base or design.STUDY_BASE, steps)
  out_dir.mkdir(parents=True, exist_ok=True)
  known = design.all_arms()
  if only is not None:
    unknown = sorted(set(only) - set(known) - {"fisher_pi"})
    if unknown:
      raise ValueError(f"unknown study arm(s) {unknown}; known: {sorted(known)}.")
    arms = [known[n] for n in only if n in known]
  else:
    arms = design.peer_arms() + (design.legacy_arms() if legacy else [])
  if lr_scales is not None:
    arms = [dataclasses.replace(a, lr_scales=tuple(lr_scales)) for a in arms]
  lrs, tune_rows = tune(cfg, out_dir, {a.base for a in arms}, tune_lrs,
                        progress, workers, tune_extensions)
  # Seed by seed: a partial study already covers every cell.
  runs = sorted(study_arms(cfg, lrs, arms, seeds), key=lambda a: a.labels["seed"])
  rows = sweeps.run_arms(runs, out_dir, progress=progress, workers=workers)
  fisher_rows = [r for r in rows if str(r.get("arm", "")).startswith("fisher_d")]
  if fisher_rows and (legacy or (only is not None and "fisher_pi" in only)):
    rows += sweeps.run_arms(
        study_arms(cfg, lrs, [design.fisher_pi_arm(stats.best_fisher_delta(fisher_rows))],
                   seeds), out_dir, progress=progress, workers=workers)
  if legacy:
    rows += sweeps.run_arms(study_arms(cfg, lrs, design.knob_arms(), (0,)), out_dir,
                            progress=progress, workers=workers)
  return study_report.report(out_dir, lrs, tune_rows, rows)


def tune(cfg: config_lib.Config, out_dir: pathlib.Path, bases: set[str],
         tune_lrs: Sequence[float], progress: bool = True, workers: int = 1,
         extensions: int = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
  """Stage 1: LR ×1 of every base in ``bases`` (and Adam's, the baseline):
  tuned for Adam and schedule-free AdamW, the default for LR-free bases.

  A best LR at either end of the grid is not tuned: the grid is then
  extended by factors of √2 past that end (at most ``extensions`` times,
  default :data:`design.MAX_EXTENSIONS`) until the best LR has a worse neighbour on
  both sides.
  """
  extensions = design.MAX_EXTENSIONS if extensions is None else extensions
  lrs, rows = dict(design.LR_FREE_LR), []
  for b in design.TUNED_BASES:
    if b != "adam" and b not in bases:
      continue
    grid = sorted(tune_lrs)
    for attempt in range(extensions + 1):
      tuned = sweeps.run_arms(tune_arms(cfg, grid, b), out_dir,
                              progress=progress, workers=workers)
      best = stats.best_lr(tuned)
      if len(grid) < 2 or grid[0] < best < grid[-1] or attempt == extensions:
        break
      grid.append(float(f"{grid[-1] * math.sqrt(2):.2g}") if best == grid[-1]
                  else float(f"{grid[0] / math.sqrt(2):.2g}"))
      grid.sort()
    lrs[b] = best
    rows += tuned
  return lrs, rows
