"""The applied-change probe: measure the clipped step, feed controller and guard.

:func:`kl_probe` wraps a :func:`budget_clip`. Every ``probe_every`` steps it
shadow-applies the clipped update on the probe batch (``W + cΔW`` is built as
a temporary; the parameters are not mutated), measures the applied per-token
KL and the centered applied logit change ``T``, and runs the guard and the
controller. It owns ``δ`` and the guard's radius factor — kept in its own
:class:`KLProbeState` — and passes them down to the wrapped clip's ``update``
at every step, as ``optax.inject_hyperparams`` passes hyperparameters.
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
from ebc_optax import _sensitivity
from ebc_optax import _validation
from ebc_optax import cadence
from ebc_optax import formulas


class KLProbeState(NamedTuple):
  """State of :func:`kl_probe`.

  Attributes:
    clip_state: the wrapped clip's state (a :class:`BudgetClipState`).
    controller_state: the controller's state (``optax.EmptyState`` if none).
    guard_state: :class:`GuardState`, or None without the guard.
    next_kl_target: float32, the ``δ`` passed down at the next step (the
      controller's latest proposal; ``target_kl`` without a controller).
    next_radius_factor: float32, the guard's factor on ``τ`` passed down at
      the next step (1 without the guard).
    applied_kl: float32, applied per-token KL at the last probe.
    applied_change: float32, ``T`` at the last probe (every leaf's change).
    budgeted_change: float32, ``T_b`` at the last probe: the change made by
      the budgeted leaves alone — what ``S`` bounds, so the guard's ratio is
      ``ρ = T_b / (c·S)`` (equal to ``T`` when every leaf is budgeted).
    predicted_change: float32, ``c·S`` at the last probe: what the surrogate
      promised for the probed step (0 when it promised nothing, ``c·S <=
      eps``; ``ρ`` is then undefined). On a refused step (``c = 0``) the
      probe measures the step at the radius, ``c = min(1, τ/S)``, so ``ρ`` is
      defined there too.
    probe_count: int32, probes run so far.
    probed: bool, whether the last update ran a probe.
  """
  clip_state: Any
  controller_state: Any
  guard_state: _guard.GuardState | None
  next_kl_target: jax.Array
  next_radius_factor: jax.Array
  applied_kl: jax.Array
  applied_change: jax.Array
  budgeted_change: jax.Array
  predicted_change: jax.Array
  probe_count: jax.Array
  probed: jax.Array


def measure_applied_change(
    logits_fn: Callable[[Any, Any], jax.Array],
    params: Any,
    updates: Any,
    batch: Any,
    *,
    center_logits: bool = True,
    kl: str = "bound",
    axis_name: formulas.AxisName = None,
) -> tuple[jax.Array, jax.Array]:
  """``(T, KL)`` of applying ``updates`` to ``params`` on ``batch``.

  ``T`` is the per-token RMS size of the logit change in the ``kl`` metric
  (``"bound"``: centered Euclidean; ``"fisher"``: ``sqrt(2·Var_p)`` at
  ``p(W)``) and ``KL`` the exact mean per-token ``KL(p(W) ‖ p(W + u))``, both
  over all replicas of ``axis_name``.
  The shadow parameters are ``optax.apply_updates(params, updates)``, exactly
  what the training step will apply.
  """
  change, applied_kl, _ = _measure(logits_fn, params, updates, batch, None,
                                   center_logits, kl, axis_name)
  return change, applied_kl


def _measure(logits_fn: Callable[[Any, Any], jax.Array], params: Any,
             updates: Any, batch: Any, budgeted: tuple[bool, ...] | None,
             center_logits: bool, kl: str, axis_name: formulas.AxisName
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(T, KL, T_b)``: ``T_b`` is the change of the step restricted to the
  leaves flagged in ``budgeted`` (``T`` itself when None or all flagged)."""
  _logits.check_logits(jax.eval_shape(logits_fn, params, batch), batch=batch)
  partial = budgeted is not None and not all(budgeted)
  outs = _at_points(logits_fn, params, updates, batch,
                    (None, budgeted) if partial else (None,))
  change, applied_kl = _change_and_kl(outs[0], outs[1], center_logits, kl,
                                      axis_name)
  if not partial:
    return change, applied_kl, change
  budgeted_change, _ = _change_and_kl(outs[0], outs[2], center_logits, kl,
                                      axis_name, with_kl=False)
  return change, applied_kl, budgeted_change


def _at_points(fn: Callable[[Any, Any], Any], params: Any, updates: Any,
               batch: Any, masks: tuple[tuple[bool, ...] | None, ...]
               ) -> list[Any]:
  """``fn`` at ``params`` and at ``params + updates`` restricted to each mask.

  Returns ``[fn(W), fn(W + u|mask_1), fn(W + u|mask_2), ...]`` (a mask is a
  per-leaf tuple of bools, None for every leaf). The evaluations are the
  iterations of one ``lax.map``, so the compiled step holds one copy of
  ``fn`` (not one per point), and one shadow copy of the parameters is built
  per iteration. A moved point is ``params + updates`` cast to each leaf's
  dtype — what ``optax.apply_updates`` and so the training step apply; the
  first point is ``params`` itself (selected, not ``params + 0·u``).
  """
  leaves, treedef = jax.tree.flatten(params)
  deltas = treedef.flatten_up_to(updates)

  def at(i):
    point = []
    for k, (w, u) in enumerate(zip(leaves, deltas)):
      # The points at which this leaf moves, as a constant table: one select.
      moves = jnp.asarray([False] + [m is None or m[k] for m in masks])
      point.append(jnp.where(moves[i], jnp.asarray(w + u).astype(w.dtype), w))
    return fn(jax.tree.unflatten(treedef, point), batch)

  out = jax.lax.map(at, jnp.arange(len(masks) + 1))
  return [jax.tree.map(lambda x, j=j: x[j], out) for j in range(len(masks) + 1)]


def _change_and_kl(z: jax.Array, z_new: jax.Array, center_logits: bool,
                   kl: str, axis_name: formulas.AxisName, with_kl: bool = True
                   ) -> tuple[jax.Array, jax.Array | None]:
  """``(T, KL)`` from the logits before and after the step."""
  z32 = z.astype(jnp.float32)
  change = formulas.per_token_change_norm(
      z_new.astype(jnp.float32) - z32, z32, kl=kl, center=center_logits,
      axis_name=axis_name)
  return change, (formulas.per_token_kl(z, z_new, axis_name) if with_kl
                  else None)


def measure_loss_change(
    logits_fn: Callable[[Any, Any], jax.Array],
    loss_fn: Callable[[jax.Array, Any], jax.Array],
    params: Any,
    updates: Any,
    batch: Any,
    *,
    center_logits: bool = True,
    kl: str = "bound",
    axis_name: formulas.AxisName = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """``(T, KL, actual, predicted)`` of applying ``updates`` on ``batch``.

  ``T`` and ``KL`` as in :func:`measure_applied_change`; ``actual = L(W+u) −
  L(W)`` and ``predicted = ∇_z Lᵀ(J u) + ½ (J u)ᵀ ∇²_z L (J u)`` — the first
  order term plus the Gauss-Newton term of the loss, from one JVP of the
  logits along ``u`` and one Hessian-vector product of ``loss_fn`` in logit
  space. Losses are ``loss_fn(logits, batch)`` (a mean), averaged over the
  replicas of ``axis_name``.
  """
  change, applied_kl, _, actual, predicted = _measure_loss(
      logits_fn, loss_fn, params, updates, batch, None, center_logits, kl,
      axis_name)
  return change, applied_kl, actual, predicted


def _measure_loss(logits_fn: Callable[[Any, Any], jax.Array],
                  loss_fn: Callable[[jax.Array, Any], jax.Array], params: Any,
                  updates: Any, batch: Any, budgeted: tuple[bool, ...] | None,
                  center_logits: bool, kl: str, axis_name: formulas.AxisName
                  ) -> tuple[jax.Array, ...]:
  """``(T, KL, T_b, actual, predicted)``; ``T_b`` as in :func:`_measure`."""
  _logits.check_logits(jax.eval_shape(logits_fn, params, batch), batch=batch)
  update_leaves = jax.tree.leaves(updates)

  def jvp_at(point, rows):
    # J u at ``point`` (only the float leaves move); at the moved points only
    # the primal is used: one JVP program serves every evaluation (the
    # discarded tangents cost one tangent pass each on the probe rows, on
    # probe steps only).
    leaves, treedef = jax.tree.flatten(point)
    idx = [i for i, w in enumerate(leaves) if jnp.issubdtype(w.dtype, jnp.floating)]
    return _sensitivity.directional_logit_change(
        logits_fn, leaves, treedef, idx,
        [update_leaves[i].astype(jnp.float32) for i in idx], rows,
        with_primal=True)

  partial = budgeted is not None and not all(budgeted)
  outs = _at_points(jvp_at, params, updates, batch,
                    (None, budgeted) if partial else (None,))
  (z, dz), (z_new, _) = outs[0], outs[1]
  change, applied_kl = _change_and_kl(z, z_new, center_logits, kl, axis_name)
  budgeted_change = change if not partial else _change_and_kl(
      z, outs[2][0], center_logits, kl, axis_name, with_kl=False)[0]
  z32 = z.astype(jnp.float32)

  check_loss_fn(loss_fn, z, batch)

  def loss_of(logits):
    return jnp.asarray(loss_fn(logits, batch), jnp.float32)

  grad_z, hvp = jax.jvp(jax.grad(loss_of), (z32,), (dz,))
  predicted = formulas.quadratic_loss_change(grad_z, hvp, dz)
  actual = loss_of(z_new.astype(jnp.float32)) - loss_of(z32)
  if axis_name is not None:
    actual, predicted = jax.lax.pmean((actual, predicted), axis_name)
  return change, applied_kl, budgeted_change, actual, predicted


def check_loss_fn(loss_fn: Callable[[jax.Array, Any], jax.Array],
                  logits: jax.Array, batch: Any) -> None:
  """Calls ``loss_fn(logits, batch)`` abstractly; a clear error if it fails.

  The common mistake is passing the training loss ``(params, batch)``.
  """
  shapes = jax.tree.map(lambda x: getattr(x, "shape", type(x).__name__), batch)
  try:
    out = jax.eval_shape(loss_fn, logits, batch)
  except Exception as e:  # re-raised with the contract and what was given
    raise ValueError(
        "loss_fn must be (logits, batch) -> scalar mean loss, evaluated on the "
        "probe rows; calling it with logits of shape "
        f"{tuple(logits.shape)} and a batch of shapes {shapes} failed with "
        f"{type(e).__name__}: {e}. A training loss (params, batch) -> loss does "
        "not fit: wrap it, e.g. loss_fn=lambda logits, batch: "
        "cross_entropy(logits, batch['targets']).") from e
  if getattr(out, "shape", None) != ():
    raise ValueError(
        "loss_fn(logits, batch) must return a scalar mean loss; got "
        f"{getattr(out, 'shape', out)!r}.")


def _measure_probe(logits_fn: Callable[[Any, Any], jax.Array],
                   loss_fn: Callable[[jax.Array, Any], jax.Array] | None,
                   params: Any, applied: Any, rows: Any,
                   budgeted: tuple[bool, ...] | None, measure: dict[str, Any]
                   ) -> tuple[jax.Array, ...]:
  """``(T, KL, T_b, actual, predicted)`` of the shadow-applied step
  ``applied`` on the probe rows; the loss changes are 0 without ``loss_fn``."""
  if loss_fn is not None:
    return _measure_loss(logits_fn, loss_fn, params, applied, rows, budgeted,
                         **measure)
  change, applied_kl, budgeted_change = _measure(
      logits_fn, params, applied, rows, budgeted, **measure)
  loss_change = predicted = jnp.zeros([], jnp.float32)
  return change, applied_kl, budgeted_change, loss_change, predicted


def kl_probe(
    inner: optax.GradientTransformationExtraArgs,
    estimator: _sensitivity.SensitivityEstimator,
    *,
    target_kl: float,
    controller: _controller.KLController | None = None,
    guard: bool,
    probe_every: int,
    loss_fn: Callable[[jax.Array, Any], jax.Array] | None = None,
    budgeted_leaves: Callable[[Any], tuple[bool, ...]] | None = None,
    eps: float,
) -> optax.GradientTransformationExtraArgs:
  """Wraps a :func:`budget_clip` with the applied-KL probe, controller and guard.

  This wrapper owns ``δ`` and the guard's radius factor ``g`` and passes
  them *down* at every step — ``inner.update(..., kl_target=δ,
  radius_factor=g)``, as ``optax.inject_hyperparams`` passes
  hyperparameters — so a value takes effect on the step it is given: without
  a controller ``δ = target_kl`` of this very step (a ``target_kl`` scheduled
  with ``inject_hyperparams`` gives ``τ_t = sqrt(4·δ_t)``); with one, ``δ`` is
  its latest proposal. On probe steps (``step % probe_every == 0``, under
  ``lax.cond``) it measures ``KL`` and ``T`` of the clipped update and
  ``T_b``, the change made by the budgeted leaves alone; computes ``ρ = T_b /
  (c·S)`` — like with like: ``S`` bounds the budgeted leaves' change only —
  (undefined, NaN, when ``c·S <= eps``: the surrogate promised no change),
  sets the next ``g = min(1, 1/ρ)`` when ``guard`` (kept as it was when ``ρ``
  is undefined) and lets ``controller`` propose the next ``δ``.

  A refused step (``c = 0`` with ``S > 0``: ``overshoot="skip"``) is probed at
  the radius, ``c_probe = min(1, τ/S)`` — what ``"scale"`` would have
  applied — so ``ρ`` stays defined and the guard's factor is renewed from a
  fresh measurement at every probe: a factor set once can never hold every
  later step below the radius. (Its ``KL`` and ``T`` are then those of that
  probed step, not of the zero step applied.)

  Args:
    inner: a :func:`budget_clip` transformation built on ``estimator``.
    estimator: the :func:`sensitivity_estimator` of ``inner``; it owns the
      logits function, the metric (``kl``, ``center_logits``,
      ``axis_name``) and the probe rows, so the probe measures exactly as the
      clip does.
    target_kl: ``δ*`` (nats/token, > 0): the controller's target, or the
      ``δ`` passed down without a controller.
    controller: a :class:`KLController` (e.g. :func:`pi_controller`) or None.
    guard: enable the shrink-only guard.
    probe_every: steps between probes (>= 0; 0 disables probing).
    loss_fn: ``(logits, batch) -> scalar mean loss``; required by controllers
      with ``needs_loss`` (:func:`trust_region_radius`), which then also get
      the actual and predicted loss change of the probed step.
    budgeted_leaves: ``params -> tuple of bool``, per leaf of
      ``jax.tree.leaves(params)`` whether ``S`` budgets it (``inner``'s
      layer partition; :func:`ellipsotope_budget_clip` passes it). None:
      ``T_b = T``, every leaf counts.
    eps: ``ρ`` is undefined when ``c·S <= eps``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state :class:`KLProbeState`.
  """
  _validation.check_number("target_kl", target_kl, lo=0, lo_open=True)
  _validation.check_number("probe_every", probe_every, lo=0, integer=True)
  if not isinstance(estimator, _sensitivity.SensitivityEstimator):
    raise ValueError(
        "kl_probe needs the SensitivityEstimator its inner clip was built on "
        f"(it owns the logits function and the metric); got {estimator!r}.")
  needs_loss = controller is not None and controller.needs_loss
  if needs_loss and not callable(loss_fn):
    raise ValueError(
        "This controller (e.g. trust_region_radius) compares the actual and "
        "predicted loss change, so it needs loss_fn=(logits, batch) -> scalar "
        f"mean loss; got loss_fn={loss_fn!r}.")
  logits_fn, metric = estimator.logits_fn, estimator.metric
  measure = dict(center_logits=metric.center_logits, kl=metric.kl,
                 axis_name=metric.axis_name)

  def init(params):
    target = jnp.asarray(target_kl, jnp.float32)
    if controller is None:
      ctrl_state, delta0 = optax.EmptyState(), target
    else:
      ctrl_state, delta0 = controller.init(target)
    zero = jnp.zeros([], jnp.float32)
    return KLProbeState(
        clip_state=inner.init(params), controller_state=ctrl_state,
        guard_state=_guard.init_guard_state() if guard else None,
        next_kl_target=jnp.asarray(delta0, jnp.float32),
        next_radius_factor=jnp.ones([], jnp.float32),
        applied_kl=zero, applied_change=zero, budgeted_change=zero,
        predicted_change=zero, probe_count=jnp.zeros([], jnp.int32),
        probed=jnp.array(False))

  def probe(operand, clip_state, updates, params, batch, budgeted, delta,
            target):
    """One probe (the cond's true branch): measure the step at its probe
    scale, then the guard and a probe-step controller; returns the operand
    ``(controller state, guard state, g)`` and what the probe recorded."""
    ctrl_state, guard_state, factor = operand
    scale, surrogate = clip_state.clip_scale, clip_state.surrogate
    probe_scale = formulas.probe_clip_scale(scale, surrogate,
                                            clip_state.trust_radius, eps)
    # Rebuild c·ΔW from the incoming updates rather than closing over the
    # outgoing ones: the outgoing update then stays fusible into the caller's
    # apply_updates instead of being materialised as a cond operand.
    applied = _clip.scale_updates(updates, probe_scale)
    rows = estimator.probe_batch(params, batch)
    change, applied_kl, budgeted_change, loss_change, predicted = (
        _measure_probe(logits_fn, loss_fn if needs_loss else None, params,
                       applied, rows, budgeted, measure))
    ratio = formulas.guard_ratio(budgeted_change, probe_scale, surrogate, eps)
    if guard:  # an undefined ρ (NaN: nothing promised) leaves g as it is
      guard_state, factor = _guard.guard_update(guard_state, ratio, factor)
    new_delta = delta
    if controller is not None and not controller.every_step:
      ctrl_state, new_delta = controller.update(
          ctrl_state, _controller.ProbeMeasurement(
              applied_kl=applied_kl, applied_change=change, clip_scale=scale,
              surrogate=surrogate, guard_ratio=ratio, interval=probe_every,
              loss_change=loss_change, predicted_loss_change=predicted),
          delta, target)
    promised = formulas.promised_change(probe_scale, surrogate, eps)
    return ((ctrl_state, guard_state, factor),
            (jnp.asarray(new_delta, jnp.float32), applied_kl, change,
             budgeted_change, promised, jnp.int32(1)))

  def update(updates, state, params=None, *, batch=None, **extra_args):
    _clip.require_extra(params, batch, "ellipsotope_budget_clip")
    # Plan: δ and g of this step, passed down; a probe every probe_every.
    step = state.clip_state.ebc_step
    target = jnp.asarray(target_kl, jnp.float32)
    delta = target if controller is None else state.next_kl_target
    new_updates, clip_state = inner.update(
        updates, state.clip_state, params, batch=batch, kl_target=delta,
        radius_factor=state.next_radius_factor, **extra_args)
    budgeted = None if budgeted_leaves is None else tuple(budgeted_leaves(params))
    # Measure and the formulas: the probe, or what the last one recorded.
    (ctrl_state, guard_state, factor), (
        new_delta, applied_kl, change, budgeted_change, promised,
        ran) = jax.lax.cond(
            cadence.is_probe(step, probe_every),
            lambda op: probe(op, clip_state, updates, params, batch, budgeted,
                             delta, target),
            lambda op: (op, (delta, state.applied_kl, state.applied_change,
                             state.budgeted_change, state.predicted_change,
                             jnp.int32(0))),
            (state.controller_state, state.guard_state,
             state.next_radius_factor))
    if controller is not None and controller.every_step:
      # This step's c and S; the latest probe's KL, T and ρ (c·S: promised).
      ctrl_state, new_delta = controller.update(
          ctrl_state, _controller.ProbeMeasurement(
              applied_kl=applied_kl, applied_change=change,
              clip_scale=clip_state.clip_scale, surrogate=clip_state.surrogate,
              guard_ratio=formulas.guard_ratio(budgeted_change, 1.0, promised,
                                               eps),
              interval=1), delta, target)
    return new_updates, KLProbeState(  # record
        clip_state=clip_state, controller_state=ctrl_state,
        guard_state=guard_state,
        next_kl_target=(jnp.asarray(new_delta, jnp.float32)
                        if controller is not None else target),
        next_radius_factor=factor, applied_kl=applied_kl,
        applied_change=change, budgeted_change=budgeted_change,
        predicted_change=promised, probe_count=state.probe_count + ran,
        probed=ran > 0)

  return optax.GradientTransformationExtraArgs(init, update)
