"""``wrap``: EBC around any base optimizer, with the gradient guarded first."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ebc_optax import _safety
from ebc_optax import _transform
from ebc_optax import _validation


class WrapState(NamedTuple):
  """State of :func:`wrap`.

  Attributes:
    base_state: the base optimizer's state (untouched on a skipped step).
    ebc_state: the state of :func:`ellipsotope_budget_clip`.
    after_state: the state of the ``after`` transformation.
    notfinite_count: int32, consecutive steps whose gradient was not finite.
    last_finite: bool, whether the last gradient was finite.
    total_notfinite: int32, steps whose gradient was not finite, in all.
  """
  base_state: Any
  ebc_state: Any
  after_state: Any
  notfinite_count: jax.Array
  last_finite: jax.Array
  total_notfinite: jax.Array


def wrap(
    base_optimizer: optax.GradientTransformation,
    logits_fn: Callable[[Any, Any], jax.Array],
    *,
    after: optax.GradientTransformation | None = None,
    max_consecutive_errors: int | None = None,
    **ebc_options: Any,
) -> optax.GradientTransformationExtraArgs:
  """EBC around a base optimizer: ``base -> ellipsotope_budget_clip -> after``.

  The front door (the seeds' "a wrapper around any base optimizer"): the base
  proposes the step, EBC scales it by ``c = min(1, τ/S)``, and ``after`` —
  e.g. decoupled weight decay, which should not be clipped — is added last.

  The gradient is checked *before* the base optimizer sees it, as
  ``optax.apply_if_finite`` does: a gradient with a NaN/Inf leaf gives a zero
  update and leaves the base, EBC and ``after`` states exactly as they were
  (so one bad batch cannot poison Adam's moments and stall the run), and is
  counted in ``notfinite_count`` (consecutive) and ``total_notfinite``. With
  ``max_consecutive_errors=n`` the step after ``n`` consecutive rejections is
  applied anyway (``apply_if_finite``'s contract: a run that keeps producing
  non-finite gradients then fails visibly instead of skipping for ever);
  ``None`` rejects every one of them — watch ``notfinite_count``.

  Args:
    base_optimizer: any optax transformation proposing the step
      (``optax.adam(lr)``, ``optax.contrib.prodigy()``, muon, ...). Use a base
      without weight decay and pass the decay as ``after`` (with
      ``optax.adamw`` the decay is part of the proposed step and is clipped
      with it).
    logits_fn: ``(params, batch) -> logits [..., vocab]``.
    after: applied to the clipped step, e.g.
      ``optax.add_decayed_weights(-lr * wd)`` (the sign: the step is already
      LR-scaled and negative).
    max_consecutive_errors: as in ``optax.apply_if_finite`` (>= 0), or None.
    **ebc_options: keyword arguments of :func:`ellipsotope_budget_clip`
      (``target_kl``, ``stacked``, ``kl``, ...).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`WrapState`; ``update(grads, state, params, batch=batch)``.

  Example:
    >>> import jax, jax.numpy as jnp, optax, ebc_optax
    >>> def logits_fn(p, x):
    ...   return jnp.tanh(x @ p["hidden"]) @ p["readout_w"]
    >>> params = {"hidden": jnp.eye(3), "readout_w": jnp.ones((3, 5))}
    >>> tx = ebc_optax.wrap(optax.adam(1e-1), logits_fn)
    >>> state = tx.init(params)
    >>> x = jnp.arange(6.).reshape(2, 3)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params, batch=x)
    >>> bool(ebc_optax.telemetry(state)["c"] <= 1.0)
    True
  """
  _validation.check_number("max_consecutive_errors", max_consecutive_errors,
                           lo=0, integer=True, allow_none=True)
  for name, tx in (("base_optimizer", base_optimizer), ("after", after)):
    if tx is not None and not (hasattr(tx, "init") and hasattr(tx, "update")):
      raise ValueError(
          f"{name} must be an optax.GradientTransformation (with init and "
          f"update); got {tx!r}.")
  base = optax.with_extra_args_support(base_optimizer)
  ebc = _transform.ellipsotope_budget_clip(logits_fn, **ebc_options)
  post = optax.with_extra_args_support(after or optax.identity())

  def init(params):
    return WrapState(
        base_state=base.init(params), ebc_state=ebc.init(params),
        after_state=post.init(params),
        notfinite_count=jnp.zeros([], jnp.int32),
        last_finite=jnp.array(True),
        total_notfinite=jnp.zeros([], jnp.int32))

  def update(grads, state, params=None, **extra_args):
    finite = _safety.tree_all_finite(grads)
    apply = finite
    if max_consecutive_errors is not None:
      apply = jnp.logical_or(
          finite, state.notfinite_count >= max_consecutive_errors)

    def step(_):
      u, base_state = base.update(grads, state.base_state, params, **extra_args)
      u, ebc_state = ebc.update(u, state.ebc_state, params, **extra_args)
      u, after_state = post.update(u, state.after_state, params, **extra_args)
      return u, (base_state, ebc_state, after_state)

    def skip(_):
      return (jax.tree.map(jnp.zeros_like, grads),
              (state.base_state, state.ebc_state, state.after_state))

    updates, (base_state, ebc_state, after_state) = jax.lax.cond(
        apply, step, skip, None)
    bad = (~finite).astype(jnp.int32)
    return updates, WrapState(
        base_state=base_state, ebc_state=ebc_state, after_state=after_state,
        notfinite_count=jnp.where(finite, 0, state.notfinite_count + 1
                                  ).astype(jnp.int32),
        last_finite=finite,
        total_notfinite=state.total_notfinite + bad)

  return optax.GradientTransformationExtraArgs(init, update)
