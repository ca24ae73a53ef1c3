"""Building the transform from the reference repository's config keys."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
import optax

from ebc_optax import _controller
from ebc_optax import _layers
from ebc_optax import _logits
from ebc_optax import _recipes
from ebc_optax import _relative
from ebc_optax import _transform
from ebc_optax import _trust_region


@dataclasses.dataclass(frozen=True)
class EBCConfig:
  """Every EBC knob with its default; the single source of truth.

  Field ``x`` is read from the config key ``ebc_x``. The first nine are the
  reference repository's keys (``ebc_enable`` ... ``ebc_include_embed_out``);
  the rest are ours. ``controller`` is ``"pi"``, ``"trust_region"``,
  ``"relative"`` or ``"none"``; the ``pi_*`` fields are the PI controller's
  gains and clamp (see :func:`~ebc_optax.pi_controller`), the ``tr_*`` fields
  the trust-region controller's thresholds, factors and clamp (see
  :func:`~ebc_optax.trust_region_radius`), the ``rel_*`` fields the relative
  radius's multiple, level window, trend length and noise margin (see
  :func:`~ebc_optax.relative_radius`).
  """
  enable: bool = True
  target_kl: float = _transform.DEFAULT_TARGET_KL
  update_every: int = 20
  probe_layers: int = 2
  beta_ema: float = 0.9
  safety: float = 1.05
  aggregate: str = "l1"
  center_logits: bool = True
  include_embed_out: bool = False
  full_sweep_every: int | str | None = "auto"
  sensitivity: str = "jvp"
  huber_ratio: float = 4.0
  fd_step: float = 1e-2
  probe_batch_size: int | float | None = 0.25
  kl: str = "bound"
  exact_every: int = 1
  controller: str = "relative"
  guard: bool | None = None
  probe_every: int = 20
  pi_kp: float = 0.15
  pi_ki: float = 0.02
  pi_half_life: float = 250.0
  pi_delta_min: float = 0.01
  pi_delta_max: float = 0.30
  tr_shrink_below: float = 0.25
  tr_grow_above: float = 0.75
  tr_shrink_factor: float = 0.5
  tr_grow_factor: float = 1.5
  tr_delta_min: float = 1e-4
  tr_delta_max: float = 1.0
  rel_multiple: float = 4.0
  rel_window: int = 32
  rel_trend: int = 12
  rel_z: float = 4.0
  overshoot: str | None = None
  stacked: tuple[str, ...] | None = None
  eps: float = 1e-12

  @classmethod
  def from_mapping(cls, config: Mapping[str, Any]) -> "EBCConfig":
    """Reads ``ebc_*`` keys; an unknown key is an error."""
    names = {f"ebc_{f.name}": f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - set(names))
    if unknown:
      raise ValueError(
          f"Unknown EBC config key(s) {unknown}; accepted keys: "
          f"{sorted(names)}.")
    return cls(**{names[k]: v for k, v in config.items()})

  @classmethod
  def seeds(cls) -> "EBCConfig":
    """The seed documents' recipe (:data:`~ebc_optax.SEEDS_RECIPE`) as a
    config; the seeds' runners of the harness start from it."""
    return dataclasses.replace(cls(), **_recipes.SEEDS_RECIPE)

  def to_mapping(self) -> dict[str, Any]:
    return {f"ebc_{k}": v for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_json(cls, path: str) -> "EBCConfig":
    with open(path, encoding="utf-8") as f:
      return cls.from_mapping(json.load(f))


def from_config(
    config: Mapping[str, Any] | EBCConfig,
    logits_fn: Callable[[Any, Any], jax.Array],
    *,
    loss_fn: Callable[[jax.Array, Any], jax.Array] | None = None,
    layer_labels: _layers.LayerLabelsFn | None = None,
    axis_name: _logits.AxisName = None,
    probe_batch_fn: Callable[[Any], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Builds :func:`ellipsotope_budget_clip` from ``ebc_*`` config keys.

  ``loss_fn`` (``(logits, batch) -> scalar``) is needed with
  ``ebc_controller: "trust_region"``; the callables and ``axis_name`` are
  not config values and are passed as arguments.

  Missing keys take the defaults of :class:`EBCConfig` (the values in
  ``configs/ebc_default.json``). With ``ebc_enable: false`` the result is an
  identity transformation that accepts (and ignores) ``batch``.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = from_config({"ebc_controller": "pi", "ebc_target_kl": 0.1,
    ...                   "ebc_aggregate": "l2"}, lambda p, x: x @ p)
    >>> from_config({"ebc_target": 0.1}, lambda p, x: x @ p)
    Traceback (most recent call last):
    ...
    ValueError: Unknown EBC config key(s) ['ebc_target']; ...
  """
  cfg = config if isinstance(config, EBCConfig) else EBCConfig.from_mapping(config)
  if not cfg.enable:
    return optax.with_extra_args_support(optax.identity())
  return _transform.ellipsotope_budget_clip(
      logits_fn, **transform_kwargs(cfg, loss_fn=loss_fn,
                                    layer_labels=layer_labels,
                                    axis_name=axis_name,
                                    probe_batch_fn=probe_batch_fn))


def transform_kwargs(
    cfg: EBCConfig,
    *,
    loss_fn: Callable[[jax.Array, Any], jax.Array] | None = None,
    layer_labels: _layers.LayerLabelsFn | None = None,
    axis_name: _logits.AxisName = None,
    probe_batch_fn: Callable[[Any], Any] | None = None,
) -> dict[str, Any]:
  """Keyword arguments of :func:`ellipsotope_budget_clip` (and of
  :func:`wrap`) for ``cfg``; ``enable`` is not among them."""
  if cfg.controller not in ("pi", "trust_region", "relative", "none"):
    raise ValueError(
        "ebc_controller must be one of ('pi', 'trust_region', 'relative', "
        f"'none'); got {cfg.controller!r}.")
  if (cfg.controller == "relative"
      and cfg.target_kl != _transform.DEFAULT_TARGET_KL):
    raise ValueError(
        f"ebc_target_kl={cfg.target_kl!r} is unused by ebc_controller="
        "'relative' (the default), which sets δ from the recent steps: set "
        "ebc_controller to 'pi' to steer the applied KL to it, to 'none' for "
        "a fixed δ, or leave ebc_target_kl at its default.")
  controller = None
  if cfg.controller == "pi":
    controller = _controller.pi_controller(
        kp=cfg.pi_kp, ki=cfg.pi_ki, half_life=cfg.pi_half_life,
        delta_min=cfg.pi_delta_min, delta_max=cfg.pi_delta_max)
  elif cfg.controller == "trust_region":
    controller = _trust_region.trust_region_radius(
        shrink_below=cfg.tr_shrink_below, grow_above=cfg.tr_grow_above,
        shrink_factor=cfg.tr_shrink_factor, grow_factor=cfg.tr_grow_factor,
        delta_min=cfg.tr_delta_min, delta_max=cfg.tr_delta_max)
  elif cfg.controller == "relative":
    controller = _relative.relative_radius(
        multiple=cfg.rel_multiple, window=cfg.rel_window,
        trend=cfg.rel_trend, z=cfg.rel_z)
  return dict(
      # The relative radius has no target (a given one is an error there).
      target_kl=None if cfg.controller == "relative" else cfg.target_kl,
      update_every=cfg.update_every, probe_layers=cfg.probe_layers,
      full_sweep_every=cfg.full_sweep_every, beta_ema=cfg.beta_ema,
      safety=cfg.safety, aggregate=cfg.aggregate, kl=cfg.kl,
      exact_every=cfg.exact_every,
      center_logits=cfg.center_logits,
      include_embed_out=cfg.include_embed_out, sensitivity=cfg.sensitivity,
      huber_ratio=cfg.huber_ratio, fd_step=cfg.fd_step,
      probe_batch_size=cfg.probe_batch_size, probe_batch_fn=probe_batch_fn,
      controller=controller,
      guard=cfg.guard, probe_every=cfg.probe_every, loss_fn=loss_fn,
      layer_labels=layer_labels, overshoot=cfg.overshoot,
      stacked=tuple(cfg.stacked) if cfg.stacked else None,
      axis_name=axis_name, eps=cfg.eps)
