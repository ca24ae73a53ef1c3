"""``wrap``: EBC around any base optimizer, with the gradient guarded first."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ebc_optax import _clip
from ebc_optax import _relative
from ebc_optax import _safety
from ebc_optax import _transform
from ebc_optax import _validation
from ebc_optax import formulas


# The gradient-norm check: the relative radius's rule on log ‖g‖², with its
# window; a batch is refused when its squared gradient norm exceeds the trend
# by 2.25× (×1.5 in norm) and by 3.5 robust standard deviations of the run's
# batch-to-batch scatter (estimated on 24 accepted batches: gradient norms
# drift slowly, and a steadier spread lets the margin be tighter than the
# step's). A random-token batch in the zoo raises the norm ×1.6–3 at once,
# while Adam's normalised step grows only gradually (×1.1–1.2 per step) and
# would pass as a trend.
GRAD_NORM_MULTIPLE = 2.25
# The gradient check's level window: 256 batches. A burst of up to 128
# consecutive bad batches is refused whole: with 32, bursts longer than ~16
# steps got through (the spike suite's 50-step bursts); with 128 (the window
# of the field's skip-step rules, OLMo-core, Levanter) a quarter of every
# batch corrupted for 100 steps got through after 63 refusals, and the run
# paid for both the lost progress and the corrupted steps (148% of Adam's
# damage). An outlier enters the level at its own value, so a lasting change
# of the gradient norm, whatever its size, passes once it holds half the
# window: after 129 refusals (at the threshold, as the step test does, a ×10
# gradient would wait ~6 half windows). It judges from the 32nd batch on
# (the level is the median of what the window holds until it is full).
# Trend line over 24 accepted batches, z 3.5.
_GRAD_WINDOW, _GRAD_MIN_FILL, _GRAD_TREND, _GRAD_Z = 256, 32, 24, 3.5
# The loss check (when update gets ``loss=``): the same rule and windows on
# log(loss), refusing a batch whose loss is more than LOSS_MULTIPLE (×1.1)
# times its trend and 6 robust standard deviations of its batch-to-batch
# scatter above it (OLMo-core's 6σ). A quarter of a batch's rows corrupted
# raises the gradient norm by about the gradient check's own margin (×1.5):
# it caught the spike suite's `quarter` burst on one seed of two. The loss
# rises ×1.3 on such a batch — 9–13 σ.
LOSS_MULTIPLE = 1.1
_LOSS_Z = 6.0


class WrapState(NamedTuple):
  """State of :func:`wrap`.

  Attributes:
    base_state: the base optimizer's state (untouched on a skipped step).
    ebc_state: the state of :func:`ellipsotope_budget_clip`.
    after_state: the state of the ``after`` transformation.
    notfinite_count: int32, consecutive steps whose gradient was not finite.
    last_finite: bool, whether the last gradient was finite.
    total_notfinite: int32, steps whose gradient was not finite, in all.
    refused_count: int32, consecutive steps EBC refused (``c = 0`` with a
      non-zero proposal).
    total_refused: int32, steps EBC refused, in all.
    grad_state: the gradient-norm check's
      :class:`~ebc_optax._relative.GradientOutlierState` (None when it is
      off).
    loss_state: the loss check's ``GradientOutlierState`` (over log loss;
      None when it is off).
  """
  base_state: Any
  ebc_state: Any
  after_state: Any
  notfinite_count: jax.Array
  last_finite: jax.Array
  total_notfinite: jax.Array
  refused_count: jax.Array
  total_refused: jax.Array
  grad_state: Any = None
  loss_state: Any = None


def wrap(
    base_optimizer: optax.GradientTransformation,
    logits_fn: Callable[[Any, Any], jax.Array],
    *,
    after: optax.GradientTransformation | None = None,
    max_consecutive_errors: int | None = None,
    skip_refused: bool = True,
    grad_norm_multiple: float | None = GRAD_NORM_MULTIPLE,
    loss_multiple: float | None = LOSS_MULTIPLE,
    **ebc_options: Any,
) -> optax.GradientTransformationExtraArgs:
  """EBC around a base optimizer: ``base -> ellipsotope_budget_clip -> after``.

  The front door (the reference recipe's "a wrapper around any base optimizer"):
  the base proposes the step, EBC scales it by ``c = min(1, τ/S)``, and
  ``after`` — e.g. decoupled weight decay, which should not be clipped — is
  added last.

  The gradient is checked *before* the base optimizer sees it, as
  ``optax.apply_if_finite`` does: a gradient with a NaN/Inf leaf gives a zero
  update and leaves the base, EBC and ``after`` states exactly as they were
  (so one bad batch cannot poison Adam's moments and stall the run), and is
  counted in ``notfinite_count`` (consecutive) and ``total_notfinite``. With
  ``max_consecutive_errors=n`` the step after ``n`` consecutive rejections is
  applied anyway (``apply_if_finite``'s contract: a run that keeps producing
  non-finite gradients then fails visibly instead of skipping for ever);
  ``None`` rejects every one of them — watch ``notfinite_count``.

  A batch whose gradient is an outlier of the run's own gradient norms —
  ``‖g‖²`` more than ``grad_norm_multiple`` (2.25) times its trend, by the
  relative radius's rule (a robust trend line and a window median, see
  :func:`relative_radius`, its level the median of the last 256 batches,
  judging from the 32nd), so a start-up, a warm-up or a decay is followed, a
  burst of up to 128 bad batches is refused whole and no refusal lasts for
  ever (a lasting change passes after ~129) — is refused too: a zero update,
  and the base
  and ``after`` states untouched (counted in ``grad_state.outliers``). EBC
  still measures its step, so its own test and its escalation run alongside.
  It catches what the step's logit-space size cannot: Adam normalises a burst of bad batches, so its
  step only ramps up ×1.1–1.2 per step — the pace of a growth phase — while
  the gradient norm jumps at once.

  Pass the batch's loss too (``update(..., batch=batch, loss=loss)``, the
  mean loss ``jax.value_and_grad`` returns with the gradient) and a batch
  whose loss is an outlier of the run's own losses — more than
  ``loss_multiple`` (1.1) times its trend and 6 robust standard deviations
  of its batch-to-batch scatter above it, by the same rule and windows — is
  refused the same way (counted in ``loss_state.outliers``). A batch with
  some rows corrupted raises the loss far more reliably than the gradient
  norm. Without ``loss=`` this check records nothing.

  A step EBC *refuses* (``c = 0`` with a non-zero proposal: an outlier under
  the default relative radius) is skipped whole as well when
  ``skip_refused`` (the default): the base and ``after`` states stay as they
  were, so a refused batch leaves no trace — Adam's moments do not take the
  burst's gradients in and replay them once the refusals end. Integer leaves
  (step counters) still advance: schedules follow the training step, as a
  PyTorch LR scheduler does when a step is skipped. EBC's own state
  does move (its controller records the refusal: that is how a lasting
  change of the step size is eventually let through, see
  :func:`relative_radius`). Refusals are counted in ``refused_count``
  (consecutive) and ``total_refused``. The old and new base states are both
  live during the step (the selection is elementwise); ``skip_refused=False``
  keeps the base's update of its state, as ``optax.chain(base,
  ellipsotope_budget_clip(...))`` does — a chain cannot do this, since a
  transformation never sees the states of the ones before it.

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
    skip_refused: leave the base and ``after`` states untouched on a step EBC
      refuses (``c = 0``).
    grad_norm_multiple: refuse a batch whose squared gradient norm is more
      than this many times its trend (> 1; the default 2.25 is ×1.5 in
      norm), as a non-finite one is refused; None turns the check off.
    loss_multiple: refuse a batch whose loss (``update``'s ``loss=``, a
      positive mean loss such as cross-entropy) is more than this many
      times its trend and 6 robust standard deviations above it (> 1);
      None turns the check off.
    **ebc_options: keyword arguments of :func:`ellipsotope_budget_clip`
      (``target_kl``, ``stacked``, ``kl``, ...).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with state
    :class:`WrapState`; ``update(grads, state, params, batch=batch)``
    (``loss=loss`` as well, for the loss check).

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
  if not isinstance(skip_refused, bool):
    raise ValueError(f"skip_refused must be True or False; got {skip_refused!r}.")
  for name, tx in (("base_optimizer", base_optimizer), ("after", after)):
    if tx is not None and not (hasattr(tx, "init") and hasattr(tx, "update")):
      raise ValueError(
          f"{name} must be an optax.GradientTransformation (with init and "
          f"update); got {tx!r}.")
  for name, value in (("grad_norm_multiple", grad_norm_multiple),
                      ("loss_multiple", loss_multiple)):
    if value is not None:
      _validation.check_number(name, value, lo=1, lo_open=True)
  axis_name = ebc_options.get("axis_name")
  base = optax.with_extra_args_support(base_optimizer)
  ebc = _transform.ellipsotope_budget_clip(logits_fn, **ebc_options)
  post = optax.with_extra_args_support(after or optax.identity())

  def init(params):
    return WrapState(
        base_state=base.init(params), ebc_state=ebc.init(params),
        after_state=post.init(params),
        notfinite_count=jnp.zeros([], jnp.int32),
        last_finite=jnp.array(True),
        total_notfinite=jnp.zeros([], jnp.int32),
        refused_count=jnp.zeros([], jnp.int32),
        total_refused=jnp.zeros([], jnp.int32),
        grad_state=None if grad_norm_multiple is None else _tracker(),
        loss_state=None if loss_multiple is None else _tracker())

  def update(grads, state, params=None, **extra_args):
    finite = _safety.tree_all_finite(grads)
    apply = finite
    if max_consecutive_errors is not None:
      apply = jnp.logical_or(
          finite, state.notfinite_count >= max_consecutive_errors)
    grad_state, loss_state, grad_outlier = _check_batch(
        state, grads, extra_args.get("loss"), finite, grad_norm_multiple,
        loss_multiple, axis_name)

    def step(_):
      u, base_state = base.update(grads, state.base_state, params, **extra_args)
      u, ebc_state = ebc.update(u, state.ebc_state, params, **extra_args)
      u, after_state = post.update(u, state.after_state, params, **extra_args)
      # A batch outlier never reaches the parameters nor the base's state;
      # EBC still saw its step, so its own outlier test runs alongside (a
      # lasting change is let through by whichever test escalates last, not
      # by one after the other). Selected inside the branch, where XLA fuses
      # the select with the base's own update of its moments.
      keep = jnp.logical_or(grad_outlier, _refused(ebc_state)) if (
          skip_refused) else grad_outlier
      base_state, after_state = select_state(
          keep, (state.base_state, state.after_state), (base_state, after_state))
      u = jax.tree.map(lambda x: jnp.where(grad_outlier, jnp.zeros_like(x), x), u)
      return u, (base_state, ebc_state, after_state)

    def skip(_):
      return (jax.tree.map(jnp.zeros_like, grads),
              (state.base_state, state.ebc_state, state.after_state))

    updates, (base_state, ebc_state, after_state) = jax.lax.cond(
        apply, step, skip, None)
    refused = jnp.logical_and(apply, _refused(ebc_state))
    notfinite_count, total_notfinite = _runs(
        ~finite, state.notfinite_count, state.total_notfinite)
    refused_count, total_refused = _runs(
        refused, state.refused_count, state.total_refused)
    return updates, WrapState(
        base_state=base_state, ebc_state=ebc_state, after_state=after_state,
        notfinite_count=notfinite_count, last_finite=finite,
        total_notfinite=total_notfinite, refused_count=refused_count,
        total_refused=total_refused, grad_state=grad_state,
        loss_state=loss_state)

  return optax.GradientTransformationExtraArgs(init, update)


def _tracker() -> Any:
  """An empty batch check (:class:`~ebc_optax._relative.GradientOutlierState`)."""
  return _relative.init_tracker(
      _relative.GradientOutlierState, _GRAD_WINDOW, _GRAD_TREND,
      log_threshold=jnp.float32(formulas.LOG_UNSET))


def _runs(event: jax.Array, run: jax.Array, total: jax.Array
          ) -> tuple[jax.Array, jax.Array]:
  """``(consecutive, total)`` counts of ``event`` after this step."""
  event = jnp.asarray(event)
  return (jnp.where(event, run + 1, 0).astype(jnp.int32),
          (total + event.astype(jnp.int32)).astype(jnp.int32))


def _check_batch(state: WrapState, grads: Any, loss: Any, finite: jax.Array,
                 grad_multiple: float | None, loss_multiple: float | None,
                 axis_name: Any) -> tuple[Any, Any, jax.Array]:
  """The batch itself, before the base sees it: its gradient's size and, when
  given, its loss, each against its own trend. Returns the two checks' new
  states and whether either refuses the batch."""
  grad_state, grad_outlier = state.grad_state, jnp.array(False)
  if grad_state is not None:
    grad_state, grad_outlier = _check_gradient(
        grad_state, grads, finite, grad_multiple, axis_name)
  loss_state, loss_outlier = state.loss_state, jnp.array(False)
  if loss_state is not None and loss is not None:
    loss_state, loss_outlier = _check_loss(
        loss_state, loss, finite, loss_multiple, axis_name)
  return grad_state, loss_state, jnp.logical_or(grad_outlier, loss_outlier)


def _check_gradient(state: Any, grads: Any, finite: jax.Array,
                    multiple: float, axis_name: Any
                    ) -> tuple[Any, jax.Array]:
  """Judges ``log ‖g‖²`` against its trend (:func:`_judge`)."""
  sq = sum(jnp.sum(jnp.square(g.astype(jnp.float32)))
           for g in jax.tree.leaves(grads)
           if jnp.issubdtype(jnp.asarray(g).dtype, jnp.inexact))
  sq = jnp.asarray(sq, jnp.float32)
  if axis_name is not None:  # every replica decides alike
    sq = jax.lax.pmean(sq, axis_name)
  return _judge(state, sq, finite, multiple, _GRAD_Z)


def _check_loss(state: Any, loss: Any, finite: jax.Array, multiple: float,
                axis_name: Any) -> tuple[Any, jax.Array]:
  """Judges ``log loss`` against its trend (:func:`_judge`)."""
  loss = jnp.asarray(loss, jnp.float32)
  if loss.ndim:
    raise ValueError(f"wrap: loss= must be the batch's scalar mean loss; got "
                     f"shape {loss.shape}.")
  if axis_name is not None:
    loss = jax.lax.pmean(loss, axis_name)
  return _judge(state, loss, jnp.logical_and(finite, jnp.isfinite(loss)),
                multiple, _LOSS_Z)


def _judge(state: Any, positive: jax.Array, finite: jax.Array,
           multiple: float, z: float) -> tuple[Any, jax.Array]:
  """Judges ``log positive`` against its trend (the relative radius's rule,
  see :func:`relative_radius`): returns the new state and whether it is an
  outlier. A non-finite or non-positive value is not recorded."""
  seen = jnp.logical_and(finite, positive > 0)
  value = jnp.log(jnp.where(seen, positive, 1.0))
  outlier = jnp.logical_and(seen, value > state.log_threshold)
  new, log_threshold = _relative.observe(
      state, value, seen, state.log_threshold, window=_GRAD_WINDOW,
      multiple=multiple, z=z, min_fill=_GRAD_MIN_FILL,
      clamp_outliers=False)
  new = new._replace(log_threshold=jnp.where(seen, log_threshold,
                                             state.log_threshold))
  return new, outlier


def _refused(ebc_state: Any) -> jax.Array:
  """Whether the step just taken was refused: ``c = 0`` with ``S > 0``."""
  clip = jax.tree.leaves(ebc_state, is_leaf=lambda x: isinstance(
      x, _clip.BudgetClipState))
  clip = next(x for x in clip if isinstance(x, _clip.BudgetClipState))
  return jnp.logical_and(clip.clip_scale <= 0, clip.surrogate > 0)


def select_state(keep_old: jax.Array, old: Any, new: Any) -> Any:
  """The floating-point leaves of ``old`` where ``keep_old``, else of ``new``;
  integer leaves (step counters) always from ``new``.

  A refused batch leaves no trace in what the base estimates (moments, its
  step-size estimate), but time passes: ``count``, and every schedule read
  from it (warm-up, decay, an injected LR), advances as it would with an
  applied step — as a PyTorch LR scheduler steps when a step is skipped.
  Holding the count instead would replay a schedule's spike once the
  refusals end.
  """
  def pick(a, b):
    b = jnp.asarray(b)
    if not jnp.issubdtype(b.dtype, jnp.inexact):
      return b
    return jnp.where(keep_old, a, b).astype(b.dtype)

  return jax.tree.map(pick, old, new)
