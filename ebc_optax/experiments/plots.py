"""Figures derived from run directories (``metrics.jsonl`` / ``summary.json``)."""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Sequence
from typing import Any


def _pyplot():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save(fig, path: pathlib.Path) -> pathlib.Path:
  """Lays out, writes (100 dpi) and closes ``fig``; returns ``path``."""
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  _pyplot().close(fig)
  return path


def read_metrics(run_dir: pathlib.Path) -> list[dict[str, Any]]:
  path = pathlib.Path(run_dir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line]


def run_figures(run_dir: pathlib.Path, out_dir: pathlib.Path | None = None,
                name: str | None = None) -> list[pathlib.Path]:
  """``<name>_loss.png`` (train/val loss) and, for EBC runs, ``<name>_clip.png``
  (c, applied KL vs δ*, δ)."""
  run_dir = pathlib.Path(run_dir)
  out_dir = pathlib.Path(out_dir or run_dir)
  name = name or run_dir.name
  records = read_metrics(run_dir)
  if not records:
    return []
  plt = _pyplot()
  written = []
  fig, ax = plt.subplots(figsize=(6, 4))
  steps = [r["step"] for r in records if r.get("train_loss") is not None]
  ax.plot(steps, [r["train_loss"] for r in records if r.get("train_loss") is not None],
          label="train")
  val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
  if val:
    ax.plot(*zip(*val), "o-", label="val")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats/token)")
  ax.set_title(name)
  ax.legend()
  written.append(save(fig, out_dir / f"{name}_loss.png"))
  ebc = [r for r in records if "c" in r]
  if ebc:
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6, 6), sharex=True)
    s = [r["step"] for r in ebc]
    ax1.plot(s, [r["c"] for r in ebc], label="c (applied scale)")
    ax1.set_ylim(0, 1.05)
    ax1.set_ylabel("c")
    ax1.set_title(name)
    probed = [(r["step"], max(r["applied_kl"], 1e-12)) for r in ebc
              if r.get("applied_kl") is not None]
    if probed:  # null before the first probe, absent without a probe
      ax2.semilogy(*zip(*probed), label="applied KL (last probe)")
    ax2.semilogy(s, [r["delta"] for r in ebc], label="δ used")
    ax2.set_xlabel("step")
    ax2.set_ylabel("nats/token")
    ax2.legend()
    written.append(save(fig, out_dir / f"{name}_clip.png"))
  return written


def pareto(rows: Sequence[dict[str, Any]], path: pathlib.Path) -> pathlib.Path | None:
  """Validation perplexity against the average clip factor, one point per run."""
  pts = [(r.get("avg_c", 1.0), r["val_ppl"], r["run"]) for r in rows
         if r.get("val_ppl") is not None and math.isfinite(r["val_ppl"])]
  if not pts:
    return None
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for c, ppl, name in pts:
    ax.scatter(c, ppl)
    ax.annotate(name, (c, ppl), fontsize=6)
  ax.set_xlabel("average c")
  ax.set_ylabel("validation perplexity")
  return save(fig, path)


def sweep_figures(sweep_dir: pathlib.Path, names: Sequence[str]) -> list[pathlib.Path]:
  """Per-run figures into the sweep directory plus ``pareto_ppl_vs_avgc.png``."""
  sweep_dir = pathlib.Path(sweep_dir)
  written = []
  rows = []
  for name in names:
    written += run_figures(sweep_dir / name, sweep_dir, name)
    summary = sweep_dir / name / "summary.json"
    if summary.exists():
      rows.append({"run": name, **json.loads(summary.read_text())})
  p = pareto(rows, sweep_dir / "pareto_ppl_vs_avgc.png")
  return written + ([p] if p else [])


def redraw(path: pathlib.Path) -> list[pathlib.Path]:
  """``ebc-optax plot DIR``: a run directory or a sweep directory."""
  path = pathlib.Path(path)
  if (path / "metrics.jsonl").exists():
    return run_figures(path)
  names = sorted(p.name for p in path.iterdir() if (p / "metrics.jsonl").exists())
  if not names:
    raise FileNotFoundError(f"No run directories (with metrics.jsonl) in {path}.")
  return sweep_figures(path, names)
