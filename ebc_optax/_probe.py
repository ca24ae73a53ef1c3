"""The applied-change probe: measure the clipped step, feed controller and guard.

:func:`kl_probe` wraps a :func:`budget_clip`. Every ``probe_every`` steps it
shadow-applies the clipped update on the probe batch (``W + cΔW`` is built as
a temporary; the parameters are not mutated), measures the applied per-token
KL and the centered applied logit change ``T``, runs the guard and the
controller, and writes the new ``δ`` and radius factor into the wrapped
state's slots — used from the next step on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ebc_optax import _clip
from ebc_optax import _controller
from ebc_optax import _guard
from ebc_optax import _logits
from ebc_optax import _validation


class KLProbeState(NamedTuple):
  """State of :func:`kl_probe`.

  Attributes:
    clip_state: the wrapped :class:`BudgetClipState`.
    controller_state: the controller's state (``optax.EmptyState`` if none).
    guard_state: :class:`GuardState`.
    applied_kl: float32, applied per-token KL at the last probe.
    applied_change: float32, ``T`` at the last probe.
    guard_ratio: float32, ``ρ`` at the last probe.
    probe_count: int32, probes run so far.
  """
  clip_state: _clip.BudgetClipState
  controller_state: Any
  guard_state: _guard.GuardState
  applied_kl: jax.Array
  applied_change: jax.Array
  guard_ratio: jax.Array
  probe_count: jax.Array


def measure_applied_change(
    logits_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    updates: Any,
    batch: Any,
    *,
    center_logits: bool = True,
    axis_name: _logits.AxisName = None,
) -> tuple[jax.Array, jax.Array]:
  """``(T, KL)`` of applying ``updates`` to ``params`` on ``batch``.

  ``T`` is the per-token RMS of the centered logit change and ``KL`` the mean
  per-token ``KL(p(W) ‖ p(W + u))``, both over all replicas of ``axis_name``.
  The shadow parameters are ``optax.apply_updates(params, updates)``, exactly
  what the training step will apply.
  """
  z = logits_fn(params, batch)
  _logits.check_logits(z)
  z_new = logits_fn(optax.apply_updates(params, updates), batch)
  dz = z_new.astype(jnp.float32) - z.astype(jnp.float32)
  change = _logits.per_token_rms_norm(dz, center_logits, axis_name)
  return change, _logits.per_token_kl(z, z_new, axis_name)


def _is_probe_step(step: jax.Array, probe_every: int) -> jax.Array:
  every = jnp.asarray(probe_every, jnp.int32)  # may be a tracer
  return jnp.logical_and(every > 0, step % jnp.maximum(every, 1) == 0)


def kl_probe(
    inner: optax.GradientTransformationExtraArgs,
    logits_fn: Callable[[Any, Any], jax.Array],
    *,
    target_kl: float = 0.05,
    controller: _controller.KLController | None = None,
    guard: bool = True,
    probe_every: int = 20,
    probe_batch_size: int | None = None,
    center_logits: bool = True,
    axis_name: _logits.AxisName = None,
    eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
  """Wraps a :func:`budget_clip` with the applied-KL probe, controller and guard.

  Data flow per step: ``inner`` clips with ``τ = sqrt(4δ)·g`` from its state;
  on probe steps (``step % probe_every == 0``, under ``lax.cond``) this
  wrapper measures ``KL`` and ``T`` of the clipped update, computes
  ``ρ = T / max(c·S, ε)``, sets ``g = min(1, 1/ρ)`` when ``guard`` and lets
  ``controller`` propose the next ``δ``. With ``controller=None``, ``δ`` is
  held at ``target_kl`` (re-read every step, so it can be scheduled with
  ``optax.inject_hyperparams``).

  Args:
    inner: a :func:`budget_clip` transformation.
    logits_fn: ``(params, batch) -> logits``.
    target_kl: ``δ*`` (nats/token, > 0): the controller's target, or the fixed
      ``δ`` without a controller.
    controller: a :class:`KLController` (e.g. :func:`pi_controller`) or None.
    guard: enable the shrink-only guard.
    probe_every: steps between probes (>= 1; 0 disables probing).
    probe_batch_size: probe on the first N rows of ``batch``.
    center_logits: center the logit change per token for ``T``.
    axis_name: ``pmap``/``shard_map`` axis to all-reduce over.
    eps: floor on ``c·S`` in ``ρ``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`KLProbeState`.
  """
  _validation.check_number("target_kl", target_kl, lo=0, lo_open=True)
  _validation.check_number("probe_every", probe_every, lo=0, integer=True)
  _validation.check_number("probe_batch_size", probe_batch_size, lo=1,
                           integer=True, allow_none=True)

  def init(params):
    clip_state = inner.init(params)
    if controller is None:
      ctrl_state, delta0 = optax.EmptyState(), jnp.asarray(target_kl, jnp.float32)
    else:
      ctrl_state, delta0 = controller.init(jnp.asarray(target_kl, jnp.float32))
    clip_state = clip_state._replace(
        kl_target=delta0, trust_radius=_logits.trust_radius(delta0))
    zero = jnp.zeros([], jnp.float32)
    return KLProbeState(
        clip_state=clip_state, controller_state=ctrl_state,
        guard_state=_guard.init_guard_state(), applied_kl=zero,
        applied_change=zero, guard_ratio=zero,
        probe_count=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, *, batch=None, **extra_args):
    _clip.require_extra(params, batch, "ellipsotope_budget_clip")
    step = state.clip_state.ebc_step
    new_updates, clip_state = inner.update(
        updates, state.clip_state, params, batch=batch, **extra_args)
    if controller is None:
      clip_state = clip_state._replace(
          kl_target=jnp.asarray(target_kl, jnp.float32))
    def probe(operand):
      clip_state, ctrl_state, guard_state = operand
      # Rebuild c·ΔW from the incoming updates rather than closing over the
      # outgoing ones: the outgoing update then stays fusible into the caller's
      # apply_updates instead of being materialised as a cond operand.
      change, kl = measure_applied_change(
          logits_fn, params, _clip.scale_updates(updates, clip_state.clip_scale),
          _clip.take_probe_rows(batch, probe_batch_size),
          center_logits=center_logits, axis_name=axis_name)
      ratio = _guard.guard_ratio(change, clip_state.clip_scale,
                                 clip_state.surrogate, eps)
      factor = clip_state.radius_factor
      if guard:
        guard_state, factor = _guard.guard_update(guard_state, ratio)
      delta = clip_state.kl_target
      if controller is not None:
        measurement = _controller.ProbeMeasurement(
            applied_kl=kl, applied_change=change,
            clip_scale=clip_state.clip_scale, surrogate=clip_state.surrogate,
            guard_ratio=ratio, interval=probe_every)
        ctrl_state, delta = controller.update(
            ctrl_state, measurement, delta, jnp.asarray(target_kl, jnp.float32))
      clip_state = clip_state._replace(kl_target=delta, radius_factor=factor)
      return (clip_state, ctrl_state, guard_state), (kl, change, ratio, jnp.int32(1))

    def skip(operand):
      return operand, (state.applied_kl, state.applied_change,
                       state.guard_ratio, jnp.int32(0))

    operand = (clip_state, state.controller_state, state.guard_state)
    (clip_state, ctrl_state, guard_state), (kl, change, ratio, ran) = (
        jax.lax.cond(_is_probe_step(step, probe_every), probe, skip, operand))
    return new_updates, KLProbeState(
        clip_state=clip_state, controller_state=ctrl_state,
        guard_state=guard_state, applied_kl=kl, applied_change=change,
        guard_ratio=ratio, probe_count=state.probe_count + ran)

  return optax.GradientTransformationExtraArgs(init, update)
