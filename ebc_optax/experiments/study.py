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
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

import ebc_optax
from ebc_optax.experiments import bursts
from ebc_optax.experiments import config as config_lib
from ebc_optax.experiments import plots
from ebc_optax.experiments import sweeps

# A mid-training burst for the spike suite (ebc_optax.experiments.spikes): its
# window, and the clean evaluations around it. Every run of the study is
# evaluated at these steps, so a run without a burst is the reference of the
# same arm and seed with one.
STUDY_STEPS = 1500
BURST_START, BURST_STEPS = 750, 10
BURST_EVAL_OFFSETS = (0, 5, 10, 20, 40, 90, 190, 390)
EVAL_STEPS = bursts.all_eval_points(BURST_START, BURST_STEPS,
                                    BURST_EVAL_OFFSETS, STUDY_STEPS)
STUDY_BASE: dict[str, Any] = {
    "model": {"num_blocks": 2, "d_embed": 64, "num_heads": 4, "seq_len": 64},
    "data": {"dataset": "shakespeare"},
    "optim": {"optimizer": "adam", "lr": 2e-3, "clip": "none"},
    "train": {"steps": STUDY_STEPS, "batch_size": 16, "eval_interval": 500,
              "eval_batches": 64, "checkpoint_every": 0,
              "eval_steps": list(EVAL_STEPS), "burst_start": BURST_START,
              "burst_steps": BURST_STEPS},
    "log": {"log_interval": 10},
}
TUNE_LRS = (1e-3, 1.4e-3, 2e-3, 2.8e-3, 4e-3)
MAX_EXTENSIONS = 4  # grid steps added past an edge that holds the best LR
LR_SCALES = (1.0, 2.0, 4.0, 8.0)
# The cells that decide (×1, ×8) run 3 seeds, the others 2.
SEEDS = (0, 1, 2)
DECISIVE_SCALES = (1.0, 8.0)
OTHER_SEEDS = (0, 1)
# The bases: LR ×1 is Adam's and schedule-free AdamW's tuned LR, and
# Prodigy's own default (it is LR-free: its LR multiplies its estimate).
BASES = ("adam", "prodigy", "schedule_free")
TUNED_BASES = ("adam", "schedule_free")
LR_FREE_LR = {"prodigy": 1.0}
FISHER_DELTAS = (0.003, 0.01, 0.03)
TRUST_REGION_STARTS = (0.001, 0.01, 0.1)
ENERGY_LR_SCALES = (1.0, 3.0)
KNOB_LR_SCALES = (1.0, 4.0)
# EBC with the exact Fisher clip: one JVP of the whole update every step.
_FISHER = {"aggregate": "exact", "kl": "fisher"}
# The same at the cadence the overhead target is met with (benchmarks/
# overhead.py): ‖J ΔW‖ every 4th step on an eighth of the batch.
_FISHER_CHEAP = {"aggregate": "exact", "kl": "fisher", "exact_every": 4,
                 "probe_batch_size": 0.125}
# Arm-name prefixes of the trust-region arms: every step / cheap cadence.
TR_PREFIX = "fisher_tr_d"
TR_CHEAP_PREFIX = "fisher_tr_e4_d"


@dataclasses.dataclass(frozen=True)
class StudyArm:
  """An arm of the study: config overrides, its base optimizer, its LR
  scales (of the base's LR ×1) and its knob."""
  name: str
  overrides: dict[str, Any]
  lr_scales: tuple[float, ...] = LR_SCALES
  knob: str = ""  # the arm's own knob, for the sensitivity table
  base: str = "adam"


def _ebc(**ebc: Any) -> dict[str, Any]:
  """The EBC arm: the seeds' recipe with ``ebc`` changed. Spelled out, so an
  arm means the same whatever the library's defaults are."""
  return {"optim": {"clip": "ebc"}, "ebc": {**ebc_optax.SEEDS_RECIPE, **ebc}}


def _on(base: str, overrides: dict[str, Any]) -> dict[str, Any]:
  """``overrides`` with ``optim.optimizer = base``."""
  out = {k: dict(v) for k, v in overrides.items()}
  out.setdefault("optim", {})["optimizer"] = base
  return out


def peer_arms() -> list[StudyArm]:
  """Stage 2: the bases a user would pick instead of EBC, and EBC around each.

  Adam (no clipping), global-norm clipping before Adam, Prodigy, schedule-free
  AdamW; EBC at the seeds' recipe (L1 bound, PI controller, guard: the
  library's defaults until this study) and the exact Fisher clip at ``δ = 0.01`` (the best fixed δ of the
  first study) around Adam and Prodigy, and the defaults around
  schedule-free; then the configurations that aim at needing no knob
  (:func:`candidate_arms`).
  """
  arms = [
      StudyArm("adam", {}),
      StudyArm("global_clip", {"optim": {"clip": "global",
                                         "global_clip_norm": 1.0}},
               knob="norm=1"),
      StudyArm("prodigy", _on("prodigy", {}), base="prodigy"),
      StudyArm("schedule_free", _on("schedule_free", {}), base="schedule_free"),
  ]
  fisher = dict(target_kl=0.01, controller="none", **_FISHER)
  for base in BASES:
    arms.append(StudyArm(f"ebc_{base}", _on(base, _ebc()),
                         knob="delta*=0.05", base=base))
  for base in ("adam", "prodigy"):
    arms.append(StudyArm(f"fisher_{base}_d0.01", _on(base, _ebc(**fisher)),
                         knob="delta=0.01", base=base))
  return arms + candidate_arms()


# The relative radius with the exact Fisher clip at the cheap cadence.
_REL_FISHER = {"controller": "relative", "overshoot": "scale",
               "aggregate": "exact", "kl": "fisher", "exact_every": 4,
               "probe_batch_size": 0.125}


def candidate_arms() -> list[StudyArm]:
  """Configurations tested as the knob-free default: δ relative to the base's
  own steps (:func:`ebc_optax.relative_radius`, multiple 4, no knob set),
  with the default L1 bound and with the exact Fisher clip measured every
  4th step, around Adam, the LR-free Prodigy and schedule-free AdamW; and
  the relative radius refusing outlier steps (``overshoot="skip"``) instead
  of cutting them back, around Adam and Prodigy."""
  rel = {"controller": "relative", "overshoot": "scale"}
  skip = {"controller": "relative", "overshoot": "skip"}
  return [
      StudyArm("rel_adam", _ebc(**rel), knob="none"),
      StudyArm("rel_fisher_adam", _ebc(**_REL_FISHER), knob="none"),
      StudyArm("rel_prodigy", _on("prodigy", _ebc(**rel)), knob="none",
               base="prodigy"),
      StudyArm("rel_fisher_prodigy", _on("prodigy", _ebc(**_REL_FISHER)),
               knob="none", base="prodigy"),
      StudyArm("rel_schedule_free", _on("schedule_free", _ebc(**rel)),
               knob="none", base="schedule_free"),
      StudyArm("skip_adam", _ebc(**skip), knob="none"),
      StudyArm("skip_prodigy", _on("prodigy", _ebc(**skip)), knob="none",
               base="prodigy"),
  ]


def guard_arms() -> list[StudyArm]:
  """The spike guards of the spike suite, around Adam (published defaults,
  :mod:`~ebc_optax.experiments.guards`), with EBC's default:

  * ``ebc_default`` — :func:`ebc_optax.wrap` with the library's defaults (a
    refused batch leaves Adam's state as it was; the gradient-norm check on);
  * ``skipstep_kept`` — skip-step on loss and gradient norm (6σ / 128 steps,
    after 64), skipped values kept in the statistics (OLMo-core, Levanter,
    MaxText); ``skipstep_leftout`` — left out (axlearn);
  * the 2 × 2 of detector × state: ``skipstep_leftout`` / ``skipstep_absorb``
    (axlearn's detector; Adam's state kept / absorbing the skipped step) and
    ``ebc_radius`` / ``ebc_absorb`` (EBC's logit-space radius alone, the
    gradient-norm check off; kept / absorbing);
  * ``zclip``, ``spam``, ``stable_adamw``, ``agc`` (λ 0.01), ``update_clip``
    (Levanter's historical update norm, 3σ / 128) and ``global_clip`` (1.0).
  """
  skip = {"clip": "skip_step"}
  return [
      StudyArm("ebc_default", {"optim": {"clip": "ebc"}}, knob="none"),
      StudyArm("ebc_radius", {"optim": {"clip": "ebc", "ebc_grad_check": False}},
               knob="none"),
      StudyArm("ebc_absorb", {"optim": {"clip": "ebc", "ebc_grad_check": False,
                                        "ebc_skip_refused": False}}, knob="none"),
      StudyArm("skipstep_kept", {"optim": {**skip, "skip_keep_skipped": True}},
               knob="6 sigma"),
      StudyArm("skipstep_leftout", {"optim": {**skip, "skip_keep_skipped": False}},
               knob="6 sigma"),
      StudyArm("skipstep_absorb", {"optim": {**skip, "skip_keep_skipped": False,
                                             "skip_keep_state": False}},
               knob="6 sigma"),
      StudyArm("zclip", {"optim": {"clip": "zclip"}}, knob="z=2.5"),
      StudyArm("spam", _on("spam", {}), knob="theta=5000"),
      StudyArm("stable_adamw", _on("stable_adamw", {}), knob="none"),
      StudyArm("agc", {"optim": {"clip": "agc", "agc_clipping": 0.01}},
               knob="lambda=0.01"),
      StudyArm("update_clip", {"optim": {"clip": "update_clip"}}, knob="3 sigma"),
      StudyArm("global_clip", {"optim": {"clip": "global",
                                         "global_clip_norm": 1.0}},
               knob="norm=1"),
  ]


def legacy_arms() -> list[StudyArm]:
  """The first study's arms (Adam base only), runnable by name with
  ``only=``: no clipping (``none``), the seeds' first EBC (fixed δ, L1),
  the seeds' fix (``ebc_seed_pi``), the exact Fisher clip at fixed
  ``δ ∈ {0.003, 0.01, 0.03}``, the trust-region radius from three starts
  (every step and at the cheap cadence), the energy-budget clip."""
  arms = [
      StudyArm("none", {}, lr_scales=LR_SCALES + (3.0,)),
      # The seeds' first EBC: fixed δ = 0.05, L1 bound, no controller, no guard.
      StudyArm("ebc_seed_fixed", _ebc(target_kl=0.05, controller="none",
                                      guard=False), knob="delta=0.05"),
      # The seeds' fix: PI controller on the applied KL + shrink-only guard.
      StudyArm("ebc_seed_pi", _ebc(target_kl=0.05), knob="delta*=0.05"),
  ]
  for delta in FISHER_DELTAS:
    arms.append(StudyArm(
        f"fisher_d{delta:g}", _ebc(target_kl=delta, controller="none", **_FISHER),
        knob=f"delta={delta:g}"))
  for delta in TRUST_REGION_STARTS:
    arms.append(StudyArm(
        f"{TR_PREFIX}{delta:g}",
        _ebc(target_kl=delta, controller="trust_region", **_FISHER),
        knob=f"start delta={delta:g}"))
  for delta in TRUST_REGION_STARTS:
    arms.append(StudyArm(
        f"{TR_CHEAP_PREFIX}{delta:g}",
        _ebc(target_kl=delta, controller="trust_region", **_FISHER_CHEAP),
        knob=f"start delta={delta:g}"))
  arms.append(StudyArm("energy", {"optim": {"clip": "energy",
                                            "energy_ratio": 0.1}},
                       lr_scales=ENERGY_LR_SCALES, knob="ratio=0.1"))
  return arms


def knob_arms() -> list[StudyArm]:
  """The single-knob arms at other values of their knob (seed 0)."""
  arms = []
  for delta in (0.005, 0.5):
    arms.append(StudyArm(f"ebc_seed_fixed_d{delta:g}",
                         _ebc(target_kl=delta, controller="none", guard=False),
                         lr_scales=KNOB_LR_SCALES, knob=f"delta={delta:g}"))
    arms.append(StudyArm(f"ebc_seed_pi_d{delta:g}", _ebc(target_kl=delta),
                         lr_scales=KNOB_LR_SCALES, knob=f"delta*={delta:g}"))
  for norm in (0.1, 10.0):
    arms.append(StudyArm(f"global_clip_n{norm:g}",
                         {"optim": {"clip": "global", "global_clip_norm": norm}},
                         lr_scales=KNOB_LR_SCALES, knob=f"norm={norm:g}"))
  return arms


# Knob families for the sensitivity table: (title, [(arm, knob value)]).
KNOB_FAMILIES = (
    ("exact Fisher clip, fixed δ", [f"fisher_d{d:g}" for d in FISHER_DELTAS]),
    ("exact Fisher clip + trust-region radius, start δ",
     [f"{TR_PREFIX}{d:g}" for d in TRUST_REGION_STARTS]),
    ("same, ‖J ΔW‖ every 4th step on B/8, start δ",
     [f"{TR_CHEAP_PREFIX}{d:g}" for d in TRUST_REGION_STARTS]),
    ("seeds' EBC, fixed δ (L1 bound)",
     ["ebc_seed_fixed_d0.005", "ebc_seed_fixed", "ebc_seed_fixed_d0.5"]),
    ("seeds' EBC + PI + guard, δ*",
     ["ebc_seed_pi_d0.005", "ebc_seed_pi", "ebc_seed_pi_d0.5"]),
    ("global-norm clipping, max norm",
     ["global_clip_n0.1", "global_clip", "global_clip_n10"]),
)


def fisher_pi_arm(delta: float) -> StudyArm:
  """The exact Fisher clip with the PI controller at ``delta``, clamp ×/÷10."""
  return StudyArm(
      "fisher_pi", _ebc(target_kl=delta, controller="pi",
                        pi_delta_min=delta / 10, pi_delta_max=delta * 10,
                        **_FISHER), knob=f"delta*={delta:g}")


def all_arms() -> dict[str, StudyArm]:
  """Every arm the study knows, by name (``only=`` picks among them)."""
  return {a.name: a for a in peer_arms() + guard_arms() + legacy_arms()
          + knob_arms()}


def _base_config(base: dict[str, Any], steps: int | None) -> config_lib.Config:
  cfg = config_lib.from_dict(base)
  if steps is not None:
    cfg = sweeps.with_values(cfg, train={"steps": steps})
  return cfg


def _scale_name(scale: float) -> str:
  return f"x{scale:g}"


def tune_arms(cfg: config_lib.Config, lrs: Sequence[float] = TUNE_LRS,
              base: str = "adam") -> list[sweeps.Arm]:
  """Stage 1: ``base`` (no clipping, seed 0) at each LR of ``lrs``."""
  prefix = "tune_lr" if base == "adam" else f"tune_{base}_lr"
  return [sweeps.Arm(f"{prefix}{lr:g}",
                     sweeps.with_values(cfg, optim={"optimizer": base, "lr": lr,
                                                    "lr_scale": 1.0},
                                        train={"seed": 0}),
                     {"arm": "tune", "base": base, "lr_scale": 1.0, "seed": 0})
          for lr in lrs]


def best_lr(rows: Sequence[dict[str, Any]]) -> float:
  """The LR with the lowest finite final val loss."""
  ok = [r for r in rows if _finite(r.get("val_loss"))]
  if not ok:
    raise RuntimeError("every LR-tuning run diverged; no baseline LR.")
  return float(min(ok, key=lambda r: r["val_loss"])["lr"])


def seeds_for(scale: float, seeds: Sequence[int] | None) -> tuple[int, ...]:
  """The seeds of a cell: 3 at the deciding scales (×1, ×8), else 2; or
  ``seeds`` for every cell when given."""
  if seeds is not None:
    return tuple(seeds)
  return SEEDS if scale in DECISIVE_SCALES else OTHER_SEEDS


def run_name(arm: str, scale: float, seed: int, burst: str = "none") -> str:
  """``<arm>_x<scale>_s<seed>``, plus ``_<burst>`` for a burst run."""
  name = f"{arm}_{_scale_name(scale)}_s{seed}"
  return name if burst == "none" else f"{name}_{burst}"


def study_arms(cfg: config_lib.Config, lrs: dict[str, float] | float,
               arms: Sequence[StudyArm], seeds: Sequence[int] | None = None,
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


def _finite(x: Any) -> bool:
  return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _val(row: dict[str, Any]) -> float:
  """Final val loss; a diverged run counts as +inf."""
  v = row.get("val_loss")
  return float(v) if _finite(v) and not row.get("diverged") else math.inf


def best_fisher_delta(rows: Sequence[dict[str, Any]]) -> float:
  """The fixed-δ Fisher arm with the lowest mean val loss over LRs and seeds."""
  scores = {}
  for delta in FISHER_DELTAS:
    vals = [_val(r) for r in rows if r.get("arm") == f"fisher_d{delta:g}"]
    if vals:
      scores[delta] = float(np.mean(vals))
  if not scores:
    raise RuntimeError("no fixed-δ Fisher runs to choose δ from.")
  return min(scores, key=scores.get)


def aggregate(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (arm, LR scale) of the runs without a burst: mean ±
  half-range over seeds, and telemetry means."""
  groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
  for r in rows:
    if r.get("arm") in (None, "tune") or r.get("burst", "none") != "none":
      continue
    groups.setdefault((r["arm"], float(r["lr_scale"])), []).append(r)
  out = []
  for (arm, scale), rs in groups.items():
    vals = [_val(r) for r in rs]
    finite = [v for v in vals if math.isfinite(v)]

    def mean_of(key):
      xs = [r[key] for r in rs if _finite(r.get(key))]
      return float(np.mean(xs)) if xs else None

    out.append({
        "arm": arm, "base": rs[0].get("base", "adam"), "lr_scale": scale,
        "knob": rs[0].get("knob", ""), "seeds": len(rs),
        "val_loss_mean": float(np.mean(finite)) if finite else None,
        "val_loss_spread": (float(max(finite) - min(finite)) / 2
                            if len(finite) > 1 else 0.0) if finite else None,
        "diverged": sum(not math.isfinite(v) for v in vals),
        "c_p10": mean_of("c_p10"), "c_p50": mean_of("c_p50"),
        "c_p90": mean_of("c_p90"), "applied_kl_mean": mean_of("applied_kl_mean"),
        # What the applied KL is compared with: δ* (PI), else δ in use.
        "target_kl": mean_of("applied_kl_ref_mean") or mean_of("target_kl"),
        "applied_kl_within_30pct": mean_of("applied_kl_within_30pct"),
        "tokens_per_s": mean_of("tokens_per_s"),
    })
  return out


def paired_differences(rows: Sequence[dict[str, Any]], ref_arm: str,
                       ref_scale: float = 1.0
                       ) -> dict[tuple[str, float], tuple[float, float, int]]:
  """Per (arm, LR scale): ``(mean, sd, n)`` over seeds of the arm's final val
  loss minus ``ref_arm``'s at ``ref_scale`` with the same seed (runs without a
  burst; a diverged run is +inf; ``sd`` is 0 for one seed)."""
  ref = {r["seed"]: _val(r) for r in rows
         if r.get("arm") == ref_arm and float(r["lr_scale"]) == ref_scale
         and r.get("burst", "none") == "none"}
  diffs: dict[tuple[str, float], list[float]] = {}
  for r in rows:
    if (r.get("arm") in (None, "tune") or r.get("burst", "none") != "none"
        or r["seed"] not in ref):
      continue
    diffs.setdefault((r["arm"], float(r["lr_scale"])), []).append(
        _val(r) - ref[r["seed"]])
  return {k: (float(np.mean(d)), float(np.std(d, ddof=1)) if len(d) > 1 else 0.0,
              len(d)) for k, d in diffs.items()}


def _n(x: Any, fmt: str = ".4f") -> str:
  return "—" if x is None else format(x, fmt)


def _pm(mean: float, sd: float) -> str:
  return "div." if not math.isfinite(mean) else f"{mean:+.4f} ± {sd:.4f}"


def markdown(summary: Sequence[dict[str, Any]], baseline: float | None,
             lrs: dict[str, float] | float,
             paired: dict[tuple[str, float], tuple[float, float, int]] | None = None
             ) -> str:
  """The study's tables: per arm and LR, and the bar's verdict per arm."""
  if isinstance(lrs, (int, float)):
    lrs = {"adam": float(lrs)}
  paired = paired or {}
  lr_text = ", ".join(f"{b} {lr:g}" for b, lr in lrs.items())
  lines = [f"LR ×1 per base: {lr_text}. Baseline (Adam, no clipping, ×1) final "
           f"val loss: {_n(baseline)}. Δ vs Adam ×1: the paired difference per "
           "seed (same seed of Adam ×1), mean ± sd over seeds.", "",
           "| arm | base | LR | val loss (mean ± half-range) | Δ vs Adam ×1 "
           "| seeds | diverged | c p10/p50/p90 | applied KL (mean) / target "
           "| probes within ±30% | tokens/s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for s in sorted(summary, key=lambda s: (s["arm"], s["lr_scale"])):
    val = ("diverged" if s["val_loss_mean"] is None else
           f"{s['val_loss_mean']:.4f} ± {s['val_loss_spread']:.4f}")
    c = ("—" if s["c_p50"] is None else
         f"{s['c_p10']:.2f} / {s['c_p50']:.2f} / {s['c_p90']:.2f}")
    kl = ("—" if s["applied_kl_mean"] is None else
          f"{s['applied_kl_mean']:.4f} / {_n(s['target_kl'])}")
    d = paired.get((s["arm"], s["lr_scale"]))
    lines.append(
        f"| {s['arm']} | {s.get('base', 'adam')} | ×{s['lr_scale']:g} | {val} "
        f"| {'—' if d is None else _pm(d[0], d[1])} | {s['seeds']} "
        f"| {s['diverged']}/{s['seeds']} "
        f"| {c} | {kl} | {_n(s['applied_kl_within_30pct'], '.2f')} "
        f"| {_n(s['tokens_per_s'], ',.0f')} |")
  if baseline is not None:
    lines += ["", bar_table(summary, baseline)]
  return "\n".join(lines) + "\n"


def _arm_val(s: dict[str, Any]) -> float:
  """Mean final val loss of an (arm, LR) summary row; +inf if any seed diverged."""
  return math.inf if s["val_loss_mean"] is None or s["diverged"] else s["val_loss_mean"]


def _cell(v: float) -> str:
  return "div." if not math.isfinite(v) else f"{v:.4f}"


def _worst(ss: Sequence[dict[str, Any]]) -> float:
  return max(_arm_val(s) for s in ss)


def bar_table(summary: Sequence[dict[str, Any]], baseline: float) -> str:
  """Each arm run at every LR scale of :data:`LR_SCALES` against bar (a):
  no worse than tuned Adam at ×1, and within 1% of it at every scale — for an
  arm on an LR-free base, within 1% of that base's own ×1 (its default)."""
  base_x1 = {s["arm"]: _arm_val(s) for s in summary if s["lr_scale"] == 1.0}
  lines = ["Against bar (a): at ×1 no worse than tuned Adam ×1 "
           f"({baseline:.4f}), and at every LR scale ×1…×8 within 1% of it "
           f"(≤ {1.01 * baseline:.4f}) — or, on an LR-free base (Prodigy), "
           "within 1% of that base's own ×1 run; a diverged seed counts as a "
           "miss:", "",
           "| arm | base | val loss ×1 / ×2 / ×4 / ×8 | worst / Adam ×1 "
           "| worst / own base ×1 | meets (a) |",
           "|---|---|---|---|---|---|"]
  by_arm: dict[str, dict[float, dict[str, Any]]] = {}
  for s in summary:
    by_arm.setdefault(s["arm"], {})[s["lr_scale"]] = s
  for arm, per_scale in sorted(by_arm.items()):
    if not all(x in per_scale for x in LR_SCALES):
      continue
    ss = [per_scale[x] for x in LR_SCALES]
    base = ss[0].get("base", "adam")
    worst = _worst(ss)
    ratio = worst / baseline
    own = base_x1.get(base if base != "adam" else "adam")
    own_ratio = worst / own if base in LR_FREE_LR and own else None
    x1_ok = _arm_val(ss[0]) <= baseline
    ok = x1_ok and (ratio <= 1.01 or (own_ratio is not None and own_ratio <= 1.01))
    cells = " / ".join(_cell(_arm_val(s)) for s in ss)
    lines.append(f"| {arm} | {base} | {cells} "
                 f"| {_n(ratio if math.isfinite(ratio) else None, '.3f')} "
                 f"| {_n(own_ratio if own_ratio and math.isfinite(own_ratio) else None, '.3f')} "
                 f"| {'yes' if ok else 'no'} |")
  return "\n".join(lines) + "\n"


def knob_table(summary: Sequence[dict[str, Any]], arms: Sequence[str]) -> str:
  """Val loss of a family of arms (one knob value each) per LR scale.

  Only LR scales where at least two members ran; the last row is, per scale,
  the spread (worst − best) over the knob, and its relative size.
  """
  rows = {(s["arm"], s["lr_scale"]): s for s in summary}
  present = [a for a in arms if any(k[0] == a for k in rows)]
  scales = sorted(x for x in {s["lr_scale"] for s in summary}
                  if sum((a, x) in rows for a in present) > 1)
  if len(present) < 2 or not scales:
    return ""

  def val(a, x):
    s = rows.get((a, x))
    return None if s is None else _arm_val(s)

  lines = ["| arm (knob) | " + " | ".join(f"×{x:g}" for x in scales) + " |",
           "|---|" + "---|" * len(scales)]
  for a in present:
    knob = next((s["knob"] for s in summary if s["arm"] == a), "")
    cells = ["—" if v is None else _cell(v) for v in (val(a, x) for x in scales)]
    lines.append(f"| {a} ({knob}) | " + " | ".join(cells) + " |")
  spread = []
  for x in scales:
    vs = [v for v in (val(a, x) for a in present) if v is not None]
    if len(vs) < 2:
      spread.append("—")
    elif not all(math.isfinite(v) for v in vs):
      spread.append("div.")
    else:
      spread.append(f"{max(vs) - min(vs):.4f} ({(max(vs) / min(vs) - 1):.1%})")
  lines.append("| worst − best over the knob | " + " | ".join(spread) + " |")
  return "\n".join(lines) + "\n"


def trust_region_table(summary: Sequence[dict[str, Any]],
                       baseline: float | None, prefix: str = TR_PREFIX) -> str:
  """The trust-region arms named ``prefix + start δ`` against the best
  fixed-δ Fisher run at each LR."""
  rows = {(s["arm"], s["lr_scale"]): s for s in summary}
  starts = [f"{prefix}{d:g}" for d in TRUST_REGION_STARTS]
  fixed = [f"fisher_d{d:g}" for d in FISHER_DELTAS]
  if not any((a, 1.0) in rows for a in starts):
    return ""
  lines = ["| LR | best fixed-δ Fisher (δ) | " + " | ".join(
      f"start δ={d:g}" for d in TRUST_REGION_STARTS)
      + " | worst start / best fixed | worst start / baseline ×1 |",
      "|---|---|" + "---|" * (len(starts) + 2)]
  for x in LR_SCALES:
    fixed_vals = {a: _arm_val(rows[(a, x)]) for a in fixed
                  if (a, x) in rows and math.isfinite(_arm_val(rows[(a, x)]))}
    tr = [rows.get((a, x)) for a in starts]
    tr_vals = [math.inf if s is None else _arm_val(s) for s in tr]
    best_a = min(fixed_vals, key=fixed_vals.get) if fixed_vals else None
    best = fixed_vals[best_a] if best_a else None
    worst = max(tr_vals)
    lines.append(
        f"| ×{x:g} | " + (f"{best:.4f} ({best_a.split('_d')[1]})" if best else "—")
        + " | " + " | ".join("—" if s is None else _n(v if math.isfinite(v) else None)
                             for s, v in zip(tr, tr_vals))
        + f" | {_n(worst / best if best and math.isfinite(worst) else None, '.3f')}"
        + f" | {_n(worst / baseline if baseline and math.isfinite(worst) else None, '.3f')} |")
  return "\n".join(lines) + "\n"


def _run_metrics(out_dir: pathlib.Path, run: str) -> list[dict[str, Any]]:
  path = out_dir / run
  return plots.read_metrics(path) if (path / "metrics.jsonl").exists() else []


def figures(out_dir: pathlib.Path, rows: Sequence[dict[str, Any]],
            summary: Sequence[dict[str, Any]], baseline: float | None) -> list[pathlib.Path]:
  """val loss vs LR scale per arm; train-loss curves at ×2 and ×4; δ of the
  trust-region arm over training."""
  plt = plots._pyplot()
  paths = []
  rows = [r for r in rows if r.get("burst", "none") == "none"]
  main = {s["arm"] for s in summary
          if all(any(t["arm"] == s["arm"] and t["lr_scale"] == x for t in summary)
                 for x in LR_SCALES) or s["arm"] == "energy"}
  fig, ax = plt.subplots(figsize=(8, 5))
  # tab20: the 10-colour default cycle repeats with this many arms.
  colors = {arm: plt.cm.tab20(i % 20) for i, arm in enumerate(sorted(main))}
  for arm in sorted(main):
    ss = sorted((s for s in summary if s["arm"] == arm), key=lambda s: s["lr_scale"])
    xs = [s["lr_scale"] for s in ss]
    ys = [s["val_loss_mean"] if s["val_loss_mean"] is not None and not s["diverged"]
          else np.nan for s in ss]
    err = [s["val_loss_spread"] or 0.0 for s in ss]
    ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=3, label=arm,
                color=colors[arm],
                ls="--" if arm.startswith("fisher_tr") else "-")
  if baseline is not None:
    ax.axhline(baseline, color="k", lw=0.8, ls="--", label="tuned adam ×1")
    ax.axhline(1.01 * baseline, color="k", lw=0.5, ls=":", label="+1%")
    finite = [s["val_loss_mean"] for s in summary
              if s["arm"] in main and s["val_loss_mean"] is not None]
    ax.set_ylim(min(finite + [baseline]) - 0.02, baseline + 0.45)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("LR scale (×1 = the base's LR ×1: tuned, or Prodigy's default)")
  ax.set_ylabel("final val loss (nats/char)")
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  paths.append(out_dir / "val_vs_lr.png")
  fig.savefig(paths[-1], dpi=100)
  plt.close(fig)
  for scale in (2.0, 4.0):
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
      if (r.get("arm") not in main or float(r["lr_scale"]) != scale
          or r["seed"] != 0):
        continue
      ms = [m for m in _run_metrics(out_dir, r["run"]) if "train_loss" in m]
      if not ms:
        continue
      steps = np.array([m["step"] for m in ms])
      loss = np.array([m["train_loss"] if m["train_loss"] is not None else np.nan
                       for m in ms], np.float64)
      k = min(10, len(loss))
      smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
      ax.plot(steps[k - 1:], smooth, label=r["arm"], lw=1, color=colors[r["arm"]],
              ls="--" if r["arm"].startswith("fisher_tr") else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (moving average of 10 logs)")
    ax.set_title(f"LR ×{scale:g}, seed 0")
    if baseline is not None:
      ax.set_ylim(baseline - 0.2, baseline + 1.0)
    if ax.lines:
      ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    paths.append(out_dir / f"curves_x{scale:g}.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
  tr_rows = [r for r in rows if str(r.get("arm", "")).startswith(TR_PREFIX)
             and r["seed"] == 0]
  if tr_rows:
    fig, axes = plt.subplots(1, len(LR_SCALES), figsize=(12, 3.6), sharey=True)
    for ax, scale in zip(np.atleast_1d(axes), LR_SCALES):
      for r in sorted(tr_rows, key=lambda r: r["arm"]):
        if float(r["lr_scale"]) != scale:
          continue
        ms = [m for m in _run_metrics(out_dir, r["run"]) if "delta" in m]
        if ms:
          ax.plot([m["step"] for m in ms], [m["delta"] for m in ms], lw=1,
                  label=r["arm"].replace(TR_PREFIX, "start δ="))
      for d in FISHER_DELTAS:
        ax.axhline(d, color="0.6", lw=0.6, ls=":")
      ax.set_yscale("log")
      ax.set_title(f"LR ×{scale:g}")
      ax.set_xlabel("step")
    np.atleast_1d(axes)[0].set_ylabel("δ (nats/token)")
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle("trust-region radius δ over training (seed 0; dotted: the "
                 "fixed-δ arms)", fontsize=9)
    fig.tight_layout()
    paths.append(out_dir / "tr_delta.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
  return paths


def run_study(out_dir: pathlib.Path, *, base: dict[str, Any] | None = None,
              steps: int | None = None, seeds: Sequence[int] | None = None,
              tune_lrs: Sequence[float] = TUNE_LRS,
              lr_scales: Sequence[float] | None = None,
              only: Sequence[str] | None = None,
              legacy: bool = False,
              progress: bool = True, workers: int = 1,
              tune_extensions: int | None = None) -> dict[str, Any]:
  """Runs (or resumes) the study and writes its tables and figures.

  Args:
    out_dir: the study directory (one sub-directory per run).
    base: the base config mapping (default :data:`STUDY_BASE`).
    steps: override ``train.steps`` of every run.
    seeds: seeds of every stage-2 cell (default: 3 at ×1 and ×8, 2 else).
    tune_lrs: the LRs of stage 1.
    lr_scales: override the LR scales of every stage-2 arm.
    only: run only the arms with these names (any of :func:`all_arms`); the
      tables then cover the tuning runs and these arms (rerun without
      ``only`` to tabulate every arm: finished runs are read back).
    legacy: also run the first study's arms (:func:`legacy_arms`, Adam only)
      with their knob sweeps.
    progress: show progress bars.
    workers: train this many runs at once, one CPU core each.
    tune_extensions: grid steps the tuning may add past an edge that holds
      the best LR (default :data:`MAX_EXTENSIONS`).

  Returns:
    ``{"lrs": {base: LR ×1}, "baseline": ..., "rows": [...], "summary": [...]}``.
  """
  cfg = _base_config(base or STUDY_BASE, steps)
  out_dir.mkdir(parents=True, exist_ok=True)
  known = all_arms()
  if only is not None:
    unknown = sorted(set(only) - set(known) - {"fisher_pi"})
    if unknown:
      raise ValueError(f"unknown study arm(s) {unknown}; known: {sorted(known)}.")
    arms = [known[n] for n in only if n in known]
  else:
    arms = peer_arms() + (legacy_arms() if legacy else [])
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
        study_arms(cfg, lrs, [fisher_pi_arm(best_fisher_delta(fisher_rows))],
                   seeds), out_dir, progress=progress, workers=workers)
  if legacy:
    rows += sweeps.run_arms(study_arms(cfg, lrs, knob_arms(), (0,)), out_dir,
                            progress=progress, workers=workers)
  return report(out_dir, lrs, tune_rows, rows)


def tune(cfg: config_lib.Config, out_dir: pathlib.Path, bases: set[str],
         tune_lrs: Sequence[float], progress: bool = True, workers: int = 1,
         extensions: int = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
  """Stage 1: LR ×1 of every base in ``bases`` (and Adam's, the baseline):
  tuned for Adam and schedule-free AdamW, the default for LR-free bases.

  A best LR at either end of the grid is not tuned: the grid is then
  extended by factors of √2 past that end (at most ``extensions`` times,
  default :data:`MAX_EXTENSIONS`) until the best LR has a worse neighbour on
  both sides.
  """
  extensions = MAX_EXTENSIONS if extensions is None else extensions
  lrs, rows = dict(LR_FREE_LR), []
  for b in TUNED_BASES:
    if b != "adam" and b not in bases:
      continue
    grid = sorted(tune_lrs)
    for attempt in range(extensions + 1):
      tuned = sweeps.run_arms(tune_arms(cfg, grid, b), out_dir,
                              progress=progress, workers=workers)
      best = best_lr(tuned)
      if len(grid) < 2 or grid[0] < best < grid[-1] or attempt == extensions:
        break
      grid.append(float(f"{grid[-1] * math.sqrt(2):.2g}") if best == grid[-1]
                  else float(f"{grid[0] / math.sqrt(2):.2g}"))
      grid.sort()
    lrs[b] = best
    rows += tuned
  return lrs, rows


def baseline_of(summary: Sequence[dict[str, Any]]) -> float | None:
  """Adam (no clipping) at ×1: the ``adam`` arm, or the first study's ``none``."""
  for name in ("adam", "none"):
    for s in summary:
      if s["arm"] == name and s["lr_scale"] == 1.0:
        return s["val_loss_mean"]
  return None


def noise_floor(rows: Sequence[dict[str, Any]]) -> dict[str, float] | None:
  """The seed noise of the comparisons: the sd over seeds of Adam ×1's final
  val loss, and the median over (arm, scale) cells of the sd of the paired
  differences to Adam ×1 (what a paired comparison's spread is)."""
  ref = [_val(r) for r in rows if r.get("arm") in ("adam", "none")
         and float(r.get("lr_scale", 0)) == 1.0 and r.get("burst", "none") == "none"]
  ref = [v for v in ref if math.isfinite(v)]
  if len(ref) < 2:
    return None
  ref_arm = "adam" if any(r.get("arm") == "adam" for r in rows) else "none"
  sds = [sd for (arm, _), (m, sd, n) in paired_differences(rows, ref_arm).items()
         if n > 1 and math.isfinite(m) and arm != ref_arm]
  return {"adam_x1_sd": float(np.std(ref, ddof=1)), "adam_x1_seeds": len(ref),
          "paired_sd_median": float(np.median(sds)) if sds else float("nan")}


def report(out_dir: pathlib.Path, lrs: dict[str, float] | float,
           tune_rows: Sequence[dict[str, Any]],
           rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Writes study.csv/json/md and the figures from finished runs."""
  if isinstance(lrs, (int, float)):
    lrs = {"adam": float(lrs)}
  summary = aggregate(rows)
  baseline = baseline_of(summary)
  ref_arm = "adam" if any(s["arm"] == "adam" for s in summary) else "none"
  paired = paired_differences(rows, ref_arm)
  sweeps.write_tables(list(tune_rows) + list(rows), out_dir, stem="study",
                      results_stem="study_runs")
  text = ["# Study", ""]
  for b in TUNED_BASES:
    tuned = [r for r in tune_rows if r.get("base", "adam") == b]
    if tuned:
      text += [f"## LR tuning ({b}, no clipping, seed 0)", "",
               "| LR | final val loss |", "|---|---|"]
      text += [f"| {r['lr']:g} | {_n(r.get('val_loss'))} |" for r in tuned]
      text += [""]
  floor = noise_floor(rows)
  text += ["## Arms", "", markdown(summary, baseline, lrs, paired)]
  if floor:
    text += [f"Noise floor: Adam ×1 over {floor['adam_x1_seeds']} seeds has sd "
             f"{floor['adam_x1_sd']:.4f}; paired differences to Adam ×1 have a "
             f"median sd of {floor['paired_sd_median']:.4f} over the cells with "
             "more than one seed. A difference smaller than about twice that "
             "is not resolved.", ""]
  for prefix, title in ((TR_PREFIX, "‖J ΔW‖ every step on B/4"),
                        (TR_CHEAP_PREFIX, "‖J ΔW‖ every 4th step on B/8")):
    tr = trust_region_table(summary, baseline, prefix)
    if tr:
      text += [f"## Trust-region radius vs the best fixed δ ({title})", "", tr]
  knob_text = []
  for title, arms in KNOB_FAMILIES:
    table = knob_table(summary, arms)
    if table:
      knob_text += [f"### {title}", "", table]
  if knob_text:
    text += ["## How much each arm depends on its knob", ""] + knob_text
  (out_dir / "study.md").write_text("\n".join(text))
  (out_dir / "study.json").write_text(json.dumps(
      {"lrs": lrs, "baseline": baseline, "noise_floor": floor,
       "summary": summary}, indent=2) + "\n")
  figs = figures(out_dir, rows, summary, baseline)
  return {"lrs": lrs, "lr": lrs.get("adam"), "baseline": baseline,
          "rows": list(rows), "summary": summary,
          "figures": [str(p) for p in figs]}
