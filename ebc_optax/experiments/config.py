"""One typed config tree for a run; JSON files and ``--set`` only override it.

Every default lives in these dataclasses. A JSON file (``configs/*.json``) is a
nested mapping with the same sections (``model``, ``data``, ``optim``, ``ebc``,
``train``, ``log``); ``--set section.key=value`` overrides one value (parsed as
JSON when it parses, else taken as a string). An unknown section or key is an
error. The resolved config is written to every run directory as
``config.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import ebc_optax
from ebc_optax.experiments import bursts

DTYPES = ("float32", "bfloat16")
DATASETS = ("markov", "shakespeare", "text")
SPECTRAL = ("none", "spec_normalize", "hard_cap", "spec_hammer")
BURST_KINDS = bursts.BURST_KINDS


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The causal GPT."""
  num_blocks: int = 3
  d_embed: int = 128
  num_heads: int = 4
  seq_len: int = 256
  positions: str = "rope"  # or "learned"
  param_dtype: str = "float32"  # or "bfloat16" (logits and statistics stay f32)
  scan_layers: bool = False  # stacked blocks via nnx.scan; EBC stacked=("blocks",)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where tokens come from: the offline Markov language, Shakespeare, or a file."""
  dataset: str = "markov"
  path: str | None = None  # for dataset="text" (--data-path)
  cache_dir: str | None = None  # shakespeare download cache
  val_fraction: float = 0.1
  markov_seed: int = 0
  markov_vocab: int = 32
  markov_support: int = 4
  markov_train_tokens: int = 200_000
  markov_val_tokens: int = 20_000


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """Base optimizer, clipping arm, weight decay and weight constraint.

  ``optimizer``: ``adam``, ``muon``, ``sgd``, ``prodigy``
  (``optax.contrib.prodigy``; ``lr`` is its learning-rate multiplier, 1.0 by
  its own default), ``schedule_free`` (``optax.contrib.schedule_free_adamw``,
  evaluated at ``schedule_free_eval_params``), or the spike-guarding Adams
  ``spam`` and ``stable_adamw`` (:mod:`ebc_optax.experiments.guards`).

  ``clip``: ``none``, ``global`` (``optax.clip_by_global_norm`` before the
  base), ``ebc`` (:func:`ebc_optax.wrap`), ``energy``, ``agc``
  (``optax.adaptive_grad_clip`` before the base), ``zclip`` (before the
  base), ``skip_step`` (around the base and the decay) or ``update_clip``
  (Levanter's historical update-norm clip after the base); the peers take
  their published defaults (:mod:`ebc_optax.experiments.guards`).
  """
  optimizer: str = "adam"
  lr: float = 2e-3
  lr_scale: float = 1.0  # the LR used is lr * lr_scale
  b1: float = 0.9
  b2: float = 0.999
  weight_decay: float = 0.0  # decoupled, applied after the clip
  clip: str = "none"  # "none" | "global" | "ebc" | "energy"
  global_clip_norm: float = 1.0
  energy_ratio: float = 0.1  # clip="energy": ‖∇L_ℓ‖ ≤ energy_ratio · ‖a_ℓ‖
  agc_clipping: float = 0.01  # clip="agc": NFNets' λ (‖G‖/‖W‖ per unit)
  # clip="skip_step": record skipped steps' values (OLMo-core, Levanter) or
  # not (axlearn); keep the base's state on a skipped step or let it absorb.
  skip_keep_skipped: bool = True
  skip_keep_state: bool = True
  # clip="ebc": ebc_optax.wrap's skip_refused (False: the base absorbs) and
  # its batch checks, gradient norm and loss (False: grad_norm_multiple and
  # loss_multiple None, EBC's radius is the only detector).
  ebc_skip_refused: bool = True
  ebc_grad_check: bool = True
  spectral: str = "none"
  w_max: float = 1.0
  spectral_method: str = "power"  # or "svd"
  spectral_iters: int = 10


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The training loop."""
  steps: int = 2000
  batch_size: int = 64
  seed: int = 0
  eval_interval: int = 200
  eval_batches: int = 8
  checkpoint_every: int = 0  # 0: only at the end
  diverge_loss: float = 20.0  # a train loss above this (or NaN/inf) stops the run
  # EBC arm: this many consecutive rejected (non-finite) gradients stop the run
  # with status "stalled" (0: never).
  stall_steps: int = 50
  # Extra evaluation steps (besides every eval_interval and the last step).
  eval_steps: tuple[int, ...] = ()
  # A mid-training burst (ebc_optax.experiments.bursts): "none", or a kind of
  # corrupted batch ("repeat", "random", "markov", "shuffle") or an LR spike
  # ("lr": the LR times burst_lr_factor) for burst_steps steps from
  # burst_start on (None: the middle of the run).
  burst: str = "none"
  burst_start: int | None = None
  burst_steps: int = 10
  burst_lr_factor: float = 30.0

  @property
  def burst_window(self) -> tuple[int, int]:
    """``(first burst step, number of steps from the first corrupted step
    to the last)``: ``burst_steps``, or the kind's own length
    (:data:`ebc_optax.experiments.bursts.KIND_STEPS`)."""
    start = self.steps // 2 if self.burst_start is None else self.burst_start
    return start, bursts.burst_length(self.burst, self.burst_steps)


@dataclasses.dataclass(frozen=True)
class LogConfig:
  """Logging."""
  log_interval: int = 20
  progress: bool = True  # a tqdm progress bar
  tensorboard: bool = False  # also write TensorBoard scalars (writers.py)


@dataclasses.dataclass(frozen=True)
class Config:
  """A whole run. ``ebc`` uses the fields of :class:`ebc_optax.EBCConfig`."""
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  ebc: ebc_optax.EBCConfig = ebc_optax.EBCConfig()
  train: TrainConfig = TrainConfig()
  log: LogConfig = LogConfig()

  @property
  def lr(self) -> float:
    return self.optim.lr * self.optim.lr_scale


_CHOICES = {
    ("model", "positions"): ("rope", "learned"),
    ("model", "param_dtype"): DTYPES,
    ("data", "dataset"): DATASETS,
    ("optim", "spectral"): SPECTRAL,
    ("optim", "spectral_method"): ("power", "svd"),
    ("train", "burst"): BURST_KINDS,
}


def _sections() -> dict[str, type]:
  return {f.name: type(f.default) for f in dataclasses.fields(Config)}


def to_dict(cfg: Config) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def validate(cfg: Config) -> Config:
  """Checks choices and basic ranges; returns ``cfg``."""
  from ebc_optax.experiments import optim  # the registries (optim imports us)
  choices_of = {**_CHOICES, ("optim", "optimizer"): tuple(optim.BASES),
                ("optim", "clip"): tuple(optim.CLIP_ARMS)}
  for (section, key), choices in choices_of.items():
    value = getattr(getattr(cfg, section), key)
    if value not in choices:
      raise ValueError(f"{section}.{key} must be one of {choices}; got {value!r}.")
  positive = [("model", "num_blocks"), ("model", "d_embed"), ("model", "num_heads"),
              ("model", "seq_len"), ("optim", "lr"), ("optim", "lr_scale"),
              ("train", "steps"), ("train", "batch_size"), ("train", "eval_batches"),
              ("log", "log_interval"), ("train", "eval_interval")]
  for section, key in positive:
    value = getattr(getattr(cfg, section), key)
    if not value > 0:
      raise ValueError(f"{section}.{key} must be > 0; got {value!r}.")
  if cfg.model.scan_layers and cfg.optim.spectral != "none":
    raise ValueError(
        "optim.spectral projects 2-D weight matrices; with model.scan_layers "
        "the block kernels are stacked 3-D arrays and would be skipped. Use "
        "model.scan_layers=false with a spectral projection.")
  ratio = cfg.optim.energy_ratio
  if (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
      or not math.isfinite(ratio) or ratio <= 0):
    raise ValueError(f"optim.energy_ratio must be in (0, inf); got {ratio!r}.")
  if (cfg.optim.optimizer == "schedule_free"
      and not optim.CLIP_ARMS[cfg.optim.clip].schedule_free):
    raise ValueError(
        f"optim.clip={cfg.optim.clip!r} is not built around the schedule-free "
        "base; use optim.optimizer adam, prodigy, sgd or muon with it.")
  if cfg.optim.clip == "ebc" and not cfg.ebc.enable:
    raise ValueError("optim.clip='ebc' contradicts ebc.enable=false; the EBC "
                     "arm is chosen with optim.clip.")
  t = cfg.train
  steps = t.eval_steps
  if isinstance(steps, (str, bytes)) or not all(
      isinstance(s, int) and not isinstance(s, bool) for s in steps):
    raise ValueError(f"train.eval_steps must be a list of ints; got {steps!r}.")
  if t.burst != "none":
    start, n = t.burst_window
    if not (isinstance(n, int) and n >= 1 and 0 <= start and start + n <= t.steps):
      raise ValueError(
          f"train.burst_start={t.burst_start} and train.burst_steps={n} must put "
          f"the burst inside the run's {t.steps} steps (burst_steps >= 1).")
    if not t.burst_lr_factor > 0:
      raise ValueError(f"train.burst_lr_factor must be > 0; got {t.burst_lr_factor!r}.")
  if cfg.data.dataset == "text" and not cfg.data.path:
    raise ValueError("data.path (--data-path) is required for data.dataset='text'.")
  # JSON gives lists: one canonical form, so saved and asked-for configs compare.
  return dataclasses.replace(cfg, train=dataclasses.replace(
      t, eval_steps=tuple(sorted(set(steps)))))


def merge(cfg: Config, overrides: Mapping[str, Any]) -> Config:
  """Returns ``cfg`` with a nested mapping of overrides applied.

  Raises:
    ValueError: on an unknown section or key.
  """
  sections = _sections()
  updates = {}
  for section, values in overrides.items():
    if section not in sections:
      raise ValueError(f"Unknown config section {section!r}; sections: "
                       f"{sorted(sections)}.")
    if not isinstance(values, Mapping):
      raise ValueError(f"Config section {section!r} must be a mapping; got {values!r}.")
    current = getattr(cfg, section)
    names = {f.name for f in dataclasses.fields(current)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"Unknown key(s) {unknown} in config section {section!r}; "
                       f"accepted: {sorted(names)}.")
    updates[section] = dataclasses.replace(current, **values)
  return dataclasses.replace(cfg, **updates)


def parse_set(assignments: Iterable[str]) -> dict[str, dict[str, Any]]:
  """``["optim.lr=1e-3", "model.positions=learned"]`` -> nested overrides."""
  out: dict[str, dict[str, Any]] = {}
  for item in assignments:
    key, sep, raw = item.partition("=")
    section, dot, name = key.partition(".")
    if not sep or not dot or not name:
      raise ValueError(f"--set expects section.key=value; got {item!r}.")
    try:
      value = json.loads(raw)
    except json.JSONDecodeError:
      value = raw
    out.setdefault(section, {})[name] = value
  return out


def seeds_config() -> Config:
  """The defaults with the ``ebc`` section at the seeds' recipe: what the
  seeds' runners (ablate, shakespeare-ablation, autopilot) start from, so
  that they reproduce the seed study whatever the library's defaults are."""
  return Config(ebc=ebc_optax.EBCConfig.seeds())


def load(path: str | pathlib.Path | None = None,
         sets: Iterable[str] = (), base: Config | None = None) -> Config:
  """``base`` (default :class:`Config`), then the JSON file at ``path`` (if
  any), then ``--set`` items."""
  cfg = Config() if base is None else base
  if path is not None:
    with open(path, encoding="utf-8") as f:
      cfg = merge(cfg, json.load(f))
  return validate(merge(cfg, parse_set(sets)))


def save(cfg: Config, path: str | pathlib.Path) -> None:
  pathlib.Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n",
                                encoding="utf-8")


def from_dict(data: Mapping[str, Any]) -> Config:
  """Inverse of :func:`to_dict` (a saved ``config.json``)."""
  return validate(merge(Config(), data))
