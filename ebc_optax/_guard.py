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
it had (:func:`~ebc_optax.formulas.guard_factor` of NaN is 1, for a caller
without one). The equations are in :mod:`ebc_optax.formulas`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ebc_optax import formulas


class GuardState(NamedTuple):
  """State of the guard.

  Attributes:
    guard_trips: int32, probes with ``ρ > 1``.
  """
  guard_trips: jax.Array


def init_guard_state() -> GuardState:
  return GuardState(guard_trips=jnp.zeros([], jnp.int32))


def guard_update(state: GuardState, ratio: jax.Array, factor: jax.Array
                 ) -> tuple[GuardState, jax.Array]:
  """Returns the new guard state and the radius factor for the next steps
  (``factor``, the one in use, is kept when ``ρ`` is undefined)."""
  trips = state.guard_trips + (ratio > 1.0).astype(jnp.int32)
  return GuardState(guard_trips=trips), formulas.next_guard_factor(ratio, factor)
