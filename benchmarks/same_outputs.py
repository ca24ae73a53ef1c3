"""Do two revisions give the same results? Every ``ebc-optax`` command, compared.

A reorganisation promises that every command gives the same results on the
same seeds. This script checks it: it exports ``ebc_optax/`` and ``configs/``
of each ``--revisions`` entry with ``git archive``, runs the same jobs in each
(one child process per job, that export first on ``PYTHONPATH`` and as the
working directory) and compares what they wrote:

* every ``.json``, ``.jsonl`` and ``.csv`` file under the job's output folder,
  value by value (numbers: the largest absolute difference; other values:
  equal or not), leaving out what differs between any two runs — wall times,
  throughput, dates, paths and the package version;
* every ``.png`` figure there, byte by byte (both revisions draw with the
  same matplotlib);
* the job's standard output where the job's results are printed there
  (``ablate``'s CSV, ``sample``'s text), with the same columns left out.

The jobs are the README's main command (``ebc-optax ablate`` at its preset),
``train`` (with a checkpoint) and ``sample`` from it, ``shakespeare-ablation``,
``autopilot``, ``study`` and the spike suite, each at a small size.
``shakespeare-ablation``, ``study`` and ``spikes`` read Tiny Shakespeare from
``$EBC_OPTAX_DATA``. Prints one row per job and file, then ``same`` or
``DIFFERENT`` overall (exit status 1 when different).

Run:  EBC_OPTAX_DATA=path/to/tinyshakespeare.txt \\
      python benchmarks/same_outputs.py --revisions da94842 HEAD
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import tempfile

from revisions import export  # benchmarks/revisions.py: this script's folder

# Keys that differ between any two runs of the same code.
# (probe_fraction is a share of wall time, durations are wall times.)
VOLATILE = re.compile(r"wall|time|tokens_per_s|steps_per_s|date|path|dir$|"
                      r"version|elapsed|seconds|_s$|durations|probe_fraction",
                      re.I)
COMPARED = (".json", ".jsonl", ".csv", ".png")
CLI = "import sys; from ebc_optax.experiments import cli; sys.exit(cli.main(sys.argv[1:]))"
SPIKES = """
import json, pathlib, sys
from ebc_optax.experiments import spikes
try:
  from ebc_optax.experiments import study_design as where
except ImportError:  # before the study was split into design, stats and report
  from ebc_optax.experiments import study as where
where.BURST_EVAL_OFFSETS = (0, 1, 2, 4)
base = json.loads(pathlib.Path("configs/smoke.json").read_text())
base["optim"]["clip"] = "none"
base["train"].update(steps=16, eval_interval=16, checkpoint_every=0,
                     burst_start=5, burst_steps=2, eval_steps=[4, 6, 7, 8, 10])
spikes.run_spikes(pathlib.Path(sys.argv[1]), base=base, arms=("adam", "ebc_adam"),
                  kinds=("repeat", "lr"), seeds=(0,), tune_lrs=(3e-3,),
                  tune_extensions=0, progress=False)
"""
# name -> (python code, arguments ({out}: the job's output folder, {root}:
#          the folder of every job's output), what its
#          stdout holds ("csv", "text" or None: nothing compared), whether it
#          reads Tiny Shakespeare)
JOBS = {
    "ablate (README main command)": (CLI, ["ablate", "--out", "{out}"], "csv", False),
    "train": (CLI, ["train", "--config", "configs/smoke.json", "--set",
                    "train.steps=40", "--out", "{out}"], None, False),
    "sample": (CLI, ["sample", "--checkpoint", "{root}/train", "--prompt", "ab",
                     "--length", "40"], "text", False),
    "shakespeare-ablation": (CLI, [
        "shakespeare-ablation", "--steps", "30", "--batch_size", "4",
        "--seq_len", "16", "--num_blocks", "2", "--d_embed", "16",
        "--num_heads", "2", "--optimizers", "adam,muon", "--spectral", "none",
        "--clips", "none,ebc,energy", "--deltas", "0.05", "--out", "{out}",
        "--no-progress", "--set", "train.eval_batches=1"], None, True),
    "autopilot": (CLI, [
        "autopilot", "--config", "configs/smoke.json", "--set", "train.steps=20", "--set",
        "train.checkpoint_every=0", "--warmup_steps", "10", "--lr_multipliers",
        "0.5,1", "--deltas", "0.05", "--lr_scales", "2", "--seeds", "0",
        "--out", "{out}", "--no-progress"], None, False),
    "study": (CLI, ["study", "--out", "{out}", "--steps", "40", "--seeds", "0",
                    "--lr_scales", "1", "--only", "adam,ebc_adam",
                    "--no-progress"], None, True),
    "spikes": (SPIKES, ["{out}"], None, True),
}


def run_job(tree: pathlib.Path, out_root: pathlib.Path, name: str) -> str:
  code, argv, _, _ = JOBS[name]
  out = out_root / name.split()[0]
  argv = [a.replace("{out}", str(out)).replace("{root}", str(out_root))
          for a in argv]
  env = dict(os.environ, PYTHONPATH=str(tree))
  proc = subprocess.run([sys.executable, "-c", code, *argv], cwd=tree, env=env,
                        capture_output=True, text=True)
  if proc.returncode != 0:
    raise SystemExit(f"{tree.name}: {name} failed ({proc.returncode}):\n"
                     f"{proc.stderr[-3000:]}")
  return proc.stdout


def records(path: pathlib.Path | None, text: str | None = None,
            suffix: str | None = None) -> list:
  """The file's (or the text's) values as a flat list of (key, value); a
  figure's is its bytes' hash."""
  suffix = suffix or path.suffix
  if suffix == ".png":
    return [("sha256", hashlib.sha256(path.read_bytes()).hexdigest())]
  text = path.read_text() if text is None else text
  if suffix == ".json":
    items = [json.loads(text)]
  elif suffix == ".jsonl":
    items = [json.loads(line) for line in text.splitlines() if line.strip()]
  else:
    lines = [l for l in text.splitlines() if l and not l.startswith("#")]
    if suffix == ".csv" and lines and "," in lines[0]:
      items = list(csv.DictReader(lines))
    else:
      return [("text", text)]
  flat = []

  def walk(prefix, value):
    if isinstance(value, dict):
      for k, v in sorted(value.items()):  # key order is not a result
        if not VOLATILE.search(str(k)):
          walk(f"{prefix}.{k}", v)
    elif isinstance(value, list):
      for i, v in enumerate(value):
        walk(f"{prefix}[{i}]", v)
    else:
      flat.append((prefix, value))

  for i, item in enumerate(items):
    walk(f"[{i}]", item)
  return flat


def number(v):
  if isinstance(v, bool) or v is None:
    return None
  try:
    return float(v)
  except (TypeError, ValueError):
    return None


def compare(a: list, b: list) -> tuple[bool, float, str]:
  """(same but for number differences, largest number difference, a note).

  ``b`` may add keys (a new option written to ``config.json``): the note names
  them; they are not a difference. The note also names the key of the largest
  number difference, or the first value that differs otherwise.
  """
  added = {k for k, _ in b} - {k for k, _ in a}
  b = [(k, v) for k, v in b if k not in added]
  notes = [f"added {sorted(added)}"] if added else []
  if [k for k, _ in a] != [k for k, _ in b]:
    missing = sorted({k for k, _ in a} - {k for k, _ in b})
    return False, math.inf, "; ".join(notes + [f"missing {missing[:3]}"])
  worst, where = 0.0, ""
  for (k, x), (_, y) in zip(a, b):
    fx, fy = number(x), number(y)
    if fx is not None and fy is not None:
      if math.isnan(fx) and math.isnan(fy):
        continue
      if abs(fx - fy) > worst:
        worst, where = abs(fx - fy), k
    elif x != y:
      return False, math.inf, "; ".join(notes + [f"differs at {k}"])
  return True, worst, "; ".join(notes + ([f"largest at {where}"] if where else []))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--revisions", nargs=2, default=["da94842", "HEAD"],
                      metavar=("BEFORE", "AFTER"))
  parser.add_argument("--jobs", nargs="*", default=list(JOBS),
                      help=f"jobs to run (default all: {list(JOBS)})")
  parser.add_argument("--tol", type=float, default=1e-6,
                      help="largest number difference still called the same")
  args = parser.parse_args()
  unknown = sorted(set(args.jobs) - set(JOBS))
  if unknown:
    parser.error(f"--jobs: unknown {unknown}; jobs: {list(JOBS)}")
  if "sample" in args.jobs and "train" not in args.jobs:
    parser.error("--jobs: sample reads the train job's checkpoint; add train")
  data = os.environ.get("EBC_OPTAX_DATA")
  jobs = [j for j in JOBS if j in args.jobs and (data or not JOBS[j][3])]
  if len(jobs) < len(args.jobs):
    print("# EBC_OPTAX_DATA not set: left out "
          f"{[j for j in args.jobs if j not in jobs]}")
  same = True
  print("job,file,same,max_abs_diff,note")
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    trees = {rev: export(rev, tmp / "src", ("ebc_optax", "configs"))
             for rev in args.revisions}
    outs = {rev: tmp / "out" / rev.replace("/", "_") for rev in args.revisions}
    for job in jobs:
      stdout = {rev: run_job(trees[rev], outs[rev], job) for rev in args.revisions}
      before, after = args.revisions
      pairs = []
      kind = JOBS[job][2]
      if kind:
        pairs.append(("stdout", records(None, stdout[before], "." + kind),
                      records(None, stdout[after], "." + kind)))
      folder = job.split()[0]
      files_b, files_a = (sorted(
          p.relative_to(outs[rev] / folder) for p in (outs[rev] / folder).rglob("*")
          if p.suffix in COMPARED) for rev in (before, after))
      if files_b != files_a:
        same = False
        print(f"{job},(files),False,inf,"
              + json.dumps(str(sorted(set(map(str, files_b))
                                      ^ set(map(str, files_a)))[:4])))
      for rel in sorted(set(files_b) & set(files_a)):
        pairs.append((str(rel), records(outs[before] / folder / rel),
                      records(outs[after] / folder / rel)))
      for label, a, b in pairs:
        ok, worst, where = compare(a, b)
        ok = ok and worst <= args.tol
        same &= ok
        print(f"{job},{label},{ok},{worst:.3g},{json.dumps(where)}", flush=True)
  print("same" if same else "DIFFERENT")
  sys.exit(0 if same else 1)


if __name__ == "__main__":
  main()
