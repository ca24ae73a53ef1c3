"""The budgeted clip: ``c = min(1, τ / S)`` applied to the whole update.

:func:`budget_clip` is the EBC transformation with a fixed trust radius: it
refreshes ``β`` (through a :class:`~ebc_optax.advanced.SensitivityEstimator`), forms
``S = agg_ℓ(β_ℓ ‖ΔW_ℓ‖)`` and scales every update leaf by ``c``. A wrapper
that adapts the KL target ``δ`` or the guard's radius factor
(:func:`~ebc_optax.advanced.kl_probe`) owns them and passes them *down* at every
``update`` (the keyword arguments ``kl_target`` and ``radius_factor``), as
``optax.inject_hyperparams`` passes hyperparameters: the clip records what it
used and never knows it is wrapped.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ebc_optax import _layers
from ebc_optax import _sensitivity
from ebc_optax import _validation
from ebc_optax import formulas


class BudgetClipState(NamedTuple):
  """State of :func:`budget_clip`; the per-step fields describe the last step.

  Attributes:
    ebc_step: int32, number of updates applied so far (drives the cadences).
    sensitivity: the β estimator's state.
    kl_target: float32, the KL target ``δ`` (nats/token) used at the last step.
    radius_factor: float32 in ``(0, 1]``, the guard's factor on ``τ`` used
      at the last step.
    trust_radius: float32, ``τ = sqrt(4δ) · radius_factor`` at the last step.
    surrogate: float32, ``S`` at the last step (per-token units).
    clip_scale: float32, ``c`` applied at the last step.
    layer_contribution: ``[L]`` float32, ``s_ℓ = safety·β_ℓ·‖ΔW_ℓ‖``.
    clipped_steps: int32, steps with ``c < 1``.
    linear_change: float32, ``aggregate="exact"`` only (None otherwise): the
      linearised change ``‖J ΔW‖`` of the whole proposed update at its last
      measurement.
    surrogate_calibration: float32, ``aggregate="exact"`` only (None
      otherwise): ``‖J ΔW‖ / S_β`` at the last measurement, the factor on the
      L1 β-surrogate between measurements (``exact_every > 1``; 1 otherwise).
    update_norm: float32, ``‖ΔW‖`` of the whole incoming update (every
      inexact leaf, budgeted or not) at the last step. Finite exactly when
      the update is, so a finite state certifies a finite output ``c·ΔW``
      (:func:`skip_nonfinite` needs no pass over the update leaves).
  """
  ebc_step: jax.Array
  sensitivity: _sensitivity.SensitivityState
  kl_target: jax.Array
  radius_factor: jax.Array
  trust_radius: jax.Array
  surrogate: jax.Array
  clip_scale: jax.Array
  layer_contribution: jax.Array
  clipped_steps: jax.Array
  linear_change: jax.Array | None
  surrogate_calibration: jax.Array | None
  update_norm: jax.Array


def require_extra(params: Any, batch: Any, who: str) -> None:
  if params is None:
    raise ValueError(
        f"{who} needs `params` (the current parameters) in update(updates, "
        "state, params, batch=...).")
  if batch is None:
    raise ValueError(
        f"{who} needs the keyword argument `batch` (what logits_fn(params, "
        "batch) consumes) in update(updates, state, params, batch=batch).")


def scale_updates(updates: Any, scale: jax.Array) -> Any:
  """``c · u`` computed in float32, cast back to each leaf's dtype."""
  return jax.tree.map(
      lambda u: (u.astype(jnp.float32) * scale).astype(u.dtype), updates)


AGGREGATES = formulas.AGGREGATES + ("exact",)


def _norms(leaves: list[jax.Array], part: _layers.LayerPartition
           ) -> tuple[jax.Array, jax.Array]:
  """``([L] per-layer norms, norm of every inexact leaf)``, one pass each."""
  sq = _layers.per_layer_sum(_layers.leaf_sq_norms(leaves, part), part)
  rest = [jnp.sum(jnp.square(x.astype(jnp.float32)))
          for x, slot in zip(leaves, part.leaf_layers)
          if slot is None and jnp.issubdtype(x.dtype, jnp.inexact)]
  total = sum(rest, jnp.sum(sq))
  return jnp.sqrt(sq), jnp.sqrt(total)


def _check_update(part: _layers.LayerPartition, state: BudgetClipState,
                  updates: Any, params: Any) -> None:
  """Raises unless ``params`` give the layers ``state`` was initialised for
  and ``updates`` has the structure of ``params``."""
  _layers.check_budget(part, "budget_clip", warn=False)
  _layers.check_state_layers(part, state.layer_contribution.shape[0])
  if jax.tree.structure(updates) != jax.tree.structure(params):
    raise ValueError(
        "updates and params must have the same tree structure; got "
        f"{jax.tree.structure(updates)} vs {jax.tree.structure(params)}.")


def budget_clip(
    estimator: _sensitivity.SensitivityEstimator,
    *,
    target_kl: float,
    aggregate: str,
    exact_every: int,
    layer_labels: _layers.LayerLabelsFn | None = None,
    include_embed_out: bool,
    stacked: _layers.Stacked = None,
    overshoot: str,
    eps: float,
) -> optax.GradientTransformationExtraArgs:
  r"""Scales the whole update by ``c = min(1, τ / S)``.

  .. math::
    S = \mathrm{agg}_\ell\big(\beta_\ell \lVert \Delta W_\ell \rVert\big), \quad
    \tau = \sqrt{4\delta}\cdot g, \quad c = \min(1, \tau / \max(S, \epsilon))

  with per-token ``β`` (see :func:`sensitivity_estimator`), ``δ`` the
  ``kl_target`` and ``g`` the ``radius_factor`` passed to ``update`` (by a
  wrapper such as :func:`kl_probe`; ``target_kl`` and 1 when none is
  passed). Embedding/output groups left out of the budget are scaled by
  ``c`` as well, so the update direction never changes. β, ``‖J ΔW‖`` and
  the rows they are measured on follow the estimator (its ``metric``).

  With ``aggregate="exact"`` there is no triangle inequality: ``S = ‖J ΔW‖``,
  the linearised change of the whole budgeted update, from one JVP on the
  probe rows every ``exact_every`` steps. With ``exact_every == 1`` the β
  estimator is not run at all (``beta``/``contribution`` stay 0); otherwise
  between measurements ``S = k · S_L1`` with ``k = ‖J ΔW‖ / S_L1`` from the
  last measurement. Sizes are in the estimator's ``kl`` metric.

  Args:
    estimator: the β estimator (:func:`sensitivity_estimator`).
    target_kl: ``δ`` in nats/token (> 0) when ``update`` is not given a
      ``kl_target``.
    aggregate: ``"l1"``, ``"l2"`` (see :func:`budget_surrogate`) or
      ``"exact"``.
    exact_every: steps between ``‖J ΔW‖`` measurements (``"exact"``; >= 1,
      static).
    layer_labels: ``params -> pytree of str``; default
      :func:`default_layer_labels`.
    include_embed_out: keep embedding/output groups in the budget.
    stacked: label prefixes of layers stacked on axis 0 (``nn.scan`` /
      ``nnx.scan`` models): slice ``i`` of every leaf under prefix ``p`` is
      layer ``"p/i"`` (see :func:`partition_layers`).
    overshoot: what happens to a step with ``S > τ``: ``"scale"`` (``c =
      τ/S``: the step is cut back to the radius) or ``"skip"`` (``c = 0``: the
      step is refused; use it with a radius that ordinary steps fit, such as
      :func:`relative_radius`'s, or training stops).
    eps: floor on ``S``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update(updates, state,
    params, *, batch, kl_target=None, radius_factor=None)`` requires
    ``params`` and ``batch``.
  """
  _validation.check_number("target_kl", target_kl, lo=0, lo_open=True)
  _validation.check_choice("aggregate", aggregate, AGGREGATES)
  _validation.check_choice("overshoot", overshoot, formulas.OVERSHOOTS)
  _validation.check_number("exact_every", exact_every, lo=1, integer=True)
  _validation.check_number("eps", eps, lo=0, lo_open=True)
  exact = aggregate == "exact"
  # A traced exact_every (optax.inject_hyperparams) keeps the β estimator.
  beta_needed = not exact or isinstance(exact_every, jax.core.Tracer) or (
      int(exact_every) > 1)
  stacked = _layers.check_stacked(stacked)

  def partition(params):
    return _layers.partition_layers(params, layer_labels, include_embed_out,
                                    stacked)

  def init(params):
    part = partition(params)
    if part.labels:
      _layers.check_budget(part, "budget_clip")
    num_layers = len(part.labels)
    kl = jnp.asarray(target_kl, jnp.float32)
    return BudgetClipState(
        ebc_step=jnp.zeros([], jnp.int32),
        sensitivity=estimator.init(num_layers),
        kl_target=kl,
        radius_factor=jnp.ones([], jnp.float32),
        trust_radius=formulas.trust_radius(kl),
        surrogate=jnp.zeros([], jnp.float32),
        clip_scale=jnp.ones([], jnp.float32),
        layer_contribution=jnp.zeros([num_layers], jnp.float32),
        clipped_steps=jnp.zeros([], jnp.int32),
        linear_change=jnp.zeros([], jnp.float32) if exact else None,
        surrogate_calibration=jnp.ones([], jnp.float32) if exact else None,
        update_norm=jnp.zeros([], jnp.float32),
    )

  def surrogate_of(state, part, params, updates, probe_batch, contributions):
    """``(linear_change, calibration, S)`` of this step (see the docstring)."""
    linear, calibration = state.linear_change, state.surrogate_calibration
    if not exact:
      return linear, calibration, formulas.budget_surrogate(contributions,
                                                            aggregate)
    if not beta_needed:
      linear = estimator.linear_change(part, params, updates, probe_batch)
      return linear, calibration, linear
    base = formulas.budget_surrogate(contributions, "l1")

    def measure(_):
      t = estimator.linear_change(part, params, updates, probe_batch)
      return t, formulas.exact_calibration(t, base, calibration, eps), t

    def keep(_):
      return linear, calibration, formulas.calibrated_surrogate(calibration,
                                                                base)
    return jax.lax.cond(
        state.ebc_step % jnp.asarray(exact_every, jnp.int32) == 0,
        measure, keep, None)

  def update(updates, state, params=None, *, batch=None, kl_target=None,
             radius_factor=None, **extra_args):
    del extra_args
    require_extra(params, batch, "budget_clip")
    part = partition(params)
    _check_update(part, state, updates, params)
    # Measure: the update's norms, β (refreshed as planned) and S.
    probe_batch = estimator.probe_batch(params, batch)
    norms, update_norm = _norms(jax.tree.leaves(updates), part)
    sens, contributions = state.sensitivity, state.layer_contribution
    if beta_needed:
      sens = estimator.update(sens, state.ebc_step, part, params, updates,
                              probe_batch, norms)
      contributions = formulas.layer_contributions(
          estimator.effective_beta(sens), norms)
    linear, calibration, surrogate = surrogate_of(
        state, part, params, updates, probe_batch, contributions)
    # The formulas: τ = sqrt(4δ)·g and c = min(1, τ/S).
    delta = jnp.asarray(target_kl if kl_target is None else kl_target,
                        jnp.float32)
    factor = jnp.asarray(1.0 if radius_factor is None else radius_factor,
                         jnp.float32)
    radius = formulas.guarded_radius(delta, factor)
    scale = formulas.clip_scale(surrogate, radius, eps, overshoot)
    return scale_updates(updates, scale), state._replace(
        ebc_step=state.ebc_step + 1, kl_target=delta, radius_factor=factor,
        sensitivity=sens, trust_radius=radius, surrogate=surrogate,
        clip_scale=scale, layer_contribution=contributions,
        clipped_steps=state.clipped_steps + (scale < 1.0).astype(jnp.int32),
        linear_change=linear, surrogate_calibration=calibration,
        update_norm=update_norm)

  return optax.GradientTransformationExtraArgs(init, update)
