"""The seeds' protocol (§5 of the corrected recipe), automated and resumable.

Stage 1: LR sweep without EBC (warm-up length) -> best LR.
Stage 2: EBC + PI controller warm-ups over δ* at the best LR -> the δ* with the
best warm-up val loss among those whose median c lies in ``c_band``
(if none does, the one whose median c is nearest to the band).
Stage 2b: LR scales ×{1.5, 2, 3, 4} comparing EBC + controller, EBC with a
fixed τ and no EBC (warm-up length) -> the scale with the best EBC +
controller warm-up val loss whose median c stays in the band (else the best
overall).
Stage 3: finals at full length with ``seeds`` seeds: baseline at the best LR
and EBC + controller at the chosen scale and δ*.

Every run is a directory with ``summary.json``; rerunning skips finished runs,
so a killed autopilot resumes where it stopped. Decisions are recomputed from
the summaries and written to ``auto_decisions.json``.
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics
from collections.abc import Sequence
from typing import Any

from ebc_optax.experiments import config as config_lib
from ebc_optax.experiments import plots
from ebc_optax.experiments import sweeps


def _val(row: dict[str, Any]) -> float:
  v = row.get("val_loss")
  return v if v is not None and math.isfinite(v) and not row.get("diverged") else math.inf


def _band_distance(c: float, band: tuple[float, float]) -> float:
  return max(band[0] - c, 0.0, c - band[1])


def autopilot(
    base: config_lib.Config,
    out_dir: pathlib.Path,
    *,
    warmup_steps: int = 300,
    lr_multipliers: Sequence[float] = (0.25, 0.5, 1.0, 2.0, 4.0),
    deltas: Sequence[float] = (0.03, 0.05, 0.07),
    lr_scales: Sequence[float] = (1.5, 2.0, 3.0, 4.0),
    seeds: Sequence[int] = (0, 1, 2),
    c_band: tuple[float, float] = (0.5, 0.7),
    progress: bool = True,
    echo=print,
) -> dict[str, Any]:
  """Runs all stages; returns the decisions."""
  out_dir = pathlib.Path(out_dir)
  warm = sweeps.with_values(base, train={"steps": warmup_steps,
                                         "eval_interval": warmup_steps})
  lr0 = base.optim.lr
  decisions: dict[str, Any] = {"warmup_steps": warmup_steps, "c_band": list(c_band)}

  def ebc_cfg(cfg, delta, controller):
    return sweeps.with_values(cfg, optim={"clip": "ebc"}, ebc={
        "target_kl": delta, "controller": "pi" if controller else "none"})

  # Stage 1.
  arms = [sweeps.Arm(f"s1_lr{sweeps._fmt(lr0 * m)}",
                     sweeps.with_values(warm, optim={"lr": lr0 * m, "clip": "none"}),
                     {"stage": "1", "lr": lr0 * m, "ebc": 0})
          for m in lr_multipliers]
  echo(f"# stage 1: LR sweep ({len(arms)} runs)")
  s1 = sweeps.run_arms(arms, out_dir / "stage1", progress=progress)
  best1 = min(s1, key=_val)
  best_lr = best1["lr"]
  decisions["stage1"] = {"best_lr": best_lr, "val_loss": best1["val_loss"]}

  # Stage 2.
  at_best = sweeps.with_values(warm, optim={"lr": best_lr, "lr_scale": 1.0})
  arms = [sweeps.Arm(f"s2_ebc_d{sweeps._fmt(d)}", ebc_cfg(at_best, d, True),
                     {"stage": "2", "lr": best_lr, "ebc": 1, "delta": d,
                      "controller": "on"}) for d in deltas]
  echo(f"# stage 2: EBC + controller warm-ups over δ* ({len(arms)} runs)")
  s2 = sweeps.run_arms(arms, out_dir / "stage2", progress=progress)
  in_band = [r for r in s2 if _band_distance(r["c_p50"], c_band) == 0]
  if in_band:
    pick2, rule = min(in_band, key=_val), "best val with median c in band"
  else:
    pick2 = min(s2, key=lambda r: (_band_distance(r["c_p50"], c_band), _val(r)))
    rule = "no δ* put median c in the band: nearest to it"
  delta = pick2["delta"]
  decisions["stage2"] = {"delta": delta, "rule": rule,
                         "candidates": [{k: r.get(k) for k in
                                         ("delta", "val_loss", "c_p50")} for r in s2]}

  # Stage 2b.
  arms = []
  for scale in lr_scales:
    scaled = sweeps.with_values(at_best, optim={"lr_scale": scale})
    tag = f"x{sweeps._fmt(scale)}"
    arms += [
        sweeps.Arm(f"s2b_{tag}_ebc_pi", ebc_cfg(scaled, delta, True),
                   {"stage": "2b", "lr_scale": scale, "ebc": 1, "delta": delta,
                    "controller": "on"}),
        sweeps.Arm(f"s2b_{tag}_ebc_fixed", ebc_cfg(scaled, delta, False),
                   {"stage": "2b", "lr_scale": scale, "ebc": 1, "delta": delta,
                    "controller": "off"}),
        sweeps.Arm(f"s2b_{tag}_baseline",
                   sweeps.with_values(scaled, optim={"clip": "none"}),
                   {"stage": "2b", "lr_scale": scale, "ebc": 0}),
    ]
  echo(f"# stage 2b: LR scales ({len(arms)} runs)")
  s2b = sweeps.run_arms(arms, out_dir / "stage2b", progress=progress)
  pi_rows = [r for r in s2b if r.get("controller") == "on"]
  in_band = [r for r in pi_rows if _band_distance(r["c_p50"], c_band) == 0]
  pick2b = min(in_band or pi_rows, key=_val)
  decisions["stage2b"] = {
      "lr_scale": pick2b["lr_scale"],
      "rule": "best val with median c in band" if in_band else "best val (none in band)",
      "table": [{k: r.get(k) for k in ("run", "val_loss", "c_p50", "diverged")}
                for r in s2b]}

  # Stage 3.
  full = sweeps.with_values(base, optim={"lr": best_lr})
  final_ebc = ebc_cfg(sweeps.with_values(full, optim={"lr_scale": pick2b["lr_scale"]}),
                      delta, True)
  arms = []
  for seed in seeds:
    arms.append(sweeps.Arm(
        f"final_baseline_s{seed}",
        sweeps.with_values(full, optim={"clip": "none"}, train={"seed": seed}),
        {"stage": "3", "optimizer": base.optim.optimizer, "ebc": 0, "seed": seed,
         "lr": best_lr, "lr_scale": 1.0}))
    arms.append(sweeps.Arm(
        f"final_ebc_d{sweeps._fmt(delta)}_x{sweeps._fmt(pick2b['lr_scale'])}_s{seed}",
        sweeps.with_values(final_ebc, train={"seed": seed}),
        {"stage": "3", "optimizer": base.optim.optimizer, "ebc": 1, "seed": seed,
         "delta": delta, "controller": "on", "lr": best_lr * pick2b["lr_scale"],
         "lr_scale": pick2b["lr_scale"]}))
  echo(f"# stage 3: finals ({len(arms)} runs)")
  s3 = sweeps.run_arms(arms, out_dir / "final", progress=progress)
  sweeps.write_tables(s3, out_dir, stem="summary_final", results_stem="results_final")
  plots.sweep_figures(out_dir / "final", [a.name for a in arms])
  for ebc in (0, 1):
    vals = [r["val_loss"] for r in s3 if r["ebc"] == ebc and r.get("val_loss") is not None]
    decisions.setdefault("stage3", {})["ebc" if ebc else "baseline"] = {
        "val_loss_mean": statistics.mean(vals) if vals else None,
        "val_loss_values": vals}
  (out_dir / "auto_decisions.json").write_text(json.dumps(decisions, indent=2) + "\n")
  echo(sweeps.render_table(s3))
  return decisions
