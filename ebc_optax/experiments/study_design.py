"""The study's design: its model and sizes, its grids and its arms
(:mod:`~ebc_optax.experiments.study` runs it, :mod:`~ebc_optax.experiments.study_stats`
and :mod:`~ebc_optax.experiments.study_report` summarise it).

The first study's arms are a config, ``study_legacy.json`` (next to this module).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import ebc_optax
from ebc_optax.experiments import bursts

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
  own steps (:func:`ebc_optax.controllers.relative_radius`, multiple 4, no knob set),
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


# The first study's arms (Adam only) are a config, not code.
LEGACY_CONFIG = pathlib.Path(__file__).resolve().with_name("study_legacy.json")


def load_arms(entries: Sequence[dict[str, Any]]) -> list[StudyArm]:
  """Arms from config entries: ``name``, optional ``ebc`` (the seeds' recipe
  with those fields changed, under ``optim.clip=ebc``), other config
  sections (``optim``, ...), ``lr_scales``, ``knob`` and ``base``."""
  arms = []
  for entry in entries:
    entry = dict(entry)
    name, ebc = entry.pop("name"), entry.pop("ebc", None)
    lr_scales = tuple(entry.pop("lr_scales", LR_SCALES))
    knob, base = entry.pop("knob", ""), entry.pop("base", "adam")
    overrides = {**(_ebc(**ebc) if ebc is not None else {}), **entry}
    arms.append(StudyArm(name, overrides, lr_scales=lr_scales, knob=knob,
                         base=base))
  return arms


def _legacy() -> dict[str, Any]:
  return json.loads(LEGACY_CONFIG.read_text(encoding="utf-8"))


def legacy_arms() -> list[StudyArm]:
  """The first study's arms (Adam base only, ``study_legacy.json``),
  runnable by name with ``only=``: no clipping (``none``), the seeds' first
  EBC (fixed δ, L1), the seeds' fix (``ebc_seed_pi``), the exact Fisher clip
  at fixed ``δ ∈ {0.003, 0.01, 0.03}``, the trust-region radius from three
  starts (every step and at the cheap cadence), the energy-budget clip."""
  return load_arms(_legacy()["arms"])


def knob_arms() -> list[StudyArm]:
  """The single-knob arms at other values of their knob (seed 0;
  ``study_legacy.json``)."""
  return load_arms(_legacy()["knob_arms"])


def knob_families() -> tuple[tuple[str, list[str]], ...]:
  """The knob families of the sensitivity table: ``(title, [arm, ...])``."""
  return tuple((f["title"], list(f["arms"])) for f in _legacy()["knob_families"])


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
