"""The study's statistics: per-cell means and spreads, differences paired by
seed, the tuned LR and the noise floor."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ebc_optax.experiments import study_design as design


def _finite(x: Any) -> bool:
  return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def val(row: dict[str, Any]) -> float:
  """Final val loss; a diverged run counts as +inf."""
  v = row.get("val_loss")
  return float(v) if _finite(v) and not row.get("diverged") else math.inf


def best_lr(rows: Sequence[dict[str, Any]]) -> float:
  """The LR with the lowest finite final val loss."""
  ok = [r for r in rows if _finite(r.get("val_loss"))]
  if not ok:
    raise RuntimeError("every LR-tuning run diverged; no baseline LR.")
  return float(min(ok, key=lambda r: r["val_loss"])["lr"])


def best_fisher_delta(rows: Sequence[dict[str, Any]]) -> float:
  """The fixed-δ Fisher arm with the lowest mean val loss over LRs and seeds."""
  scores = {}
  for delta in design.FISHER_DELTAS:
    vals = [val(r) for r in rows if r.get("arm") == f"fisher_d{delta:g}"]
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
    vals = [val(r) for r in rs]
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
  ref = {r["seed"]: val(r) for r in rows
         if r.get("arm") == ref_arm and float(r["lr_scale"]) == ref_scale
         and r.get("burst", "none") == "none"}
  diffs: dict[tuple[str, float], list[float]] = {}
  for r in rows:
    if (r.get("arm") in (None, "tune") or r.get("burst", "none") != "none"
        or r["seed"] not in ref):
      continue
    diffs.setdefault((r["arm"], float(r["lr_scale"])), []).append(
        val(r) - ref[r["seed"]])
  return {k: (float(np.mean(d)), float(np.std(d, ddof=1)) if len(d) > 1 else 0.0,
              len(d)) for k, d in diffs.items()}


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
  ref = [val(r) for r in rows if r.get("arm") in ("adam", "none")
         and float(r.get("lr_scale", 0)) == 1.0 and r.get("burst", "none") == "none"]
  ref = [v for v in ref if math.isfinite(v)]
  if len(ref) < 2:
    return None
  ref_arm = "adam" if any(r.get("arm") == "adam" for r in rows) else "none"
  sds = [sd for (arm, _), (m, sd, n) in paired_differences(rows, ref_arm).items()
         if n > 1 and math.isfinite(m) and arm != ref_arm]
  return {"adam_x1_sd": float(np.std(ref, ddof=1)), "adam_x1_seeds": len(ref),
          "paired_sd_median": float(np.median(sds)) if sds else float("nan")}
