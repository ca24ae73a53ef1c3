"""Controllers for the KL target ``δ``, fed by the applied-KL probe.

A controller is a pair of pure functions (:class:`KLController`):

* ``init(target_kl) -> (state, δ0)``;
* ``update(state, measurement, δ, target_kl) -> (state, δ_new)``, called on
  every probe step with a :class:`ProbeMeasurement` (on every step for a
  controller with ``every_step``).

The δ lives in :class:`~ebc_optax.advanced.KLProbeState` (``next_kl_target``), which
passes it down to the clip at every step; the controller only proposes the
next one. Swap in your own controller by building a
:class:`KLController` and passing it as ``controller=``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ebc_optax import _validation
from ebc_optax import formulas


class ProbeMeasurement(NamedTuple):
  """What a probe measured for the step it ran on (all float32 scalars).

  Attributes:
    applied_kl: mean per-token ``KL(p(W) ‖ p(W + cΔW))`` on the probe batch.
    applied_change: per-token RMS of the centered applied logit change ``T``.
    clip_scale: the ``c`` applied at this step.
    surrogate: the surrogate ``S`` of this step (per-token units).
    guard_ratio: ``ρ = T / (c·S)``; NaN when ``c·S <= ε`` (the surrogate
      promised no change, so there is no ratio).
    interval: steps between probes (static int).
    loss_change: ``L(W + cΔW) − L(W)`` on the probe batch (0 unless the
      controller ``needs_loss``).
    predicted_loss_change: the local model's prediction of it,
      ``gᵀ(cΔW) + ½(cΔW)ᵀ G (cΔW)`` with ``G`` the Gauss-Newton matrix of the
      loss in logit space (0 unless the controller ``needs_loss``).
  """
  applied_kl: jax.Array
  applied_change: jax.Array
  clip_scale: jax.Array
  surrogate: jax.Array
  guard_ratio: jax.Array
  interval: int
  loss_change: jax.Array = 0.0
  predicted_loss_change: jax.Array = 0.0


class KLController(NamedTuple):
  """A controller of ``δ``: ``init(target) -> (state, δ0)`` and
  ``update(state, measurement, δ, target) -> (state, δ)``.

  ``needs_loss``: the probe must measure the loss change and its prediction
  (then the transform needs ``loss_fn``). ``every_step``: ``update`` runs on
  every step, not only on probe steps; its measurement then carries the
  step's ``clip_scale`` and ``surrogate`` and the latest probe's
  ``applied_kl``, ``applied_change`` and ``guard_ratio`` (NaN before the
  first probe's defined ratio).
  """
  init: Callable[[jax.Array], tuple[Any, jax.Array]]
  update: Callable[[Any, ProbeMeasurement, jax.Array, jax.Array],
                   tuple[Any, jax.Array]]
  needs_loss: bool = False
  every_step: bool = False


class PIControllerState(NamedTuple):
  """State of :func:`pi_controller`.

  Attributes:
    kl_error_ema: float32, EMA of the log-error ``log δ* − log KL``.
    controller_updates: int32, probes the controller acted on.
  """
  kl_error_ema: jax.Array
  controller_updates: jax.Array


def pi_controller(
    *,
    kp: float = 0.15,
    ki: float = 0.02,
    half_life: float = 250.0,
    delta_min: float = 0.01,
    delta_max: float = 0.30,
    max_log_error: float = math.log(10.0),
) -> KLController:
  r"""The reference recipe's PI controller on the applied per-token KL, in log
  space.

  .. math::
    e = \log\delta^* - \log \widehat{\mathrm{KL}},\quad
    \log\delta \leftarrow \mathrm{clip}\big(\log\delta + k_p e + k_i\,
    \mathrm{EMA}_{h}(e),\ \log\delta_{\min}, \log\delta_{\max}\big)

  The error is the log-ratio of target to measured KL (not the difference in
  nats the seed's pseudocode writes): the gains then do not depend on the scale
  of ``δ*``, and with ``k_p = 0.15`` a 2× miss moves ``δ`` by ~10% per probe.
  It is clipped to ``±max_log_error``. The EMA has half-life ``half_life``
  *steps* (its per-probe decay is ``0.5 ** (interval / half_life)``).
  Anti-windup: while the clip is inactive (``c = 1``) a larger ``δ`` cannot
  change the step, so the controller does not grow ``δ`` (nor its integral)
  then; it still shrinks it.

  Args:
    kp: proportional gain (>= 0).
    ki: gain on the error EMA (>= 0).
    half_life: EMA half-life in steps (> 0).
    delta_min: lower clamp on ``δ`` (> 0).
    delta_max: upper clamp on ``δ`` (> ``delta_min``).
    max_log_error: clip on the log error (> 0).

  Returns:
    A :class:`KLController`.
  """
  _validation.check_number("kp", kp, lo=0)
  _validation.check_number("ki", ki, lo=0)
  _validation.check_number("half_life", half_life, lo=0, lo_open=True)
  _validation.check_number("delta_min", delta_min, lo=0, lo_open=True)
  _validation.check_number("delta_max", delta_max, lo=0, lo_open=True)
  _validation.check_number("max_log_error", max_log_error, lo=0, lo_open=True)
  if (_validation._concrete(delta_min) is not None
      and _validation._concrete(delta_max) is not None
      and not delta_min < delta_max):
    raise ValueError(
        f"delta_max must be > delta_min; got delta_min={delta_min}, "
        f"delta_max={delta_max}.")
  log_min, log_max = jnp.log(delta_min), jnp.log(delta_max)

  def init(target_kl):
    delta0 = jnp.clip(jnp.asarray(target_kl, jnp.float32), delta_min, delta_max)
    return PIControllerState(kl_error_ema=jnp.zeros([], jnp.float32),
                             controller_updates=jnp.zeros([], jnp.int32)), delta0

  def update(state, measurement, delta, target_kl):
    err = formulas.pi_log_error(target_kl, measurement.applied_kl,
                                max_log_error)
    decay = formulas.half_life_decay(measurement.interval, half_life)
    log_delta, ema = formulas.pi_step(
        jnp.log(jnp.asarray(delta, jnp.float32)), err, state.kl_error_ema,
        kp=kp, ki=ki, ema_decay=jnp.float32(decay), log_delta_min=log_min,
        log_delta_max=log_max)
    new_delta, ema = formulas.pi_anti_windup(
        delta, log_delta, state.kl_error_ema, ema, err, measurement.clip_scale,
        delta_min, delta_max)
    return PIControllerState(
        kl_error_ema=ema,
        controller_updates=state.controller_updates + 1), new_delta

  return KLController(init=init, update=update)
