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
from ebc_optax import _recipes
from ebc_optax import _relative
from ebc_optax import _transform
from ebc_optax import _trust_region
from ebc_optax import formulas


@dataclasses.dataclass(frozen=True)
class EBCConfig:
  """Every EBC knob with its default; the single source of truth.

  Field ``x`` is read from the config key ``ebc_x``. The first nine are the
  reference repository's keys (``ebc_enable`` ... ``ebc_include_embed_out``);
  the rest are ours. ``controller`` is ``"pi"``, ``"trust_region"``,
  ``"relative"`` or ``"none"``; the ``pi_*`` fields are the PI controller's
  gains and clamp (see :func:`~ebc_optax.controllers.pi_controller`), the ``tr_*`` fields
  the trust-region controller's thresholds, factors and clamp (see
  :func:`~ebc_optax.controllers.trust_region_radius`), the ``rel_*`` fields the relative
  radius's multiple, level window, trend length and noise margin (see
  :func:`~ebc_optax.controllers.relative_radius`).
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
    """The reference recipe (:data:`~ebc_optax.SEEDS_RECIPE`) as a
    config; the harness's reference runners start from it."""
    return dataclasses.replace(cls(), **_recipes.SEEDS_RECIPE)

  def to_mapping(self) -> dict[str, Any]:
    return {f"ebc_{k}": v for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_json(cls, path: str) -> "EBCConfig":
    with open(path, encoding="utf-8") as f:
      return cls.from_mapping(json.load(f))

  def estimator_kwargs(self) -> dict[str, Any]:
    """This config's arguments of
    :func:`~ebc_optax.advanced.sensitivity_estimator` (which has no defaults).

    Example:
      >>> EBCConfig(beta_ema=0.0).estimator_kwargs()["beta_ema"]
      0.0
    """
    return {k: getattr(self, k) for k in (
        "sensitivity", "update_every", "probe_layers", "full_sweep_every",
        "beta_ema", "huber_ratio", "safety", "center_logits", "fd_step", "kl",
        "probe_batch_size")}

  def _relative(self) -> bool:
    return self.controller == "relative"

  def clip_kwargs(self) -> dict[str, Any]:
    """This config's arguments of :func:`~ebc_optax.advanced.budget_clip`,
    ``overshoot`` resolved as the front door does.

    Example:
      >>> EBCConfig(controller="none", target_kl=0.5).clip_kwargs()["overshoot"]
      'scale'
    """
    overshoot = self.overshoot or ("skip" if self._relative() else "scale")
    return dict(target_kl=self.target_kl, aggregate=self.aggregate,
                exact_every=self.exact_every,
                include_embed_out=self.include_embed_out,
                stacked=tuple(self.stacked) if self.stacked else None,
                overshoot=overshoot, eps=self.eps)

  def probe_kwargs(self) -> dict[str, Any]:
    """This config's arguments of :func:`~ebc_optax.advanced.kl_probe`
    (without its controller), ``guard`` resolved as the front door does.

    Example:
      >>> EBCConfig(controller="pi").probe_kwargs()["guard"]
      True
    """
    guard = (not self._relative()) if self.guard is None else self.guard
    return dict(target_kl=self.target_kl, guard=guard,
                probe_every=self.probe_every, eps=self.eps)

  def to_kwargs(self, **callables: Any) -> dict[str, Any]:
    """Keyword arguments of :func:`~ebc_optax.ellipsotope_budget_clip` and
    :func:`~ebc_optax.wrap` for this config (``enable`` is not among them).

    ``callables`` are the arguments that are not config values:
    ``loss_fn``, ``layer_labels``, ``axis_name`` and ``probe_batch_fn``.

    Example:
      >>> kwargs = EBCConfig(controller="pi").to_kwargs()
      >>> kwargs["target_kl"], kwargs["update_every"]
      (0.05, 20)
    """
    return transform_kwargs(self, **callables)


# What each knob means: the configuration guide's table is generated from
# this and the defaults of :class:`EBCConfig` (:func:`knob_table`).
KNOB_HELP: dict[str, str] = {
    "enable": "`from_config` only: False gives an identity transform",
    "target_kl": "δ* in nats/token: the PI controller's target for the "
                 "applied KL, the trust-region radius's starting δ, or the "
                 "fixed δ with `controller=None`; unused by the default "
                 "relative radius",
    "update_every": "steps between round-robin β refreshes",
    "probe_layers": "layers refreshed per round-robin refresh",
    "beta_ema": "EMA decay of β, in [0, 1); 0 uses each fresh estimate as is",
    "safety": "multiplier on β (with `beta_ema=0, safety=1` β is the raw "
              "measurement)",
    "aggregate": "`\"l1\"`: S = Σ s_ℓ; `\"l2\"`: S = √L·(Σ s_ℓ²)^½ (a bound, "
                 "never smaller than L1); `\"exact\"`: S = ‖J ΔW‖ of the "
                 "whole update from one JVP",
    "center_logits": "center per token in β, S and the probe's T (KL is "
                     "shift-invariant anyway)",
    "include_embed_out": "keep embedding / output-head groups in the budget",
    "full_sweep_every": "steps between refreshes of all layers (0: only the "
                        "first step); `\"auto\"`: 200·⌈L/8⌉ for L budgeted "
                        "layers",
    "sensitivity": "`\"jvp\"` (exact forward mode) or `\"fd\"` (central "
                   "difference along the unit direction, step "
                   "`fd_step·max(rms(W_ℓ), 0.01)`)",
    "huber_ratio": "a fresh β is clipped to [EMA/r, r·EMA] before entering "
                   "the EMA",
    "fd_step": "relative finite-difference step",
    "probe_batch_size": "rows of `batch` used for β, ‖J ΔW‖ and the probe: a "
                        "float f in (0, 1] takes every round(1/f)-th row, an "
                        "int n every (B // n)-th row, None all rows",
    "kl": "metric of logit changes: `\"bound\"` = centered Euclidean "
          "(KL ≤ S²/4); `\"fisher\"` = softmax Fisher norm (KL ≈ S²/4)",
    "exact_every": "`aggregate=\"exact\"`: steps between ‖J ΔW‖ measurements; "
                   "in between S = k·S_L1 with k from the last one",
    "controller": "`\"relative\"` (δ from the trend of the recent steps; "
                  "outliers refused), `\"pi\"` (the applied KL steered to "
                  "`target_kl`), `\"trust_region\"` (δ by the ratio test; "
                  "needs `loss_fn`), `\"none\"`: δ fixed at `target_kl`",
    "guard": "shrink-only guard on the applied change; None: on with an "
             "absolute δ, off with the relative radius",
    "probe_every": "steps between applied-KL probes (0: never; disables the "
                   "controller and the guard)",
    "pi_kp": "PI controller: proportional gain",
    "pi_ki": "PI controller: integral gain",
    "pi_half_life": "PI controller: EMA half-life of the error, in steps",
    "pi_delta_min": "PI controller: lower clamp on δ",
    "pi_delta_max": "PI controller: upper clamp on δ",
    "tr_shrink_below": "trust-region radius: δ shrinks when ρ_tr is below",
    "tr_grow_above": "trust-region radius: δ grows when ρ_tr is above",
    "tr_shrink_factor": "trust-region radius: factor on δ when it shrinks",
    "tr_grow_factor": "trust-region radius: factor on δ when it grows",
    "tr_delta_min": "trust-region radius: lower clamp on δ",
    "tr_delta_max": "trust-region radius: upper clamp on δ",
    "rel_multiple": "relative radius: how many times the trend's predicted "
                    "KL a step may have",
    "rel_window": "relative radius: steps in the level's median (and before "
                  "the first decision)",
    "rel_trend": "relative radius: accepted steps in the trend line",
    "rel_z": "relative radius: noise margin in robust standard deviations",
    "overshoot": "a step with S > τ is cut back (`\"scale\"`, c = τ/S) or "
                 "refused (`\"skip\"`, c = 0; needs the relative radius); "
                 "None: `\"skip\"` with the relative radius, `\"scale\"` "
                 "otherwise",
    "stacked": "label prefixes of layers stacked on a leading axis "
               "(`nn.scan` / `nnx.scan`): slice i under prefix p is layer "
               "`p/i`",
    "eps": "floor on S and on c·S",
}


def knob_table() -> str:
  """The Markdown table of every knob: argument, config key, default, meaning.

  Example:
    >>> print(knob_table().splitlines()[2])
    | `enable` | `ebc_enable` | `True` | `from_config` only: False gives an identity transform |
  """
  rows = ["| argument | config key | default | meaning |", "|---|---|---|---|"]
  for field in dataclasses.fields(EBCConfig):
    default = json.dumps(field.default) if isinstance(field.default, str) else (
        field.default)
    rows.append(f"| `{field.name}` | `ebc_{field.name}` | `{default}` | "
                f"{KNOB_HELP[field.name]} |")
  return "\n".join(rows)


def from_config(
    config: Mapping[str, Any] | EBCConfig,
    logits_fn: Callable[[Any, Any], jax.Array],
    *,
    loss_fn: Callable[[jax.Array, Any], jax.Array] | None = None,
    layer_labels: _layers.LayerLabelsFn | None = None,
    axis_name: formulas.AxisName = None,
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
      logits_fn, **cfg.to_kwargs(loss_fn=loss_fn, layer_labels=layer_labels,
                                 axis_name=axis_name,
                                 probe_batch_fn=probe_batch_fn))


def transform_kwargs(
    cfg: EBCConfig,
    *,
    loss_fn: Callable[[jax.Array, Any], jax.Array] | None = None,
    layer_labels: _layers.LayerLabelsFn | None = None,
    axis_name: formulas.AxisName = None,
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
