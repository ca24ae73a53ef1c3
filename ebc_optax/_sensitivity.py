"""Estimating the per-layer directional sensitivities ``β_ℓ``.

``β_ℓ = ‖center(J_ℓ U_ℓ)‖ / sqrt(N)`` is the per-token RMS change of the
centered logits when layer ``ℓ`` alone moves by a unit step along its proposed
update direction ``U_ℓ = ΔW_ℓ / ‖ΔW_ℓ‖``. A refresh linearises ``logits_fn``
once in the budgeted leaves (``jax.linearize``) and applies the linear map to
the update masked to each refreshed layer — whole leaves, or one slice of
leaves stacked on a leading axis — inside one ``fori_loop``, so the compiled
step holds one copy of the model's tangent program whatever the depth (a
central finite difference is the fallback). Estimates are refreshed
round-robin, Huber-clipped against their EMA, smoothed, and scaled by a
safety factor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp

from ebc_optax import _layers
from ebc_optax import _logits
from ebc_optax import _rows
from ebc_optax import _validation
from ebc_optax import cadence
from ebc_optax import formulas

LogitsFn = Callable[[Any, Any], jax.Array]
SENSITIVITY_METHODS = ("jvp", "fd")


class SensitivityState(NamedTuple):
  """State of the β estimator.

  Attributes:
    layer_beta: ``[L]`` float32, smoothed per-token sensitivity of each
      budgeted layer, *before* the safety factor.
    beta_measured: ``[L]`` bool, whether the layer has been measured at least
      once along a non-zero update.
    beta_cursor: int32, next layer of the round-robin refresh.
    beta_refreshed: int32, layers measured at the last update: 0, the
      round-robin's ``probe_layers``, or every layer on a full sweep (what
      :mod:`ebc_optax.cadence` planned for that step, and ran).
  """
  layer_beta: jax.Array
  beta_measured: jax.Array
  beta_cursor: jax.Array
  beta_refreshed: jax.Array


def init_sensitivity_state(num_layers: int) -> SensitivityState:
  return SensitivityState(
      layer_beta=jnp.zeros([num_layers], jnp.float32),
      beta_measured=jnp.zeros([num_layers], jnp.bool_),
      beta_cursor=jnp.zeros([], jnp.int32),
      beta_refreshed=jnp.zeros([], jnp.int32),
  )


def layer_norms(update_leaves: Sequence[jax.Array],
                partition: _layers.LayerPartition) -> jax.Array:
  """``[L]`` float32 Frobenius norms ``‖ΔW_ℓ‖`` of each budgeted layer (slice)."""
  return _layers.layer_norms(update_leaves, partition)


def check_full_sweep_every(value: Any) -> None:
  """``"auto"``, None or an int ``>= 0`` (a tracer passes)."""
  if isinstance(value, str):
    if value != "auto":
      raise ValueError(
          f"full_sweep_every must be 'auto' or an int >= 0 (0/None: no "
          f"periodic sweep); got the string {value!r}.")
    return
  _validation.check_number("full_sweep_every", value, lo=0, integer=True,
                           allow_none=True)


def check_float_leaves(param_leaves: Sequence[Any],
                       partition: _layers.LayerPartition) -> None:
  """Raises, naming the leaf by path, for a budgeted non-float leaf (integer
  leaves are never budgeted; a complex one can be)."""
  for i in partition.budgeted_leaves:
    if not jnp.issubdtype(param_leaves[i].dtype, jnp.floating):
      raise ValueError(
          f"Budgeted parameter {partition.leaf_paths[i]!r} has dtype "
          f"{param_leaves[i].dtype}; EBC needs real floating-point parameters "
          "in its layers (leave this leaf out with layer_labels, or give it "
          "an embedding/output label).")


def masked_direction(update_leaves: Sequence[jax.Array],
                     partition: _layers.LayerPartition,
                     weights: jax.Array) -> list[jax.Array]:
  """The budgeted leaves of the update, each layer (slice) times ``weights[ℓ]``.

  With ``weights`` one-hot at a (traced) layer, this is that layer's part of
  the update — whole leaves or one slice of stacked leaves — as float32
  arrays, one per budgeted leaf.
  """
  return [u.astype(jnp.float32) * _layers.for_leaf(weights, slot, u.ndim)
          for u, slot in zip(update_leaves, partition.leaf_layers)
          if slot is not None]


def layer_change_fn(
    logits_fn: LogitsFn,
    param_leaves: Sequence[jax.Array],
    treedef: Any,
    partition: _layers.LayerPartition,
    batch: Any,
    *,
    method: str = "jvp",
    fd_step: float = 1e-2,
) -> Callable[[list[jax.Array], jax.Array], tuple[jax.Array, jax.Array]]:
  """``change(direction, eps) -> (z, J·direction)`` over the budgeted leaves.

  One compiled program for every layer: the caller masks the direction to the
  layer (slice) it measures (:func:`masked_direction`). With ``"jvp"`` the
  logits are linearised once (``jax.linearize``; the primal forward runs once
  per refresh, not once per layer) and each call applies the linear map, so a
  refresh of ``k`` layers costs one forward plus ``k`` tangent passes; ``eps``
  is unused. With ``"fd"`` each call is a central difference
  ``(f(W + εU) − f(W − εU)) / 2ε`` with ``z`` their mean.
  """
  idx = partition.budgeted_leaves
  sub = [param_leaves[i] for i in idx]
  f = logits_of(logits_fn, param_leaves, treedef, idx, batch)
  if method == "jvp":
    z, f_lin = jax.linearize(f, sub)

    def change(direction, eps):
      del eps
      tangents = [u.astype(w.dtype) for u, w in zip(direction, sub)]
      return z, f_lin(tangents).astype(jnp.float32)
    return change
  return lambda direction, eps: _central_difference(f, sub, direction, eps)


def logits_of(logits_fn: LogitsFn, param_leaves: Sequence[jax.Array],
              treedef: Any, indices: Sequence[int], batch: Any
              ) -> Callable[[list[jax.Array]], jax.Array]:
  """The logits as a function of the leaves ``indices`` (the rest closed over)."""
  def f(sub_leaves):
    leaves = list(param_leaves)
    for i, v in zip(indices, sub_leaves):
      leaves[i] = v
    return logits_fn(jax.tree.unflatten(treedef, leaves), batch)
  return f


def _central_difference(f: Callable[[list[jax.Array]], jax.Array],
                        sub: Sequence[jax.Array], direction: Sequence[jax.Array],
                        eps: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(mean of f(W ± εU), (f(W + εU) − f(W − εU)) / 2ε)`` in float32."""
  def shifted(sign):
    return [(w.astype(jnp.float32) + sign * eps * u).astype(w.dtype)
            for w, u in zip(sub, direction)]
  z_plus = f(shifted(1.0)).astype(jnp.float32)
  z_minus = f(shifted(-1.0)).astype(jnp.float32)
  return formulas.central_difference(z_plus, z_minus, eps)


def directional_logit_change(
    logits_fn: LogitsFn,
    param_leaves: Sequence[jax.Array],
    treedef: Any,
    indices: Sequence[int],
    direction: Sequence[jax.Array],
    batch: Any,
    *,
    method: str = "jvp",
    fd_step: float = 1e-2,
    with_primal: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """``J_ℓ U`` (float32 logits change) for a direction ``U`` on the leaves ``indices``.

  Only the leaves of layer ``ℓ`` are inputs of the differentiated function; the
  rest of the parameters are closed over.

  Args:
    logits_fn: ``(params, batch) -> logits``.
    param_leaves: ``jax.tree.leaves(params)``.
    treedef: the tree definition of ``params``.
    indices: leaf indices of the layer.
    direction: one array per index, the (float32) direction ``U``.
    batch: the probe batch.
    method: ``"jvp"`` (exact forward mode) or ``"fd"`` (central difference
      with step :func:`~ebc_optax.formulas.fd_epsilon`).
    fd_step: relative finite-difference step.
    with_primal: also return the logits at ``params`` (for ``"fd"``, the
      mean of the two evaluations, exact to ``O(h²)``).

  Returns:
    The logit change along ``U``, float32, shape of the logits; with
    ``with_primal``, the pair ``(logits, change)``.
  """
  sub = [param_leaves[i] for i in indices]
  f = logits_of(logits_fn, param_leaves, treedef, indices, batch)
  if method == "jvp":
    tangents = [u.astype(w.dtype) for u, w in zip(direction, sub)]
    z, dz = jax.jvp(f, (sub,), (tangents,))
    dz = dz.astype(jnp.float32)
    return (z, dz) if with_primal else dz
  eps = formulas.fd_epsilon(
      sum(jnp.sum(jnp.square(w.astype(jnp.float32))) for w in sub),
      sum(w.size for w in sub), fd_step)
  z, dz = _central_difference(f, sub, direction, eps)
  return (z, dz) if with_primal else dz


class LogitMetric(NamedTuple):
  """How logit changes are measured: one spec, owned by the estimator.

  The β refresh, ``‖J ΔW‖``, and the applied-change probe of
  :func:`~ebc_optax.advanced.kl_probe` all measure with it, so they cannot disagree.
  It describes the estimator it belongs to (read-only): build another
  estimator to measure differently.

  Attributes:
    kl: ``"bound"`` (centered Euclidean) or ``"fisher"`` (softmax Fisher norm).
    center_logits: center logit changes per token (``"bound"``).
    axis_name: ``pmap`` / ``shard_map`` axis the sums are all-reduced over.
    probe_batch_size: the probe rows (see :mod:`ebc_optax._rows`): a
      fraction, a row count or None (all rows).
    probe_batch_fn: ``batch -> probe batch``, overriding ``probe_batch_size``.
  """
  kl: str = "bound"
  center_logits: bool = True
  axis_name: formulas.AxisName = None
  probe_batch_size: _rows.ProbeBatchSize = None
  probe_batch_fn: _rows.ProbeBatchFn | None = None


def _checked_leaves(state: SensitivityState,
                    partition: _layers.LayerPartition, params: Any
                    ) -> tuple[list[jax.Array], Any]:
  """``jax.tree.flatten(params)``, once ``state`` is known to hold one β per
  budgeted layer and every budgeted leaf to be real floating point."""
  chex.assert_shape(state.layer_beta, (len(partition.labels),))
  param_leaves, treedef = jax.tree.flatten(params)
  check_float_leaves(param_leaves, partition)
  return param_leaves, treedef


def _fd_steps(param_leaves: Sequence[jax.Array],
              partition: _layers.LayerPartition, sensitivity: str,
              fd_step: float) -> jax.Array:
  """``[L]`` FD steps, one per layer (slice), relative to its RMS entry
  (:func:`~ebc_optax.formulas.fd_epsilon`); the JVP needs none (ones), so no
  pass over the weights is added to its step."""
  if sensitivity == "jvp":
    return jnp.ones([len(partition.labels)], jnp.float32)
  sq = _layers.per_layer_sum(_layers.leaf_sq_norms(param_leaves, partition),
                             partition)
  return formulas.fd_epsilon(sq, _layers.layer_sizes(param_leaves, partition),
                             fd_step)


def _refresh_plan(state: SensitivityState, step: jax.Array, active: jax.Array,
                  full_sweep_every: int | str | None, update_every: int,
                  probe_layers: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(full, n, start)``: whether this step is a full sweep (a sweep step of
  :mod:`~ebc_optax.cadence`, or some active layer never measured), how many
  layers it refreshes and from which one (round-robin from the cursor)."""
  num_layers = state.layer_beta.shape[0]
  step = jnp.asarray(step, jnp.int32)
  unmeasured = jnp.any(jnp.logical_and(active, ~state.beta_measured))
  full = jnp.logical_or(unmeasured, cadence.is_sweep(  # may be a tracer
      step, cadence.sweep_interval(full_sweep_every, num_layers)))
  round_robin = cadence.is_refresh(step, update_every)
  k = jnp.minimum(jnp.asarray(probe_layers, jnp.int32), num_layers)
  n = jnp.where(full, num_layers, jnp.where(round_robin, k, 0))
  return full, n, jnp.where(full, 0, state.beta_cursor)


def _measure_beta(change: Callable[..., tuple[jax.Array, jax.Array]],
                  update_leaves: Sequence[jax.Array],
                  partition: _layers.LayerPartition, weights: jax.Array,
                  eps: jax.Array, metric: LogitMetric) -> jax.Array:
  """One fresh ``β`` of the layer ``weights`` selects (one-hot, times
  ``1/‖ΔW_ℓ‖``): the per-token RMS of ``J_ℓ U_ℓ`` over all replicas."""
  z, dz = change(masked_direction(update_leaves, partition, weights), eps)
  sq = formulas.change_sq_sum(dz, z, kl=metric.kl, center=metric.center_logits)
  ntok = jnp.asarray(formulas.token_count(dz), jnp.float32)
  if metric.axis_name is not None:
    sq, ntok = jax.lax.psum((sq, ntok), metric.axis_name)
  return formulas.beta_estimate(sq, ntok)


def _record_beta(carry: tuple[jax.Array, jax.Array], layer: jax.Array,
                 estimate: jax.Array, active: jax.Array, beta_ema: float,
                 huber_ratio: float) -> tuple[jax.Array, jax.Array]:
  """``(β, measured)`` with layer ``layer``'s entry updated by the robust EMA
  (:func:`~ebc_optax.formulas.robust_ema`); kept as is for a zero update."""
  beta, measured = carry
  new = formulas.robust_ema(beta[layer], estimate, measured[layer], beta_ema,
                            huber_ratio)
  beta = beta.at[layer].set(jnp.where(active, new, beta[layer]))
  measured = measured.at[layer].set(jnp.logical_or(measured[layer], active))
  return beta, measured


class SensitivityEstimator(NamedTuple):
  """The β estimator: ``init(num_layers)`` and ``update(...)``, both pure.

  ``update(state, step, partition, params, updates, batch, norms)`` returns
  the new :class:`SensitivityState`; ``effective_beta(state)`` is
  ``safety · β``; ``linear_change(partition, params, updates, batch)`` is the
  per-token size of the linearised change of the whole (budgeted) update,
  ``‖J ΔW‖``, from one JVP (the ``aggregate="exact"`` mode);
  ``probe_batch(params, batch)`` the probe rows of ``batch``, which the
  other methods expect as their ``batch``. All sizes are in the metric
  ``metric`` of ``logits_fn``'s logits.
  """
  init: Callable[[int], SensitivityState]
  update: Callable[..., SensitivityState]
  effective_beta: Callable[[SensitivityState], jax.Array]
  linear_change: Callable[..., jax.Array]
  probe_batch: Callable[[Any, Any], Any]
  logits_fn: LogitsFn
  metric: LogitMetric


def sensitivity_estimator(
    logits_fn: LogitsFn,
    *,
    sensitivity: str,
    update_every: int,
    probe_layers: int,
    full_sweep_every: int | str | None,
    beta_ema: float,
    huber_ratio: float,
    safety: float,
    center_logits: bool,
    fd_step: float,
    kl: str,
    axis_name: formulas.AxisName = None,
    probe_batch_size: _rows.ProbeBatchSize,
    probe_batch_fn: _rows.ProbeBatchFn | None = None,
) -> SensitivityEstimator:
  """Round-robin, EMA-smoothed estimator of per-layer sensitivities ``β_ℓ``.

  Refresh schedule (``step`` counts the updates that were applied so far):

  * every layer when ``step % sweep_interval(full_sweep_every, L) == 0``
    (this includes the first update) or when some layer with a non-zero
    update has never been measured — no step runs with an unmeasured ``β``;
  * otherwise ``probe_layers`` layers, round-robin, when
    ``step % update_every == 0``;
  * layers whose update is exactly zero are skipped (their ``β`` is kept).

  Per-replica squared norms and token counts are ``psum``-ed over
  ``axis_name``, so every replica gets the same ``β``.

  Args:
    logits_fn: ``(params, batch) -> logits [..., vocab]``.
    sensitivity: ``"jvp"`` or ``"fd"``.
    update_every: steps between round-robin refreshes (>= 1).
    probe_layers: layers per round-robin refresh (>= 1).
    full_sweep_every: steps between full sweeps (``None``/0: only the
      first); ``"auto"``: 200 per 8 budgeted layers
      (:func:`ebc_optax.cadence.sweep_interval`).
    beta_ema: EMA decay in ``[0, 1)``; 0 uses each fresh estimate as is.
    huber_ratio: a fresh estimate is clipped to within this factor of the EMA.
    safety: multiplier (>= 1 is conservative) applied to the smoothed ``β``.
    center_logits: center logit changes per token before taking norms.
    fd_step: relative finite-difference step (``sensitivity="fd"``).
    kl: metric of the logit change: ``"bound"`` (centered Euclidean, the
      reference recipe's) or ``"fisher"`` (``sqrt(2·Var_p)``, the softmax Fisher
      norm at the current logits); see
      :func:`~ebc_optax.formulas.change_sq_sum`.
    axis_name: ``pmap``/``shard_map`` axis to all-reduce over.
    probe_batch_size: rows of ``batch`` the measurements use (β, ``‖J ΔW‖``
      and the probe of :func:`~ebc_optax.advanced.kl_probe`): a float in ``(0, 1]``
      takes every ``round(1/f)``-th row, an int ``n`` every ``R // n``-th row
      (the first ``n``), None every row; only leaves whose leading size is
      the logits' leading size ``R`` are sliced (see :mod:`ebc_optax._rows`).
    probe_batch_fn: ``batch -> probe batch``, replacing that rule for batches
      it does not fit.

  Returns:
    A :class:`SensitivityEstimator`.
  """
  _validation.check_choice("sensitivity", sensitivity, SENSITIVITY_METHODS)
  _validation.check_number("update_every", update_every, lo=1, integer=True)
  _validation.check_number("probe_layers", probe_layers, lo=1, integer=True)
  check_full_sweep_every(full_sweep_every)
  _validation.check_number("beta_ema", beta_ema, lo=0, hi=1, hi_open=True)
  _validation.check_number("huber_ratio", huber_ratio, lo=1)
  _validation.check_number("safety", safety, lo=0, lo_open=True)
  _validation.check_number("fd_step", fd_step, lo=0, lo_open=True)
  _validation.check_choice("kl", kl, formulas.KL_METRICS)
  _validation.check_probe_batch_size(probe_batch_size)
  if not callable(logits_fn):
    raise ValueError(f"logits_fn must be callable (params, batch) -> logits; got {logits_fn!r}.")
  if probe_batch_fn is not None and not callable(probe_batch_fn):
    raise ValueError(
        f"probe_batch_fn must be callable (batch -> probe batch); got {probe_batch_fn!r}.")
  metric = LogitMetric(kl=kl, center_logits=center_logits, axis_name=axis_name,
                       probe_batch_size=probe_batch_size,
                       probe_batch_fn=probe_batch_fn)

  def probe_batch(params: Any, batch: Any) -> Any:
    return _rows.probe_batch(logits_fn, params, batch, probe_batch_size,
                             probe_batch_fn)

  def init(num_layers: int) -> SensitivityState:
    return init_sensitivity_state(num_layers)

  def effective_beta(state: SensitivityState) -> jax.Array:
    return safety * state.layer_beta

  def update(state: SensitivityState, step: jax.Array,
             partition: _layers.LayerPartition, params: Any, updates: Any,
             batch: Any, norms: jax.Array) -> SensitivityState:
    _logits.check_logits(jax.eval_shape(logits_fn, params, batch), batch=batch)
    num_layers = len(partition.labels)
    if num_layers == 0:
      return state
    param_leaves, treedef = _checked_leaves(state, partition, params)
    update_leaves = jax.tree.leaves(updates)
    inv_norms = formulas.unit_scale(norms)
    eps = _fd_steps(param_leaves, partition, sensitivity, fd_step)
    # Plan: which layers this step measures.
    active = norms > 0
    full, n, start = _refresh_plan(state, step, active, full_sweep_every,
                                   update_every, probe_layers)
    layer_ids = jnp.arange(num_layers)

    def refresh(carry):  # per planned layer: measure, the formulas, record
      change = layer_change_fn(logits_fn, param_leaves, treedef, partition,
                               batch, method=sensitivity, fd_step=fd_step)

      def body(j, carry):
        layer = (start + j) % num_layers
        weights = jnp.where(layer_ids == layer, inv_norms[layer], 0.0)
        estimate = _measure_beta(change, update_leaves, partition, weights,
                                 eps[layer], metric)
        return _record_beta(carry, layer, estimate, active[layer], beta_ema,
                            huber_ratio)
      return jax.lax.fori_loop(0, n, body, carry)

    # Under a cond: a while loop with a zero trip count is not free on CPU
    # (~20% of a small model's step); only refresh steps linearise.
    beta, measured = jax.lax.cond(n > 0, refresh, lambda carry: carry,
                                  (state.layer_beta, state.beta_measured))
    cursor = jnp.where(full, state.beta_cursor,
                       (state.beta_cursor + n) % num_layers).astype(jnp.int32)
    return SensitivityState(layer_beta=beta, beta_measured=measured,
                            beta_cursor=cursor,
                            beta_refreshed=jnp.asarray(n, jnp.int32))

  def linear_change(partition: _layers.LayerPartition, params: Any,
                    updates: Any, batch: Any) -> jax.Array:
    _logits.check_logits(jax.eval_shape(logits_fn, params, batch),
                         batch=batch)
    indices = partition.budgeted_leaves
    if not indices:
      return jnp.zeros([], jnp.float32)
    param_leaves, treedef = jax.tree.flatten(params)
    check_float_leaves(param_leaves, partition)
    update_leaves = jax.tree.leaves(updates)
    # Unit direction (an FD step must not depend on the update's size), then
    # rescale: the change is linear in the direction.
    direction = [update_leaves[i].astype(jnp.float32) for i in indices]
    norm = jnp.sqrt(sum(jnp.sum(jnp.square(u)) for u in direction))
    inv = formulas.unit_scale(norm)
    z, dz = directional_logit_change(
        logits_fn, param_leaves, treedef, indices, [u * inv for u in direction],
        batch, method=sensitivity, fd_step=fd_step, with_primal=True)
    return norm * formulas.per_token_change_norm(
        dz, z, kl=kl, center=center_logits, axis_name=axis_name)

  return SensitivityEstimator(init=init, update=update,
                              effective_beta=effective_beta,
                              linear_change=linear_change,
                              probe_batch=probe_batch, logits_fn=logits_fn,
                              metric=metric)
