"""Skipping steps whose update or EBC statistics are not finite."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class NonFiniteSkipState(NamedTuple):
  """State of :func:`skip_nonfinite`.

  Attributes:
    inner_state: the wrapped transformation's state.
    nonfinite_skips: int32, steps skipped because something was not finite.
  """
  inner_state: Any
  nonfinite_skips: jax.Array


def tree_all_finite(tree: Any) -> jax.Array:
  """Whether every inexact leaf of ``tree`` is finite (a bool scalar)."""
  leaves = [x for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def skip_nonfinite(
    inner: optax.GradientTransformation,
    *,
    check_updates: bool = True,
) -> optax.GradientTransformationExtraArgs:
  """Zero update and unchanged inner state when the step is not finite.

  Unlike ``optax.apply_if_finite``, which looks at the incoming updates only,
  this checks everything ``inner`` produced — the outgoing updates and every
  inexact leaf of its new state (for EBC: ``β``,
  ``S``, ``c``, the probe's KL and ``T``, ``δ``). When anything is NaN/Inf the
  step returns zeros, keeps the old inner state and counts the skip, so the
  next finite step proceeds as if the bad one never came. It never gives up.

  Args:
    inner: the transformation to protect.
    check_updates: also check every leaf of the outgoing updates. EBC's
      composition passes False: its state holds ``update_norm`` (finite
      exactly when the incoming update is) and ``c``, so a finite state
      certifies a finite ``c·u``, and a pass over every update leaf — which
      XLA fuses into the producers of the update and which more than doubled
      the step's compile time on deep models — is not needed.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`NonFiniteSkipState`.
  """
  inner = optax.with_extra_args_support(inner)

  def init(params):
    return NonFiniteSkipState(inner_state=inner.init(params),
                              nonfinite_skips=jnp.zeros([], jnp.int32))

  def update(updates, state, params=None, **extra_args):
    new_updates, new_inner = inner.update(updates, state.inner_state, params,
                                          **extra_args)
    # The incoming updates need no pass of their own: EBC's output is c·u, and
    # a NaN/Inf in u makes c·u non-finite for every c (Inf makes S = Inf, c = 0).
    # Without check_updates, the inner state must witness u (EBC's update_norm).
    ok = tree_all_finite(new_inner)
    if check_updates:
      ok = jnp.logical_and(ok, tree_all_finite(new_updates))
    out = jax.tree.map(lambda u: jnp.where(ok, u, jnp.zeros_like(u)), new_updates)
    kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_inner,
                        state.inner_state)
    return out, NonFiniteSkipState(
        inner_state=kept,
        nonfinite_skips=state.nonfinite_skips + (~ok).astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init, update)
