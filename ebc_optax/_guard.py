"""The shrink-only guard on the applied logit change.

On a probe, ``ρ = T / max(c·S, ε)`` compares the measured applied change ``T``
with what the surrogate promised for the clipped step, ``c·S``. ``ρ > 1`` means
the surrogate under-estimated (stale or non-linear ``β``): the trust radius is
then multiplied by ``1/ρ``. The factor is recomputed from each probe's ``ρ`` —
``ρ`` is a property of the surrogate, not of ``τ`` — so the guard never raises
``τ`` above the controller's ``sqrt(4δ)`` and relaxes only when a later probe
shows the surrogate no longer under-estimates. When the surrogate promised
no change (``c·S <= ε``: only leaves outside the budget moved, or nothing
did) there is no ratio: ``ρ`` is NaN and :func:`kl_probe` keeps the factor
it had (:func:`guard_factor` of NaN is 1, for a caller without one).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class GuardState(NamedTuple):
  """State of the guard.

  Attributes:
    guard_trips: int32, probes with ``ρ > 1``.
  """
  guard_trips: jax.Array


def init_guard_state() -> GuardState:
  return GuardState(guard_trips=jnp.zeros([], jnp.int32))


def guard_ratio(applied_change: jax.Array, clip_scale: jax.Array,
                surrogate: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``ρ = T / (c·S)`` (float32); NaN when ``c·S <= eps`` (no denominator).

  Example:
    >>> float(guard_ratio(3.0, 0.5, 4.0)), float(guard_ratio(3.0, 1.0, 0.0))
    (1.5, nan)
  """
  predicted = jnp.asarray(clip_scale, jnp.float32) * jnp.asarray(surrogate, jnp.float32)
  ratio = jnp.asarray(applied_change, jnp.float32) / jnp.maximum(predicted, eps)
  return jnp.where(predicted > eps, ratio, jnp.nan).astype(jnp.float32)


def guard_factor(ratio: jax.Array) -> jax.Array:
  """Shrink-only radius factor ``min(1, 1/ρ)``; 1 for an undefined (NaN) ``ρ``.

  Example:
    >>> float(guard_factor(2.0)), float(guard_factor(0.5)), float(guard_factor(float("nan")))
    (0.5, 1.0, 1.0)
  """
  ratio = jnp.asarray(ratio, jnp.float32)
  return jnp.where(ratio > 1.0, 1.0 / ratio, 1.0).astype(jnp.float32)


def guard_update(state: GuardState, ratio: jax.Array) -> tuple[GuardState, jax.Array]:
  """Returns the new guard state and the radius factor for the next steps."""
  trips = state.guard_trips + (ratio > 1.0).astype(jnp.int32)
  return GuardState(guard_trips=trips), guard_factor(ratio)
