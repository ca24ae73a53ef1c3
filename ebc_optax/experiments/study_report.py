"""The study's report: ``study.md`` (tables), ``study.csv`` / ``study.json``
and the figures, from finished runs."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from ebc_optax.experiments import plots
from ebc_optax.experiments import study_design as design
from ebc_optax.experiments import study_stats as stats
from ebc_optax.experiments import sweeps


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
  """Each arm run at every LR scale of :data:`design.LR_SCALES` against bar (a):
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
    if not all(x in per_scale for x in design.LR_SCALES):
      continue
    ss = [per_scale[x] for x in design.LR_SCALES]
    base = ss[0].get("base", "adam")
    worst = _worst(ss)
    ratio = worst / baseline
    own = base_x1.get(base if base != "adam" else "adam")
    own_ratio = worst / own if base in design.LR_FREE_LR and own else None
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
                       baseline: float | None, prefix: str = design.TR_PREFIX) -> str:
  """The trust-region arms named ``prefix + start δ`` against the best
  fixed-δ Fisher run at each LR."""
  rows = {(s["arm"], s["lr_scale"]): s for s in summary}
  starts = [f"{prefix}{d:g}" for d in design.TRUST_REGION_STARTS]
  fixed = [f"fisher_d{d:g}" for d in design.FISHER_DELTAS]
  if not any((a, 1.0) in rows for a in starts):
    return ""
  lines = ["| LR | best fixed-δ Fisher (δ) | " + " | ".join(
      f"start δ={d:g}" for d in design.TRUST_REGION_STARTS)
      + " | worst start / best fixed | worst start / baseline ×1 |",
      "|---|---|" + "---|" * (len(starts) + 2)]
  for x in design.LR_SCALES:
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


def _style(arm: str) -> str:
  return "--" if arm.startswith("fisher_tr") else "-"


def _val_vs_lr_figure(plt, path, summary, main, colors, baseline):
  fig, ax = plt.subplots(figsize=(8, 5))
  for arm in sorted(main):
    ss = sorted((s for s in summary if s["arm"] == arm), key=lambda s: s["lr_scale"])
    xs = [s["lr_scale"] for s in ss]
    ys = [s["val_loss_mean"] if s["val_loss_mean"] is not None and not s["diverged"]
          else np.nan for s in ss]
    err = [s["val_loss_spread"] or 0.0 for s in ss]
    ax.errorbar(xs, ys, yerr=err, marker="o", ms=4, capsize=3, label=arm,
                color=colors[arm], ls=_style(arm))
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
  return plots.save(fig, path)


def _curves_figure(plt, out_dir, scale, rows, main, colors, baseline):
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
            ls=_style(r["arm"]))
  ax.set_xlabel("step")
  ax.set_ylabel("train loss (moving average of 10 logs)")
  ax.set_title(f"LR ×{scale:g}, seed 0")
  if baseline is not None:
    ax.set_ylim(baseline - 0.2, baseline + 1.0)
  if ax.lines:
    ax.legend(fontsize=7, ncol=2)
  return plots.save(fig, out_dir / f"curves_x{scale:g}.png")


def _tr_delta_figure(plt, out_dir, tr_rows):
  fig, axes = plt.subplots(1, len(design.LR_SCALES), figsize=(12, 3.6), sharey=True)
  axes = np.atleast_1d(axes)
  for ax, scale in zip(axes, design.LR_SCALES):
    for r in sorted(tr_rows, key=lambda r: r["arm"]):
      if float(r["lr_scale"]) != scale:
        continue
      ms = [m for m in _run_metrics(out_dir, r["run"]) if "delta" in m]
      if ms:
        ax.plot([m["step"] for m in ms], [m["delta"] for m in ms], lw=1,
                label=r["arm"].replace(design.TR_PREFIX, "start δ="))
    for d in design.FISHER_DELTAS:
      ax.axhline(d, color="0.6", lw=0.6, ls=":")
    ax.set_yscale("log")
    ax.set_title(f"LR ×{scale:g}")
    ax.set_xlabel("step")
  axes[0].set_ylabel("δ (nats/token)")
  axes[0].legend(fontsize=7)
  fig.suptitle("trust-region radius δ over training (seed 0; dotted: the "
               "fixed-δ arms)", fontsize=9)
  return plots.save(fig, out_dir / "tr_delta.png")


def figures(out_dir: pathlib.Path, rows: Sequence[dict[str, Any]],
            summary: Sequence[dict[str, Any]], baseline: float | None) -> list[pathlib.Path]:
  """val loss vs LR scale per arm; train-loss curves at ×2 and ×4; δ of the
  trust-region arm over training."""
  plt = plots._pyplot()
  rows = [r for r in rows if r.get("burst", "none") == "none"]
  main = {s["arm"] for s in summary
          if all(any(t["arm"] == s["arm"] and t["lr_scale"] == x for t in summary)
                 for x in design.LR_SCALES) or s["arm"] == "energy"}
  # tab20: the 10-colour default cycle repeats with this many arms.
  colors = {arm: plt.cm.tab20(i % 20) for i, arm in enumerate(sorted(main))}
  paths = [_val_vs_lr_figure(plt, out_dir / "val_vs_lr.png", summary, main,
                             colors, baseline)]
  paths += [_curves_figure(plt, out_dir, scale, rows, main, colors, baseline)
            for scale in (2.0, 4.0)]
  tr_rows = [r for r in rows if str(r.get("arm", "")).startswith(design.TR_PREFIX)
             and r["seed"] == 0]
  if tr_rows:
    paths.append(_tr_delta_figure(plt, out_dir, tr_rows))
  return paths


def report(out_dir: pathlib.Path, lrs: dict[str, float] | float,
           tune_rows: Sequence[dict[str, Any]],
           rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """Writes study.csv/json/md and the figures from finished runs."""
  if isinstance(lrs, (int, float)):
    lrs = {"adam": float(lrs)}
  summary = stats.aggregate(rows)
  baseline = stats.baseline_of(summary)
  ref_arm = "adam" if any(s["arm"] == "adam" for s in summary) else "none"
  paired = stats.paired_differences(rows, ref_arm)
  sweeps.write_tables(list(tune_rows) + list(rows), out_dir, stem="study",
                      results_stem="study_runs")
  text = ["# Study", ""]
  for b in design.TUNED_BASES:
    tuned = [r for r in tune_rows if r.get("base", "adam") == b]
    if tuned:
      text += [f"## LR tuning ({b}, no clipping, seed 0)", "",
               "| LR | final val loss |", "|---|---|"]
      text += [f"| {r['lr']:g} | {_n(r.get('val_loss'))} |" for r in tuned]
      text += [""]
  floor = stats.noise_floor(rows)
  text += ["## Arms", "", markdown(summary, baseline, lrs, paired)]
  if floor:
    text += [f"Noise floor: Adam ×1 over {floor['adam_x1_seeds']} seeds has sd "
             f"{floor['adam_x1_sd']:.4f}; paired differences to Adam ×1 have a "
             f"median sd of {floor['paired_sd_median']:.4f} over the cells with "
             "more than one seed. A difference smaller than about twice that "
             "is not resolved.", ""]
  for prefix, title in ((design.TR_PREFIX, "‖J ΔW‖ every step on B/4"),
                        (design.TR_CHEAP_PREFIX, "‖J ΔW‖ every 4th step on B/8")):
    tr = trust_region_table(summary, baseline, prefix)
    if tr:
      text += [f"## Trust-region radius vs the best fixed δ ({title})", "", tr]
  knob_text = []
  for title, arms in design.knob_families():
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
