"""The spike suite (``ebc-optax spikes``): damage and recovery after a burst.

Mid-training, for :data:`~ebc_optax.experiments.study_design.BURST_STEPS` steps from
step :data:`~ebc_optax.experiments.study_design.BURST_START` on, the training batches
are corrupted or the learning rate spikes (the kinds of
:mod:`ebc_optax.experiments.bursts`). Every arm runs at LR ×1 of its base (as
in the study, whose tuning and no-burst runs it shares: use the same
``--out``), for every kind and seed, and its run without a burst — same arm,
same seed, so same initialisation and batches — is the reference. The clean
validation loss is evaluated just before the burst, right after it and at
:data:`~ebc_optax.experiments.study_design.BURST_EVAL_OFFSETS` steps after it.

Per arm and kind (``spikes.md``, ``spikes.csv``, ``spikes.png``):

* **jump** — val loss right after the burst minus the reference's at the same
  step (paired by seed; mean ± sd); **peak** — the largest such excess over
  the measured window (schedule-free's average moves little at first and
  follows its corrupted ``z`` sequence later); **vs Adam** — the peak over
  Adam's peak for the same kind (the bar: ≤ 5%);
* the excess over the reference 50 steps and 390 steps after the burst;
* **recovery** — steps after the burst until the excess is at most
  :data:`RECOVERY_TOL` (median over seeds; ``>390`` if never measured so);
* **final** — final val loss minus the reference's final val loss.

Resumable like the study: finished runs are read back, not rerun.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from ebc_optax.experiments import bursts
from ebc_optax.experiments import plots
from ebc_optax.experiments import study
from ebc_optax.experiments import study_design
from ebc_optax.experiments import study_stats
from ebc_optax.experiments import sweeps

KINDS = tuple(k for k in bursts.BURST_KINDS if k != "none")
RECOVERY_TOL = 0.02  # nats: "recovered" = within this of the no-burst run
EARLY_OFFSET = 40  # steps after the burst of the table's first excess column
EBC_PREFIXES = ("ebc", "fisher", "rel", "skip_")  # arm names drawn solid


def default_arms() -> list[str]:
  """Adam, EBC's default around it and the spike guards it is measured
  against (:func:`study_design.guard_arms`)."""
  return ["adam"] + [a.name for a in study_design.guard_arms()]


def run_spikes(out_dir: pathlib.Path, *, base: dict[str, Any] | None = None,
               steps: int | None = None, arms: Sequence[str] | None = None,
               kinds: Sequence[str] = KINDS,
               seeds: Sequence[int] = study_design.SEEDS,
               tune_lrs: Sequence[float] = study_design.TUNE_LRS,
               progress: bool = True, workers: int = 1,
               tune_extensions: int | None = None,
               finished_only: bool = False) -> dict[str, Any]:
  """Runs (or resumes) the spike suite and writes its tables and figure.

  Runs are ordered seed by seed (every arm and kind for seed 0 first), so a
  partial suite already covers every cell.

  Args:
    out_dir: the study directory (shared with ``ebc-optax study``).
    base: the base config mapping (default :data:`study_design.STUDY_BASE`; its
      ``train.burst_start``, ``burst_steps`` and ``eval_steps`` place the
      burst and the evaluations around it).
    steps: override ``train.steps``.
    arms: arm names (any of :func:`study_design.all_arms`; default the peers).
    kinds: burst kinds (default all of :data:`KINDS`).
    seeds: seeds (default 0, 1, 2).
    tune_lrs: the LRs of the tuning stage.
    progress: show progress bars.
    workers: train this many runs at once, one CPU core each.
    tune_extensions: as in :func:`study.tune`.
    finished_only: train nothing; tabulate the finished runs among those
      named (a partial suite, or arms measured on different seeds: name
      them all with every seed).

  Returns:
    ``{"rows": [...], "table": [...], "figure": path}``.
  """
  cfg = study._base_config(base or study_design.STUDY_BASE, steps)
  known = study_design.all_arms()
  names = list(arms) if arms is not None else default_arms()
  unknown = sorted(set(names) - set(known))
  bad_kinds = sorted(set(kinds) - set(KINDS))
  if unknown or bad_kinds:
    raise ValueError(
        f"unknown arm(s) {unknown} or burst kind(s) {bad_kinds}; arms: "
        f"{sorted(known)}, kinds: {list(KINDS)}.")
  if "adam" not in names:  # the jump is compared with Adam's
    names = ["adam"] + names
  chosen = [dataclasses.replace(known[n], lr_scales=(1.0,)) for n in names]
  out_dir.mkdir(parents=True, exist_ok=True)
  if finished_only:
    missing = [a.name for a in study.tune_arms(cfg, tune_lrs)
               if not (out_dir / a.name / "summary.json").exists()]
    if missing:
      raise ValueError(
          f"finished_only: the LR-tuning runs {missing} are not finished in "
          f"{out_dir}; run the suite without it first.")
  lrs, _ = study.tune(cfg, out_dir, {a.base for a in chosen}, tune_lrs,
                      progress, workers, tune_extensions)
  runs = []
  total = cfg.train.steps
  start = cfg.train.burst_window[0]
  for seed in seeds:
    for kind in ("none",) + tuple(kinds):
      found = study.study_arms(cfg, lrs, chosen, (seed,), burst=kind)
      if kind != "none":  # evaluated where its kind is measured only
        points = bursts.eval_points(kind, start, cfg.train.burst_steps,
                                    study_design.BURST_EVAL_OFFSETS, total)
        found = [dataclasses.replace(a, cfg=sweeps.with_values(
            a.cfg, train={"eval_steps": list(points)})) for a in found]
      runs += found
  if finished_only:
    runs = [a for a in runs if (out_dir / a.name / "summary.json").exists()]
    if not runs:
      raise ValueError(f"finished_only: no finished run of these arms, kinds "
                       f"and seeds in {out_dir}.")
  rows = sweeps.run_arms(runs, out_dir, progress=progress, workers=workers)
  return spike_report(out_dir, cfg, rows)


def _evals(row: dict[str, Any]) -> dict[int, float]:
  out = {}
  for step, val in row.get("evals", []):
    out[int(step)] = math.inf if val is None or row.get("diverged") else float(val)
  return out


def burst_metrics(run: dict[str, Any], ref: dict[str, Any], *, start: int,
                  steps: int, offsets: Sequence[int],
                  kind: str = "random") -> dict[str, Any]:
  """Paired numbers of one burst run against its no-burst reference.

  ``steps`` is the window's length (first to last bad step); *peak* is the
  largest excess at any evaluation from ``start`` on (inside the window and
  after it); *decisions* count what the guard did on the bad steps and on
  the clean steps inside the window (``burst_decisions`` of the run)."""
  ev, ev_ref = _evals(run), _evals(ref)
  end = start + steps - 1

  def excess(step):
    if step not in ev or step not in ev_ref:
      return None
    return ev[step] - ev_ref[step]

  excesses = {k: excess(end + k) for k in offsets}
  measured = [excess(p) for p in ev if p >= start]
  measured = [x for x in measured if x is not None]
  recovery = next((k for k in offsets if excesses[k] is not None
                   and excesses[k] <= RECOVERY_TOL), None)
  final = (study_stats.val(run) - study_stats.val(ref))
  decisions = list(run.get("burst_decisions") or [])
  bad = {s - start for s in bursts.bad_steps(kind, start, steps)}
  on_bad = [d for i, d in enumerate(decisions) if i in bad]
  on_clean = [d for i, d in enumerate(decisions) if i not in bad]
  return {"before": ev.get(start - 1), "after": ev.get(end),
          "jump": excesses.get(0), "excess": excesses,
          "peak": max(measured) if measured else None,
          "recovery": recovery, "final_excess": final,
          "decisions": decisions,
          "bad_skipped": (sum(d == 2 for d in on_bad), len(on_bad)),
          "bad_clipped": (sum(d == 1 for d in on_bad), len(on_bad)),
          "clean_skipped": (sum(d == 2 for d in on_clean), len(on_clean))}


def run_length(decisions: Sequence[int]) -> str:
  """``[2, 2, 0, 0, 0]`` → ``"2×2 0×3"`` (0 passed, 1 clipped, 2 skipped)."""
  out: list[list[int]] = []
  for d in decisions:
    if out and out[-1][0] == d:
      out[-1][1] += 1
    else:
      out.append([d, 1])
  return " ".join(f"{d}×{n}" for d, n in out) or "—"


def spike_table(cfg, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """One row per (arm, kind): the paired metrics averaged over seeds."""
  start = cfg.train.burst_window[0]
  offsets = study_design.BURST_EVAL_OFFSETS
  refs = {(r["arm"], r["seed"]): r for r in rows if r.get("burst", "none") == "none"}
  cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
  for r in rows:
    kind = r.get("burst", "none")
    if kind == "none" or (r["arm"], r["seed"]) not in refs:
      continue
    m = burst_metrics(r, refs[(r["arm"], r["seed"])], start=start,
                      steps=bursts.burst_length(kind, cfg.train.burst_steps),
                      offsets=offsets, kind=kind)
    cells.setdefault((r["arm"], kind), []).append({**m, "seed": r["seed"]})
  table = []
  for (arm, kind), ms in cells.items():
    def stat(values):
      xs = [x for x in values if x is not None]
      if not xs:
        return None, None
      if not all(math.isfinite(x) for x in xs):
        return math.inf, 0.0
      return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0

    rec = [m["recovery"] for m in ms]

    def share(key):
      num, den = (sum(m[key][i] for m in ms) for i in (0, 1))
      return num / den if den else None

    table.append({
        "arm": arm, "kind": kind, "seeds": len(ms),
        "before": stat([m["before"] for m in ms])[0],
        "after": stat([m["after"] for m in ms])[0],
        "jump": stat([m["jump"] for m in ms]),
        "peak": stat([m["peak"] for m in ms]),
        "excess_early": stat([m["excess"].get(EARLY_OFFSET) for m in ms]),
        "excess_last": stat([m["excess"].get(offsets[-1]) for m in ms]),
        # Not recovered within the window counts as +inf in the median.
        "recovery_median": float(np.median(
            [math.inf if x is None else x for x in rec])),
        "recovered": sum(x is not None for x in rec),
        "final_excess": stat([m["final_excess"] for m in ms]),
        "bad_skipped": share("bad_skipped"),
        "bad_clipped": share("bad_clipped"),
        "clean_skipped_in_window": sum(m["clean_skipped"][0] for m in ms),
        "decisions_first_seed": run_length(ms[0]["decisions"]),
        "peaks": {int(m["seed"]): m["peak"] for m in ms if m["peak"] is not None},
    })
  adam = {t["kind"]: t["peaks"] for t in table if t["arm"] == "adam"}
  for t in table:
    t["peak_vs_adam"] = vs_adam(t["peaks"], adam.get(t["kind"], {}))
  return sorted(table, key=lambda t: (KINDS.index(t["kind"]), t["arm"]))


def vs_adam(peaks: dict[int, float], adam: dict[int, float]) -> float | None:
  """The mean peak over Adam's mean peak on the same seeds (None when they
  share none, Adam's is not positive or the peak is not finite).

  Example:
    >>> vs_adam({0: 0.1, 1: 0.3}, {0: 1.0, 1: 3.0, 2: 9.0})
    0.1
  """
  seeds = sorted(set(peaks) & set(adam))
  if not seeds:
    return None
  peak = float(np.mean([peaks[s] for s in seeds]))
  ref = float(np.mean([adam[s] for s in seeds]))
  return peak / ref if ref > 0 and math.isfinite(peak) else None


def versus_best_peer(table: Sequence[dict[str, Any]], arm: str = "ebc_default"
                     ) -> list[dict[str, Any]]:
  """Per kind, ``arm`` against the best peer: the arm outside EBC
  (:data:`EBC_PREFIXES`, and Adam) with the lowest mean peak.

  The peaks are paired by seed (the seeds both have): ``diff`` is the mean
  of ``arm``'s minus the peer's, ``noise`` the seed noise, the larger
  standard deviation over seeds of the two arms' peaks. The verdict is
  ``better or equal`` for ``diff <= 0``, ``tie (within noise)`` for
  ``0 < diff <= noise``, else ``worse``.
  """
  cells = {(t["arm"], t["kind"]): t for t in table}
  out = []
  for kind in KINDS:
    mine = cells.get((arm, kind))
    if mine is None:
      continue
    peers = [t for t in table if t["kind"] == kind and t["arm"] != "adam"
             and not t["arm"].startswith(EBC_PREFIXES)
             and t["peak"][0] is not None and math.isfinite(t["peak"][0])]
    if not peers:
      continue
    best = min(peers, key=lambda t: t["peak"][0])
    seeds = sorted(set(mine["peaks"]) & set(best["peaks"]))
    if not seeds:
      continue
    a = np.array([mine["peaks"][s] for s in seeds], float)
    b = np.array([best["peaks"][s] for s in seeds], float)
    diff = float(np.mean(a - b))
    noise = (max(float(np.std(a, ddof=1)), float(np.std(b, ddof=1)))
             if len(seeds) > 1 else 0.0)
    verdict = ("worse" if not math.isfinite(diff) else
               "better or equal" if diff <= 0 else
               "tie (within noise)" if diff <= noise else "worse")
    out.append({"kind": kind, "arm": arm, "vs_adam": mine["peak_vs_adam"],
                "peer": best["arm"], "peer_vs_adam": best["peak_vs_adam"],
                "seeds": len(seeds), "diff": diff, "noise": noise,
                "verdict": verdict})
  return out


def versus_markdown(rows: Sequence[dict[str, Any]]) -> str:
  def pct(x):
    return "—" if x is None else f"{x:.1%}"
  arm = rows[0]["arm"] if rows else "ebc_default"
  lines = [f"`{arm}` against the best peer per kind (the guard outside EBC "
           "with the lowest mean peak): the paired difference of the peaks "
           "(nats, mean over the seeds both have) and the seed noise (the "
           "larger sd over seeds of the two arms' peaks); a difference under "
           "the noise is a tie:", "",
           f"| kind | {arm} vs Adam | best peer | its vs Adam | seeds "
           "| difference | noise | verdict |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['kind']} | {pct(r['vs_adam'])} | {r['peer']} "
                 f"| {pct(r['peer_vs_adam'])} | {r['seeds']} | {r['diff']:+.4f} "
                 f"| {r['noise']:.4f} | {r['verdict']} |")
  return "\n".join(lines) + "\n"


def _pm(x: tuple[float | None, float | None]) -> str:
  mean, sd = x
  if mean is None:
    return "—"
  if not math.isfinite(mean):
    return "div."
  return f"{mean:+.3f} ± {sd:.3f}"


def _share(x: float | None) -> str:
  return "—" if x is None else f"{x:.0%}"


def markdown(table: Sequence[dict[str, Any]], cfg) -> str:
  start = cfg.train.burst_window[0]
  last = study_design.BURST_EVAL_OFFSETS[-1]
  lines = [
      f"Bursts from step {start} of {cfg.train.steps} (LR ×"
      f"{cfg.train.burst_lr_factor:g} for the `lr` kind; windows in "
      "`ebc_optax.experiments.bursts`). Clean val loss; *jump* (right after "
      f"the last bad step), *peak*, *+{EARLY_OFFSET}*, *+{last}* and *final* "
      "are paired differences to the same arm and seed without the burst "
      "(mean ± sd over seeds; *peak* is the largest at any evaluation from the "
      "first bad step on); *vs Adam* is the peak over Adam's peak; *recovery* "
      f"the median steps after the last bad step until the excess is ≤ "
      f"{RECOVERY_TOL} nats (*>{last}* when not within the measured window); "
      "*bad skipped / clipped*: the share of bad steps the guard skipped "
      "(refused) or scaled; *clean skipped*: clean steps inside the window it "
      "skipped (all seeds).", "",
      "| kind | arm | seeds | jump | peak | vs Adam "
      f"| +{EARLY_OFFSET} | +{last} | recovery (steps) | final "
      "| bad skipped | bad clipped | clean skipped |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for t in table:
    rec = t["recovery_median"]
    rec_text = f">{last}" if not math.isfinite(rec) else f"{rec:g}"
    vs = t["peak_vs_adam"]
    lines.append(
        f"| {t['kind']} | {t['arm']} | {t['seeds']} | {_pm(t['jump'])} "
        f"| {_pm(t['peak'])} "
        f"| {'—' if vs is None else f'{vs:.1%}'} | {_pm(t['excess_early'])} "
        f"| {_pm(t['excess_last'])} | {rec_text} | {_pm(t['final_excess'])} "
        f"| {_share(t.get('bad_skipped'))} | {_share(t.get('bad_clipped'))} "
        f"| {t.get('clean_skipped_in_window', 0)} |")
  return "\n".join(lines) + "\n"


def decisions_markdown(table: Sequence[dict[str, Any]]) -> str:
  """Per arm and kind, the guard's decision on every step of the window
  (first seed; run-length coded, 0 passed, 1 clipped, 2 skipped)."""
  lines = ["Decisions inside the window, first seed (0 passed, 1 scaled or "
           "clipped, 2 skipped or refused; run-length coded):", "",
           "| kind | arm | decisions |", "|---|---|---|"]
  for t in table:
    lines.append(f"| {t['kind']} | {t['arm']} | {t.get('decisions_first_seed', '—')} |")
  return "\n".join(lines) + "\n"


def clean_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per arm, over its runs without a burst: the share of steps its guard
  skipped (false refusals) and scaled, and the final val loss."""
  cells: dict[str, list[dict[str, Any]]] = {}
  for r in rows:
    if r.get("burst", "none") == "none" and r.get("arm") not in (None, "tune"):
      cells.setdefault(r["arm"], []).append(r)
  out = []
  for arm, rs in sorted(cells.items()):
    steps = sum(max(int(r.get("steps", 0)), 1) for r in rs)
    vals = [study_stats.val(r) for r in rs]
    out.append({"arm": arm, "seeds": len(rs),
                "skipped": sum(int(r.get("guard_skipped", 0)) for r in rs) / steps,
                "clipped": sum(int(r.get("guard_clipped", 0)) for r in rs) / steps,
                "val_loss": float(np.mean(vals)),
                "val_sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0})
  return out


def clean_markdown(clean: Sequence[dict[str, Any]]) -> str:
  lines = ["Clean runs (no burst): the share of steps each guard skipped (a "
           "false refusal) or scaled, and the final val loss (mean ± sd over "
           "seeds):", "",
           "| arm | seeds | skipped | scaled | final val loss |",
           "|---|---|---|---|---|"]
  for c in clean:
    lines.append(f"| {c['arm']} | {c['seeds']} | {c['skipped']:.2%} "
                 f"| {c['clipped']:.1%} | {c['val_loss']:.4f} ± {c['val_sd']:.4f} |")
  return "\n".join(lines) + "\n"


def bar_b_markdown(table: Sequence[dict[str, Any]], limit: float = 0.05) -> str:
  """Per arm, the peak damage over Adam's for every kind, against the bar:
  at most ``limit`` of Adam's on every kind (a diverged cell is a miss)."""
  kinds = [k for k in KINDS if any(t["kind"] == k for t in table)]
  cells = {(t["arm"], t["kind"]): t for t in table}
  arms = sorted({t["arm"] for t in table if t["arm"] != "adam"})
  lines = [f"Which spike guard: peak damage as a share of Adam's, per burst "
           f"kind (mean over seeds; the bar: at most {limit:.0%} on every kind):",
           "", "| arm | " + " | ".join(kinds) + f" | worst | ≤ {limit:.0%} |",
           "|---|" + "---|" * (len(kinds) + 2)]
  for arm in arms:
    ratios = []
    for kind in kinds:
      t = cells.get((arm, kind))
      peak = None if t is None else t["peak"][0]
      final = None if t is None else t["final_excess"][0]
      if t is None:
        ratios.append(None)
      elif ((peak is not None and not math.isfinite(peak))
            or (final is not None and not math.isfinite(final))):
        ratios.append(math.inf)  # diverged
      else:
        ratios.append(t["peak_vs_adam"])
    shown = ["—" if r is None else ("div." if not math.isfinite(r) else f"{r:.1%}")
             for r in ratios]
    known = [r for r in ratios if r is not None]
    worst = max(known) if known else None
    meets = ("—" if len(known) < len(kinds) else
             "yes" if worst is not None and worst <= limit else "no")
    worst_text = ("—" if worst is None else
                  "div." if not math.isfinite(worst) else f"{worst:.1%}")
    lines.append(f"| {arm} | " + " | ".join(shown) + f" | {worst_text} | {meets} |")
  return "\n".join(lines) + "\n"


def _n(x: float | None) -> str:
  return "—" if x is None else ("div." if not math.isfinite(x) else f"{x:.4f}")


def figure(out_dir: pathlib.Path, cfg, rows: Sequence[dict[str, Any]]
           ) -> pathlib.Path | None:
  """Per kind, the excess val loss over the no-burst run vs step (mean over
  seeds), one line per arm."""
  start = cfg.train.burst_window[0]
  refs = {(r["arm"], r["seed"]): _evals(r) for r in rows
          if r.get("burst", "none") == "none"}
  kinds = [k for k in KINDS if any(r.get("burst") == k for r in rows)]
  if not kinds:
    return None
  plt = plots._pyplot()
  arms = sorted({r["arm"] for r in rows})
  colors = {a: plt.cm.tab20(i % 20) for i, a in enumerate(arms)}
  fig, axes = plt.subplots(1, len(kinds), figsize=(3.4 * len(kinds), 3.6),
                           sharey=True, squeeze=False)
  for ax, kind in zip(axes[0], kinds):
    for arm in arms:
      curves: dict[int, list[float]] = {}
      for r in rows:
        if r["arm"] != arm or r.get("burst") != kind or (arm, r["seed"]) not in refs:
          continue
        ref = refs[(arm, r["seed"])]
        for step, val in _evals(r).items():
          if step >= start - 1 and step in ref:
            curves.setdefault(step, []).append(val - ref[step])
      if curves:
        xs = sorted(curves)
        ys = [float(np.mean(curves[x])) for x in xs]
        ax.plot(xs, ys, marker="o", ms=2.5, lw=1, label=arm, color=colors[arm],
                ls="--" if not arm.startswith(EBC_PREFIXES) else "-")
    steps = bursts.burst_length(kind, cfg.train.burst_steps)
    ax.axvspan(start, start + steps - 1, color="0.85", lw=0)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_yscale("symlog", linthresh=0.01)
    ax.set_title(kind)
    ax.set_xlabel("step")
  axes[0][0].set_ylabel("val loss − same run without burst (nats)")
  axes[0][-1].legend(fontsize=6)
  return plots.save(fig, out_dir / "spikes.png")


def spike_report(out_dir: pathlib.Path, cfg, rows: Sequence[dict[str, Any]]
                 ) -> dict[str, Any]:
  table = spike_table(cfg, rows)
  clean = clean_table(rows)
  (out_dir / "spikes.md").write_text(
      "# Spike suite\n\n" + bar_b_markdown(table) + "\n"
      + versus_markdown(versus_best_peer(table)) + "\n" + clean_markdown(clean)
      + "\n" + markdown(table, cfg) + "\n" + decisions_markdown(table))
  (out_dir / "spikes.json").write_text(json.dumps(
      {"bursts": table, "clean": clean, "versus": versus_best_peer(table)},
      indent=2) + "\n")
  sweeps.write_tables(rows, out_dir, stem="spikes", results_stem="spike_runs")
  path = figure(out_dir, cfg, rows)
  return {"rows": list(rows), "table": table,
          "figure": None if path is None else str(path)}
