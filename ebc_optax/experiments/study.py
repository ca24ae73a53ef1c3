"""The study: which EBC trains best across learning rates (``ebc-optax study``).

Protocol (all runs with fixed seeds, resumable: a run whose ``summary.json``
exists is read back, not rerun, so the study can be finished in sittings):

1. **tune** — plain Adam, no clipping, at ``TUNE_LRS`` (×0.5 … ×2 of 2e-3),
   seed 0; the best final val loss defines LR ×1.
2. **arms** — at LR ×1, ×2, ×4, ×8, seeds 0 and 1, every arm of
   :func:`base_arms`: no clipping, global-norm clipping, EBC as the seeds
   first had it (fixed δ, L1 bound), EBC with the seeds' fix (PI controller +
   guard, L1), the exact Fisher clip at fixed ``δ ∈ {0.003, 0.01, 0.03}``, the
   exact Fisher clip with the trust-region radius started from
   ``δ ∈ {0.001, 0.01, 0.1}`` (with ``‖J ΔW‖`` every step, and every 4th step
   on an eighth of the batch), and the energy-budget clip at ×1 and ×3 (with
   no clipping and global clipping at ×3 too, for comparison).
3. **fisher_pi** — the exact Fisher clip with the PI controller at the best
   fixed δ of stage 2.
4. **knobs** — how much the single-knob arms depend on their knob: the seeds'
   EBC arms at ``δ ∈ {0.005, 0.5}`` and global clipping at norm ``{0.1, 10}``,
   at ×1 and ×4, seed 0 (the Fisher arms sweep δ in stage 2 already).
5. **report** — ``study.md`` (tables), ``study.csv`` (one row per run),
   ``study.json``, and figures: final val loss vs LR scale per arm, loss curves
   at ×2 and ×4, δ trajectories of the trust-region arm.

Sizes (``STUDY_BASE``): a 2-block, d 64 char GPT on Shakespeare, batch 16 ×
seq 64, 1500 steps (~45 s per run on 2 CPU cores; the final val loss is on 64
fixed batches, 65k characters of the validation split): the ~145 runs fit in
about 100 minutes. The CPU config (3 blocks, d 128, batch 16 × 128) takes ~6.5
minutes per 2000-step run, i.e. ~12 hours for the study.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from ebc_optax.experiments import config as config_lib
from ebc_optax.experiments import plots
from ebc_optax.experiments import sweeps

STUDY_BASE: dict[str, Any] = {
    "model": {"num_blocks": 2, "d_embed": 64, "num_heads": 4, "seq_len": 64},
    "data": {"dataset": "shakespeare"},
    "optim": {"optimizer": "adam", "lr": 2e-3, "clip": "none"},
    "train": {"steps": 1500, "batch_size": 16, "eval_interval": 500,
              "eval_batches": 64, "checkpoint_every": 0},
    "log": {"log_interval": 10},
}
TUNE_LRS = (1e-3, 1.4e-3, 2e-3, 2.8e-3, 4e-3)
LR_SCALES = (1.0, 2.0, 4.0, 8.0)
SEEDS = (0, 1)
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
  """An arm of the study: config overrides, its LR scales and its knob."""
  name: str
  overrides: dict[str, Any]
  lr_scales: tuple[float, ...] = LR_SCALES
  knob: str = ""  # the arm's own knob, for the sensitivity table


def _ebc(**ebc: Any) -> dict[str, Any]:
  return {"optim": {"clip": "ebc"}, "ebc": ebc}


def base_arms() -> list[StudyArm]:
  """Stage-2 arms that do not depend on other results."""
  arms = [
      StudyArm("none", {}, lr_scales=LR_SCALES + (3.0,)),
      StudyArm("global_clip", {"optim": {"clip": "global",
                                         "global_clip_norm": 1.0}},
               lr_scales=LR_SCALES + (3.0,), knob="norm=1"),
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
  """Stage 4: the single-knob arms at other values of their knob (seed 0)."""
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


def _base_config(base: dict[str, Any], steps: int | None) -> config_lib.Config:
  cfg = config_lib.from_dict(base)
  if steps is not None:
    cfg = sweeps.with_values(cfg, train={"steps": steps})
  return cfg


def _scale_name(scale: float) -> str:
  return f"x{scale:g}"


def tune_arms(cfg: config_lib.Config, lrs: Sequence[float] = TUNE_LRS) -> list[sweeps.Arm]:
  return [sweeps.Arm(f"tune_lr{lr:g}",
                     sweeps.with_values(cfg, optim={"lr": lr, "lr_scale": 1.0},
                                        train={"seed": 0}),
                     {"arm": "tune", "lr_scale": 1.0, "seed": 0})
          for lr in lrs]


def best_lr(rows: Sequence[dict[str, Any]]) -> float:
  """The LR with the lowest finite final val loss."""
  ok = [r for r in rows if _finite(r.get("val_loss"))]
  if not ok:
    raise RuntimeError("every LR-tuning run diverged; no baseline LR.")
  return float(min(ok, key=lambda r: r["val_loss"])["lr"])


def study_arms(cfg: config_lib.Config, lr: float, arms: Sequence[StudyArm],
               seeds: Sequence[int] = SEEDS) -> list[sweeps.Arm]:
  out = []
  for arm in arms:
    for scale in arm.lr_scales:
      for seed in seeds:
        sections = {k: dict(v) for k, v in arm.overrides.items()}
        sections.setdefault("optim", {}).update(lr=lr, lr_scale=scale)
        sections.setdefault("train", {}).update(seed=seed)
        out.append(sweeps.Arm(
            f"{arm.name}_{_scale_name(scale)}_s{seed}",
            sweeps.with_values(cfg, **sections),
            {"arm": arm.name, "lr_scale": scale, "seed": seed,
             "knob": arm.knob}))
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
  """One row per (arm, LR scale): mean ± half-range over seeds and telemetry."""
  groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
  for r in rows:
    if r.get("arm") in (None, "tune"):
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
        "arm": arm, "lr_scale": scale, "knob": rs[0].get("knob", ""),
        "seeds": len(rs),
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


def _n(x: Any, fmt: str = ".4f") -> str:
  return "—" if x is None else format(x, fmt)


def markdown(summary: Sequence[dict[str, Any]], baseline: float | None,
             lr: float) -> str:
  """The study's tables: per arm and LR, and the bar's verdict per arm."""
  lines = [f"LR ×1 = {lr:g} (tuned). Baseline (no clipping, ×1) final val loss: "
           f"{_n(baseline)}.", "",
           "| arm | LR | val loss (mean ± half-range) | diverged | c p10/p50/p90 "
           "| applied KL (mean) / target | probes within ±30% | tokens/s |",
           "|---|---|---|---|---|---|---|---|"]
  for s in sorted(summary, key=lambda s: (s["arm"], s["lr_scale"])):
    val = ("diverged" if s["val_loss_mean"] is None else
           f"{s['val_loss_mean']:.4f} ± {s['val_loss_spread']:.4f}")
    c = ("—" if s["c_p50"] is None else
         f"{s['c_p10']:.2f} / {s['c_p50']:.2f} / {s['c_p90']:.2f}")
    kl = ("—" if s["applied_kl_mean"] is None else
          f"{s['applied_kl_mean']:.4f} / {s['target_kl']:.4f}")
    lines.append(
        f"| {s['arm']} | ×{s['lr_scale']:g} | {val} | {s['diverged']}/{s['seeds']} "
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
  """Each arm run at every LR scale of :data:`LR_SCALES` against the bar."""
  lines = ["Against the bar (at every LR scale ×1…×8, final val loss within 1% "
           f"of the tuned baseline at ×1, i.e. ≤ {1.01 * baseline:.4f}; "
           "a diverged seed counts as a miss):", "",
           "| arm | val loss ×1 / ×2 / ×4 / ×8 | worst / baseline | meets bar |",
           "|---|---|---|---|"]
  by_arm: dict[str, dict[float, dict[str, Any]]] = {}
  for s in summary:
    by_arm.setdefault(s["arm"], {})[s["lr_scale"]] = s
  for arm, per_scale in sorted(by_arm.items()):
    if not all(x in per_scale for x in LR_SCALES):
      continue
    ss = [per_scale[x] for x in LR_SCALES]
    worst = _worst(ss)
    ratio = worst / baseline
    cells = " / ".join(_cell(_arm_val(s)) for s in ss)
    lines.append(f"| {arm} | {cells} "
                 f"| {_n(ratio if math.isfinite(ratio) else None, '.3f')} "
                 f"| {'yes' if ratio <= 1.01 else 'no'} |")
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
    ax.set_ylim(baseline - 0.05, baseline + 0.45)
  ax.set_xscale("log", base=2)
  ax.set_xlabel("LR scale (×1 = tuned adam LR)")
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
              steps: int | None = None, seeds: Sequence[int] = SEEDS,
              tune_lrs: Sequence[float] = TUNE_LRS,
              lr_scales: Sequence[float] | None = None,
              only: Sequence[str] | None = None,
              knobs: bool = True,
              progress: bool = True) -> dict[str, Any]:
  """Runs (or resumes) the whole study and writes its tables and figures.

  Args:
    out_dir: the study directory (one sub-directory per run).
    base: the base config mapping (default :data:`STUDY_BASE`).
    steps: override ``train.steps`` of every run.
    seeds: seeds of stage 2.
    tune_lrs: the LRs of stage 1.
    lr_scales: override the LR scales of every stage-2 arm.
    only: run only the stage-2/3/4 arms with these names; the tables then
      cover the tuning runs and these arms (rerun without ``only`` to tabulate
      every arm: finished runs are read back, not retrained).
    knobs: run stage 4 (the knob sweeps).
    progress: show progress bars.

  Returns:
    ``{"lr": ..., "baseline": ..., "rows": [...], "summary": [...]}``.
  """
  cfg = _base_config(base or STUDY_BASE, steps)
  out_dir.mkdir(parents=True, exist_ok=True)
  tune_rows = sweeps.run_arms(tune_arms(cfg, tune_lrs), out_dir, progress=progress)
  lr = best_lr(tune_rows)

  def chosen(arms: Sequence[StudyArm]) -> list[StudyArm]:
    arms = [a for a in arms if only is None or a.name in only]
    if lr_scales is not None:
      arms = [dataclasses.replace(a, lr_scales=tuple(lr_scales)) for a in arms]
    return arms

  rows = sweeps.run_arms(study_arms(cfg, lr, chosen(base_arms()), seeds),
                         out_dir, progress=progress)
  fisher_rows = [r for r in rows if str(r.get("arm", "")).startswith("fisher_d")]
  if fisher_rows:
    rows += sweeps.run_arms(
        study_arms(cfg, lr, chosen([fisher_pi_arm(best_fisher_delta(fisher_rows))]),
                   seeds), out_dir, progress=progress)
  if knobs:
    rows += sweeps.run_arms(study_arms(cfg, lr, chosen(knob_arms()), seeds[:1]),
                            out_dir, progress=progress)
  return report(out_dir, lr, tune_rows, rows)


def report(out_dir: pathlib.Path, lr: float, tune_rows: Sequence[dict[str, Any]],
           rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Writes study.csv/json/md and the figures from finished runs."""
  summary = aggregate(rows)
  base_rows = [s for s in summary if s["arm"] == "none" and s["lr_scale"] == 1.0]
  baseline = base_rows[0]["val_loss_mean"] if base_rows else None
  sweeps.write_tables(list(tune_rows) + list(rows), out_dir, stem="study",
                      results_stem="study_runs")
  text = ["# Study", "", "## LR tuning (adam, no clipping, seed 0)", "",
          "| LR | final val loss |", "|---|---|"]
  text += [f"| {r['lr']:g} | {_n(r.get('val_loss'))} |" for r in tune_rows]
  text += ["", "## Arms", "", markdown(summary, baseline, lr)]
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
      {"lr": lr, "baseline": baseline, "summary": summary}, indent=2) + "\n")
  figs = figures(out_dir, rows, summary, baseline)
  return {"lr": lr, "baseline": baseline, "rows": list(rows),
          "summary": summary, "figures": [str(p) for p in figs]}
