"""The seeds' runners: ``ablate``, ``shakespeare-ablation`` and ``autopilot``.

Every run of a sweep lives in its own directory under the sweep directory; a
run whose ``summary.json`` exists is not run again, so a killed sweep resumes
where it stopped (an interrupted run resumes from its last checkpoint).
CSV/JSON tables and figures are derived from the run directories.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import itertools
import json
import multiprocessing
import os
import pathlib
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from ebc_optax.experiments import config as config_lib
from ebc_optax.experiments import optim as optim_lib
from ebc_optax.experiments import plots
from ebc_optax.experiments import train as train_lib

SUMMARY_COLUMNS = (
    "run", "optimizer", "spectral", "clip", "ebc", "delta", "aggregate",
    "controller", "energy_ratio", "lr", "lr_scale", "seed", "status",
    "diverged", "steps", "val_loss", "val_acc", "val_ppl", "final_train_loss",
    "wall_s", "tokens_per_s", "accept_rate", "avg_c", "c_p10", "c_p50",
    "c_p90", "eta_eff_mean", "target_kl", "applied_kl_mean",
    "applied_kl_over_target_median", "applied_kl_within_30pct",
    "probe_fraction", "energy_clip_rate", "energy_ratio_max_median")
# The legacy ``--ebc off,on`` arms as clipping arms (``--clips``).
EBC_TO_CLIP = {"off": "none", "on": "ebc"}
SPECTRAL_ALIASES = {"spec": "spec_normalize", "none": "none",
                    "spec_normalize": "spec_normalize", "hard_cap": "hard_cap",
                    "spec_hammer": "spec_hammer"}


@dataclasses.dataclass(frozen=True)
class Arm:
  """One run of a sweep: a config plus the labels of the table row."""
  name: str
  cfg: config_lib.Config
  labels: dict[str, Any]


def with_values(cfg: config_lib.Config, **sections: dict[str, Any]) -> config_lib.Config:
  return config_lib.validate(config_lib.merge(cfg, sections))


def run_arms(arms: Sequence[Arm], out_dir: pathlib.Path, *,
             progress: bool = True, workers: int = 1) -> list[dict[str, Any]]:
  """Runs (or skips, when finished) every arm; returns table rows in order.

  With ``workers > 1`` the unfinished runs are trained by that many worker
  processes, each pinned to its own CPU core (one line per finished run
  instead of progress bars); the rows are the same either way.
  """
  out_dir.mkdir(parents=True, exist_ok=True)
  if workers > 1:
    todo = [a for a in arms if not (out_dir / a.name / "summary.json").exists()]
    if len(todo) > 1:
      _train_in_parallel(todo, out_dir, workers)
  dataset = None
  rows = []
  for i, arm in enumerate(arms):
    run_dir = out_dir / arm.name
    summary_path = run_dir / "summary.json"
    if summary_path.exists():
      _check_same_config(arm, run_dir)
      summary = json.loads(summary_path.read_text())
    else:
      if dataset is None or dataset.name != arm.cfg.data.dataset:
        dataset = train_lib.load_dataset(arm.cfg)
      cfg = dataclasses.replace(
          arm.cfg, log=dataclasses.replace(arm.cfg.log, progress=progress))
      summary = train_lib.train(cfg, run_dir, resume=True, dataset=dataset,
                                progress_prefix=f"[{i + 1}/{len(arms)}] {arm.name} ")
    rows.append({"run": arm.name, **arm.labels, **summary})
  return rows


def _pin_worker(counter, cores: Sequence[int], parent: int | None = None
                ) -> None:
  """Worker initializer: the n-th worker to start stays on ``cores[n]``, and
  exits when its parent ``parent`` (a pid) is gone (:func:`_exit_with_parent`)."""
  with counter.get_lock():
    n = counter.value
    counter.value += 1
  if cores and hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {cores[n % len(cores)]})
  if parent is not None:
    _exit_with_parent(parent)


def _exit_with_parent(parent: int, poll_s: float = 1.0) -> None:
  """Ends this process (``os._exit``) once ``parent`` is no longer its
  parent: a sweep killed while its workers train leaves no orphan holding a
  core and its memory (a killed pool's workers otherwise finish their run,
  then wait)."""
  def watch():
    while os.getppid() == parent:
      time.sleep(poll_s)
    os._exit(1)

  threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _train_one(cfg_dict: dict[str, Any], run_dir: str) -> dict[str, Any]:
  cfg = config_lib.from_dict(cfg_dict)
  cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, progress=False))
  return train_lib.train(cfg, run_dir, resume=True)


def _train_in_parallel(arms: Sequence[Arm], out_dir: pathlib.Path,
                       workers: int) -> None:
  """Trains ``arms`` in ``workers`` processes, one CPU core each.

  Separate processes rather than threads: XLA's CPU runtime then keeps each
  run on its core (on the 2-core VM two pinned runs finish in 1.2× the time
  of one, i.e. 1.7× the throughput; unpinned they contend).
  """
  ctx = multiprocessing.get_context("spawn")
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
  workers = max(1, min(workers, len(arms)))
  counter = ctx.Value("i", 0)
  with concurrent.futures.ProcessPoolExecutor(
      workers, mp_context=ctx, initializer=_pin_worker,
      initargs=(counter, cores, os.getpid())) as pool:
    futures = {pool.submit(_train_one, config_lib.to_dict(a.cfg),
                           str(out_dir / a.name)): a for a in arms}
    for k, future in enumerate(concurrent.futures.as_completed(futures), 1):
      summary = future.result()
      val = summary.get("val_loss")
      print(f"[{k}/{len(arms)}] {futures[future].name}: {summary.get('status')}"
            f" val {'-' if val is None else f'{val:.4f}'}"
            f" ({summary.get('wall_s', 0):.0f} s)", file=sys.stderr, flush=True)


def _check_same_config(arm: Arm, run_dir: pathlib.Path) -> None:
  """A finished run is reused only if it ran the config asked for now."""
  saved = config_lib.to_dict(config_lib.from_dict(
      json.loads((run_dir / "config.json").read_text())))
  wanted = config_lib.to_dict(arm.cfg)
  saved.pop("log", None), wanted.pop("log", None)  # progress bars, log cadence
  if (wanted["optim"].get("clip") in ("none", "global")
      and saved.get("optim", {}).get("clip") == wanted["optim"].get("clip")):
    # Unused without EBC: a change of the library's EBC defaults must not
    # invalidate the runs that never built it.
    saved.pop("ebc", None), wanted.pop("ebc", None)
  if saved != wanted:
    diff = sorted(f"{section}.{key}" for section in wanted
                  for key in wanted[section]
                  if saved.get(section, {}).get(key) != wanted[section][key])
    raise ValueError(
        f"{run_dir} holds a finished run with a different config ({', '.join(diff)} "
        "differ); a sweep directory is tied to its settings: use a new --out, "
        "or delete that run to redo it.")


def write_tables(rows: Sequence[dict[str, Any]], out_dir: pathlib.Path,
                 stem: str = "summary", results_stem: str = "results") -> None:
  with open(out_dir / f"{stem}.csv", "w", newline="", encoding="utf-8") as f:
    writer = csv.DictWriter(f, SUMMARY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  (out_dir / f"{results_stem}.json").write_text(json.dumps(list(rows), indent=2) + "\n")


def clip_arms(ebc: Sequence[str] | None = None,
              clips: Sequence[str] | None = None) -> list[str]:
  """The clipping arms of a sweep, from ``--clips`` or the older ``--ebc``.

  ``clips`` lists arms of ``optim.clip`` (``none``, ``global``, ``ebc``,
  ``energy``); ``ebc`` lists ``off``/``on`` (= ``none``/``ebc``). Give one of
  them; with neither, the arms are ``none`` and ``ebc``.

  Raises:
    ValueError: for both given, an unknown arm, or an empty list.
  """
  if ebc is not None and clips is not None:
    raise ValueError("--ebc and --clips both choose the clipping arms; give "
                     "one of them (--ebc off,on is --clips none,ebc).")
  if clips is None:
    ebc = ["off", "on"] if ebc is None else list(ebc)
    for arm in ebc:
      if arm not in EBC_TO_CLIP:
        raise ValueError(f"--ebc values must be 'off' or 'on'; got {arm!r}.")
    clips = [EBC_TO_CLIP[arm] for arm in ebc]
  clips = list(clips)
  for arm in clips:
    if arm not in tuple(optim_lib.CLIP_ARMS):
      raise ValueError(f"--clips values must be in {tuple(optim_lib.CLIP_ARMS)}; got {arm!r}.")
  if not clips:
    raise ValueError("--clips (or --ebc) must name at least one arm.")
  return clips


def _split(text: str) -> list[str]:
  return [t.strip() for t in text.split(",") if t.strip()]


def _fmt(x: float) -> str:
  return f"{x:g}"


# --- ablate --------------------------------------------------------------------

ABLATE_BASE = {
    "model": {"num_blocks": 2, "d_embed": 64, "num_heads": 4, "seq_len": 64},
    "data": {"dataset": "markov", "markov_train_tokens": 100_000,
             "markov_val_tokens": 10_000},
    "optim": {"lr": 3e-3},
    "train": {"steps": 150, "batch_size": 16, "eval_interval": 150,
              "eval_batches": 4},
    "log": {"log_interval": 50},
}
ABLATE_HEADER = ("optimizer,ebc,spectral,final_loss,final_acc,ebc_c,"
                 "entropy_floor,loss_minus_floor,avg_c,wall_s,clip")


def _ablate_name(opt: str, clip: str, spec: str) -> str:
  if clip in ("none", "ebc"):  # the reference runner's names
    return f"{opt}_ebc{int(clip == 'ebc')}_{spec}"
  return f"{opt}_{clip}_{spec}"


def ablate(out_dir: pathlib.Path, *, steps: int | None = None,
           sets: Iterable[str] = (), progress: bool = False,
           clips: Sequence[str] = ("none", "ebc"),
           echo=print) -> list[dict[str, Any]]:
  """adam/muon × clip arms × spectral none/spec on the offline Markov language.

  The clip arms default to EBC off/on (``none``, ``ebc``); ``global`` and
  ``energy`` may be added. Prints the reference header ``optimizer,ebc,
  spectral,final_loss,final_acc,ebc_c`` plus our columns, one line per run
  (``final_*`` are validation numbers at the end; ``ebc_c`` is the last
  step's c, ``avg_c`` the mean; ``clip`` the arm).
  """
  clips = clip_arms(clips=clips)
  base = config_lib.merge(config_lib.seeds_config(), ABLATE_BASE)  # seeds' EBC
  if steps is not None:
    base = with_values(base, train={"steps": steps, "eval_interval": steps})
  base = config_lib.validate(config_lib.merge(base, config_lib.parse_set(sets)))
  echo(ABLATE_HEADER)
  rows = []
  for opt, clip, spec in itertools.product(("adam", "muon"), clips, ("none", "spec")):
    ebc = int(clip == "ebc")
    cfg = with_values(base, optim={"optimizer": opt, "clip": clip,
                                   "spectral": SPECTRAL_ALIASES[spec]})
    arm = Arm(_ablate_name(opt, clip, spec), cfg, {})
    t0 = time.perf_counter()
    row = run_arms([arm], out_dir, progress=progress)[0]
    last_c = _last_metric(out_dir / arm.name, "c")
    floor = row.get("entropy_floor")
    loss = row["val_loss"]
    gap = (loss - floor) if loss is not None and floor is not None else None
    echo(",".join(str(v) for v in (
        opt, ebc, spec, _num(loss), _num(row["val_acc"]),
        _num(last_c if ebc else 1.0), _num(floor), _num(gap),
        _num(row["avg_c"]), f"{time.perf_counter() - t0:.1f}", clip)))
    rows.append(row)
  return rows


def _num(x: Any) -> str:
  return "nan" if x is None else f"{x:.4f}"


def _last_metric(run_dir: pathlib.Path, key: str) -> float | None:
  path = run_dir / "metrics.jsonl"
  if not path.exists():
    return None
  for line in reversed(path.read_text().splitlines()):
    record = json.loads(line)
    if key in record:
      return record[key]
  return None


# --- shakespeare-ablation --------------------------------------------------------

def shakespeare_arms(
    base: config_lib.Config, *, optimizers: Sequence[str], spectral: Sequence[str],
    deltas: Sequence[float], aggregates: Sequence[str],
    lrs: Sequence[float], lr_scales: Sequence[float], seeds: Sequence[int],
    controller: str, ebc: Sequence[str] | None = None,
    clips: Sequence[str] | None = None,
    energy_ratios: Sequence[float] | None = None) -> list[Arm]:
  """The grid of the reference runner; names follow its figure names.

  The clipping arms come from ``clips`` or ``ebc`` (see :func:`clip_arms`):
  ``none`` -> ``<opt>_<spec>_baseline``, ``global`` ->
  ``<opt>_<spec>_global<norm>``, ``ebc`` -> one run per (δ, aggregate)
  ``<opt>_<spec>_ebc_d<δ>_<agg>``, ``energy`` -> one run per ratio
  ``<opt>_<spec>_energy_r<ratio>`` (``energy_ratios``, default
  ``optim.energy_ratio`` of ``base``).
  """
  clips = clip_arms(ebc, clips)
  energy_ratios = (list(energy_ratios) if energy_ratios is not None
                   else [base.optim.energy_ratio])
  none_labels = {"ebc": 0, "delta": None, "aggregate": None, "controller": None,
                 "energy_ratio": None}
  arms = []
  multi = {"lr": len(lrs) > 1, "scale": len(lr_scales) > 1, "seed": len(seeds) > 1}
  for opt, spec, lr, scale, seed in itertools.product(
      optimizers, spectral, lrs, lr_scales, seeds):
    if spec not in SPECTRAL_ALIASES:
      raise ValueError(f"--spectral values must be in {sorted(SPECTRAL_ALIASES)}; "
                       f"got {spec!r}.")
    suffix = "".join([f"_lr{_fmt(lr)}" if multi["lr"] else "",
                      f"_x{_fmt(scale)}" if multi["scale"] else "",
                      f"_s{seed}" if multi["seed"] else ""])
    common = dict(optimizer=opt, spectral=spec, lr=lr * scale, lr_scale=scale,
                  seed=seed)
    optim = {"optimizer": opt, "spectral": SPECTRAL_ALIASES[spec], "lr": lr,
             "lr_scale": scale}
    for clip in clips:
      if clip == "none":
        cfg = with_values(base, optim={**optim, "clip": "none"}, train={"seed": seed})
        arms.append(Arm(f"{opt}_{spec}_baseline{suffix}", cfg,
                        {**common, "clip": clip, **none_labels}))
      elif clip == "global":
        cfg = with_values(base, optim={**optim, "clip": "global"}, train={"seed": seed})
        norm = _fmt(base.optim.global_clip_norm)
        arms.append(Arm(f"{opt}_{spec}_global{norm}{suffix}", cfg,
                        {**common, "clip": clip, **none_labels}))
      elif clip == "ebc":
        for delta, agg in itertools.product(deltas, aggregates):
          cfg = with_values(
              base, optim={**optim, "clip": "ebc"}, train={"seed": seed},
              ebc={"target_kl": delta, "aggregate": agg,
                   "controller": "pi" if controller == "on" else "none"})
          arms.append(Arm(f"{opt}_{spec}_ebc_d{_fmt(delta)}_{agg}{suffix}", cfg,
                          {**common, "clip": clip, **none_labels, "ebc": 1,
                           "delta": delta, "aggregate": agg,
                           "controller": controller}))
      else:  # energy
        for ratio in energy_ratios:
          cfg = with_values(base, optim={**optim, "clip": "energy",
                                         "energy_ratio": ratio},
                            train={"seed": seed})
          arms.append(Arm(f"{opt}_{spec}_energy_r{_fmt(ratio)}{suffix}", cfg,
                          {**common, "clip": clip, **none_labels,
                           "energy_ratio": ratio}))
  return arms


def shakespeare_ablation(base: config_lib.Config, out_dir: pathlib.Path,
                         progress: bool = True, echo=print, **grid) -> list[dict[str, Any]]:
  arms = shakespeare_arms(base, **grid)
  echo(f"# {len(arms)} runs -> {out_dir}")
  rows = run_arms(arms, out_dir, progress=progress)
  write_tables(rows, out_dir)
  plots.sweep_figures(out_dir, [a.name for a in arms])
  echo(render_table(rows))
  return rows


def render_table(rows: Sequence[dict[str, Any]]) -> str:
  """A compact text table of the main columns."""
  cols = ("run", "status", "val_loss", "val_ppl", "avg_c", "c_p50",
          "accept_rate", "applied_kl_mean", "eta_eff_mean", "tokens_per_s",
          "probe_fraction", "wall_s")
  buf = io.StringIO()
  buf.write(",".join(cols) + "\n")
  for r in rows:
    vals = []
    for c in cols:
      v = r.get(c)
      vals.append(f"{v:.4g}" if isinstance(v, float) else str(v))
    buf.write(",".join(vals) + "\n")
  return buf.getvalue().rstrip("\n")
