"""``ebc-optax``: the command-line entry point (thin; the work is importable)."""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

from ebc_optax.experiments import bursts
from ebc_optax.experiments import config as config_lib
from ebc_optax.experiments import optim as optim_lib

DEFAULT_OUT = pathlib.Path("outputs")


def _timestamp() -> str:
  return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def _csv(cast):
  return lambda text: [cast(t) for t in text.split(",") if t.strip()]


def _base_config(args, base: config_lib.Config | None = None) -> config_lib.Config:
  sets = list(args.set or [])
  if getattr(args, "data_path", None):
    sets += ["data.dataset=\"text\"", f"data.path={_json_str(args.data_path)}"]
  return config_lib.load(args.config, sets, base)


def _json_str(s: str) -> str:
  import json
  return json.dumps(s)


def _add_config_args(p: argparse.ArgumentParser, default_config: str | None = None):
  p.add_argument("--config", default=default_config,
                 help="JSON config overriding the defaults (default: %(default)s)")
  p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                 help="override one config value (repeatable), e.g. --set optim.lr=1e-3")
  p.add_argument("--data-path", help="train on this UTF-8 text file instead")


def cmd_train(args) -> int:
  from ebc_optax.experiments import train
  cfg = _base_config(args)
  out = pathlib.Path(args.out or DEFAULT_OUT / "runs" / _timestamp())
  summary = train.train(cfg, out, resume=args.resume)
  print(f"# run directory: {out}")
  for k, v in summary.items():
    print(f"{k}: {v}")
  return 0 if summary["status"] != "diverged" else 3


def cmd_ablate(args) -> int:
  from ebc_optax.experiments import sweeps
  out = pathlib.Path(args.out or DEFAULT_OUT / "ablate" / _timestamp())
  sweeps.ablate(out, steps=args.steps, sets=args.set or [], progress=args.progress,
                clips=args.clips)
  print(f"# runs in {out}", file=sys.stderr)
  return 0


def cmd_shakespeare(args) -> int:
  from ebc_optax.experiments import sweeps
  sets = list(args.set or [])
  if not args.data_path:
    sets.append("data.dataset=\"shakespeare\"")
  for flag, key in (("steps", "train.steps"), ("batch_size", "train.batch_size"),
                    ("seq_len", "model.seq_len"), ("num_blocks", "model.num_blocks"),
                    ("d_embed", "model.d_embed"), ("num_heads", "model.num_heads")):
    if getattr(args, flag) is not None:
      sets.append(f"{key}={getattr(args, flag)}")
  args.set = sets
  base = _base_config(args, config_lib.seeds_config())  # the seeds' runner
  out = pathlib.Path(args.out or DEFAULT_OUT / "ebc_ablation" / _timestamp())
  sweeps.shakespeare_ablation(
      base, out, optimizers=args.optimizers, spectral=args.spectral, ebc=args.ebc,
      clips=args.clips, energy_ratios=args.energy_ratios,
      deltas=args.deltas, aggregates=args.aggregates,
      lrs=args.lrs or [base.optim.lr], lr_scales=args.lr_scales, seeds=args.seeds,
      controller=args.controller, progress=not args.no_progress)
  print(f"# outputs in {out}")
  return 0


def cmd_autopilot(args) -> int:
  from ebc_optax.experiments import autopilot
  base = _base_config(args, config_lib.seeds_config())  # the seeds' protocol
  out = pathlib.Path(args.out or DEFAULT_OUT / "ebc_ablation" / "autopilot")
  autopilot.autopilot(base, out, warmup_steps=args.warmup_steps,
                      lr_multipliers=args.lr_multipliers, deltas=args.deltas, lr_scales=args.lr_scales,
                      seeds=args.seeds, progress=not args.no_progress)
  print(f"# outputs in {out}")
  return 0


def cmd_study(args) -> int:
  from ebc_optax.experiments import study
  out = pathlib.Path(args.out)
  result = study.run_study(out, steps=args.steps, seeds=args.seeds,
                           lr_scales=args.lr_scales, only=args.only,
                           legacy=args.legacy, progress=not args.no_progress,
                           workers=args.workers)
  print((out / "study.md").read_text())
  for path in result["figures"]:
    print(f"# figure: {path}", file=sys.stderr)
  return 0


def cmd_spikes(args) -> int:
  from ebc_optax.experiments import spikes
  out = pathlib.Path(args.out)
  result = spikes.run_spikes(out, steps=args.steps, arms=args.arms,
                             kinds=args.kinds, seeds=args.seeds,
                             progress=not args.no_progress,
                             workers=args.workers,
                             finished_only=args.finished_only)
  print((out / "spikes.md").read_text())
  if result["figure"]:
    print(f"# figure: {result['figure']}", file=sys.stderr)
  return 0


def cmd_sample(args) -> int:
  from ebc_optax.experiments import sample
  print(sample.sample_text(args.checkpoint, args.prompt, args.length,
                           seed=args.seed, temperature=args.temperature))
  return 0


def cmd_plot(args) -> int:
  from ebc_optax.experiments import plots
  for path in plots.redraw(pathlib.Path(args.run_dir)):
    print(path)
  return 0


class _HelpFormatter(argparse.HelpFormatter):
  """Shows each option's default once, lists as they are typed (``a,b``).

  ``ArgumentDefaultsHelpFormatter`` appends ``(default: ...)`` even where the
  help already states it, and prints list defaults as Python lists.
  """

  def _get_help_string(self, action):
    text = action.help or ""
    default = action.default
    if ("default" in text or not action.option_strings
        or default in (None, False, argparse.SUPPRESS)):
      return text
    if isinstance(default, (list, tuple)):
      default = ",".join(str(d) for d in default)
    return f"{text} (default: {str(default).replace('%', '%%')})".strip()


def build_parser() -> argparse.ArgumentParser:
  import ebc_optax
  parser = argparse.ArgumentParser(
      prog="ebc-optax", description="Ellipsotope-Budgeted Clipping experiments.",
      formatter_class=_HelpFormatter)
  parser.add_argument("--version", action="version",
                      version=f"%(prog)s {ebc_optax.__version__}")
  sub = parser.add_subparsers(dest="command", required=True)
  fmt = _HelpFormatter

  p = sub.add_parser("train", help="one run", formatter_class=fmt)
  _add_config_args(p)
  p.add_argument("--out", help="run directory (default: outputs/runs/<timestamp>)")
  p.add_argument("--resume", action="store_true",
                 help="continue from the run directory's last checkpoint")
  p.set_defaults(func=cmd_train)

  p = sub.add_parser("ablate", formatter_class=fmt,
                     help="offline grid adam/muon x EBC off/on x spectral none/spec "
                          "on the synthetic Markov language (one CSV line per run)")
  p.add_argument("--steps", type=int, default=None,
                 help="steps per run (default: the ablate preset, 150)")
  p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE")
  p.add_argument("--out", help="sweep directory (default: outputs/ablate/<timestamp>)")
  p.add_argument("--progress", action="store_true", help="show progress bars")
  p.add_argument("--clips", type=_csv(str), default=["none", "ebc"],
                 help=f"clipping arms, from {tuple(optim_lib.CLIP_ARMS)} (set "
                      "optim.energy_ratio / optim.global_clip_norm with --set)")
  p.set_defaults(func=cmd_ablate)

  p = sub.add_parser("shakespeare-ablation", formatter_class=fmt,
                     help="the reference grid on Shakespeare with tables and figures")
  _add_config_args(p)
  p.add_argument("--steps", type=int)
  p.add_argument("--batch_size", type=int)
  p.add_argument("--seq_len", type=int)
  p.add_argument("--num_blocks", type=int)
  p.add_argument("--d_embed", type=int)
  p.add_argument("--num_heads", type=int)
  p.add_argument("--optimizers", type=_csv(str), default=["adam", "muon"])
  p.add_argument("--spectral", type=_csv(str), default=["none", "spec"])
  p.add_argument("--ebc", type=_csv(str), default=None,
                 help="EBC arms off,on (default when --clips is not given); "
                      "same as --clips none,ebc")
  p.add_argument("--clips", type=_csv(str), default=None,
                 help=f"clipping arms, from {tuple(optim_lib.CLIP_ARMS)}; replaces --ebc")
  p.add_argument("--energy_ratios", type=_csv(float), default=None,
                 help="ratios of the energy arm (default: optim.energy_ratio)")
  p.add_argument("--deltas", type=_csv(float), default=[0.05, 0.1])
  p.add_argument("--aggregates", type=_csv(str), default=["l1"])
  p.add_argument("--lrs", type=_csv(float), default=None,
                 help="base LRs (default: optim.lr of the config)")
  p.add_argument("--lr_scales", type=_csv(float), default=[1.0])
  p.add_argument("--seeds", type=_csv(int), default=[0])
  p.add_argument("--controller", choices=("on", "off"), default="on")
  p.add_argument("--out", help="sweep directory; reuse one to resume "
                               "(default: outputs/ebc_ablation/<timestamp>)")
  p.add_argument("--no-progress", action="store_true")
  p.set_defaults(func=cmd_shakespeare)

  p = sub.add_parser("autopilot", formatter_class=fmt,
                     help="the seeds' §5 protocol: LR sweep, δ* warm-ups, LR "
                          "scales, finals (resumable)")
  _add_config_args(p)
  p.add_argument("--warmup_steps", type=int, default=300)
  p.add_argument("--lr_multipliers", type=_csv(float), default=[0.25, 0.5, 1.0, 2.0, 4.0],
                 help="stage 1 LRs, as multiples of optim.lr")
  p.add_argument("--deltas", type=_csv(float), default=[0.03, 0.05, 0.07])
  p.add_argument("--lr_scales", type=_csv(float), default=[1.5, 2.0, 3.0, 4.0])
  p.add_argument("--seeds", type=_csv(int), default=[0, 1, 2])
  p.add_argument("--out", help="directory (default: outputs/ebc_ablation/autopilot)")
  p.add_argument("--no-progress", action="store_true")
  p.set_defaults(func=cmd_autopilot)

  p = sub.add_parser("study", formatter_class=fmt,
                     help="does EBC train better than the alternatives: tune "
                          "adam and schedule-free AdamW, then adam, global "
                          "clipping, Prodigy, schedule-free and EBC around each "
                          "at LR x1..x8 (3 seeds at x1 and x8, 2 else; resumable)")
  p.add_argument("--out", default=str(DEFAULT_OUT / "study"),
                 help="study directory; rerun with the same one to resume")
  p.add_argument("--steps", type=int, default=None,
                 help="steps per run (default: the study preset, 1500)")
  p.add_argument("--seeds", type=_csv(int), default=None,
                 help="seeds of every cell (default: 0,1,2 at x1 and x8, 0,1 else)")
  p.add_argument("--lr_scales", type=_csv(float), default=None,
                 help="override every arm's LR scales")
  p.add_argument("--only", type=_csv(str), default=None,
                 help="run only these arms (the tables then cover only them; "
                      "rerun without --only to tabulate every finished run)")
  p.add_argument("--legacy", action="store_true",
                 help="also run the first study's arms (Adam base) and knob sweeps")
  p.add_argument("--workers", type=int, default=1,
                 help="runs trained at once, one CPU core each")
  p.add_argument("--no-progress", action="store_true")
  p.set_defaults(func=cmd_study)

  p = sub.add_parser("spikes", formatter_class=fmt,
                     help="damage and recovery after a mid-training burst of bad "
                          "batches or an LR spike, per arm and kind (resumable; "
                          "shares its tuning and no-burst runs with study)")
  p.add_argument("--out", default=str(DEFAULT_OUT / "study"),
                 help="study directory (the same as ebc-optax study's)")
  p.add_argument("--steps", type=int, default=None,
                 help="steps per run (default: the study preset, 1500)")
  p.add_argument("--arms", type=_csv(str), default=None,
                 help="arms (default: Adam, EBC's default and the spike guards "
                      "of study_design.guard_arms)")
  p.add_argument("--kinds", type=_csv(str), default=list(bursts.BURST_KINDS[1:]),
                 help="burst kinds (ebc_optax.experiments.bursts.BURST_KINDS)")
  p.add_argument("--seeds", type=_csv(int), default=[0, 1, 2])
  p.add_argument("--workers", type=int, default=1,
                 help="runs trained at once, one CPU core each")
  p.add_argument("--finished-only", action="store_true",
                 help="train nothing: tabulate the finished runs among those "
                      "named (arms measured on different seeds: name all)")
  p.add_argument("--no-progress", action="store_true")
  p.set_defaults(func=cmd_spikes)

  p = sub.add_parser("sample", formatter_class=fmt, help="generate text from a run")
  p.add_argument("--checkpoint", required=True, help="a run directory")
  p.add_argument("--prompt", default="ROMEO:")
  p.add_argument("--length", type=int, default=300)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--temperature", type=float, default=1.0)
  p.set_defaults(func=cmd_sample)

  p = sub.add_parser("plot", formatter_class=fmt,
                     help="redraw figures from a run or sweep directory")
  p.add_argument("run_dir")
  p.set_defaults(func=cmd_plot)
  return parser


def main(argv=None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except (ValueError, FileNotFoundError) as e:
    print(f"ebc-optax {args.command}: error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main())
