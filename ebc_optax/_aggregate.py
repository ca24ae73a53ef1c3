"""Aggregating per-layer contributions into the surrogate ``S`` and the scale ``c``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ebc_optax import _validation

AGGREGATES = ("l1", "l2")
OVERSHOOTS = ("scale", "skip")


def layer_contributions(beta: jax.Array, norms: jax.Array) -> jax.Array:
  """``s_ℓ = β_ℓ ‖ΔW_ℓ‖`` (float32)."""
  return jnp.asarray(beta, jnp.float32) * jnp.asarray(norms, jnp.float32)


def budget_surrogate(contributions: jax.Array, aggregate: str = "l1") -> jax.Array:
  """The surrogate ``S`` bounding the linearised logit change ``‖Σ_ℓ J_ℓ ΔW_ℓ‖``.

  * ``"l1"``: ``S = Σ_ℓ s_ℓ`` (triangle inequality);
  * ``"l2"``: ``S = sqrt(L) · (Σ_ℓ s_ℓ²)^½``, which is ``≥ Σ_ℓ s_ℓ`` by
    Cauchy–Schwarz, so it is still a bound (without ``sqrt(L)`` it is not —
    the seed study's bug). It is never smaller than the L1 surrogate; it is
    offered for parity with the reference implementation.

  Example:
    >>> import jax.numpy as jnp
    >>> s = jnp.array([3., 4.])
    >>> float(budget_surrogate(s, "l1")), round(float(budget_surrogate(s, "l2")), 4)
    (7.0, 7.0711)
  """
  contributions = jnp.asarray(contributions, jnp.float32)
  if aggregate == "l1":
    return jnp.sum(contributions)
  if aggregate == "l2":
    num_layers = contributions.shape[0]
    return jnp.sqrt(jnp.float32(num_layers)) * jnp.sqrt(
        jnp.sum(jnp.square(contributions)))
  raise ValueError(f"aggregate must be one of {AGGREGATES}; got {aggregate!r}.")


def clip_scale(surrogate: jax.Array, radius: jax.Array,
               eps: float = 1e-12, overshoot: str = "scale") -> jax.Array:
  """``c = min(1, τ / max(S, ε))``; with ``overshoot="skip"`` a step beyond
  the radius is refused instead (``c = 0`` when ``S > τ``, else 1).

  Example:
    >>> float(clip_scale(4.0, 1.0)), float(clip_scale(0.5, 1.0))
    (0.25, 1.0)
    >>> float(clip_scale(4.0, 1.0, overshoot="skip"))
    0.0
  """
  surrogate = jnp.asarray(surrogate, jnp.float32)
  radius = jnp.asarray(radius, jnp.float32)
  if overshoot == "skip":
    return jnp.where(surrogate > radius, 0.0, 1.0).astype(jnp.float32)
  _validation.check_choice("overshoot", overshoot, OVERSHOOTS)
  return jnp.minimum(1.0, radius / jnp.maximum(surrogate, eps))
