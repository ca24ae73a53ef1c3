"""δ relative to the base optimizer's own steps: the trend passes, outliers
are refused, and no refusal lasts for ever.

A fixed δ is a knob: the right one moves with the model, the data, the
learning rate and the phase of training. :func:`relative_radius` needs none.
Each step's predicted KL *before clipping*, ``K_t = S_t²/4`` (nats/token in
the estimator's metric), is judged against two references built from the
steps before it, in log space (``k = log K``):

* the **trend**: a robust straight line through the last ``trend`` *accepted*
  steps, ``k ≈ a + b·t`` (Theil–Sen: ``b`` the median of the pairwise slopes,
  clamped to ``[0, MAX_LOG_GROWTH]``; ``a`` the median intercept), read at the
  step to come. A start-up that grows the step ×1.2 per step (Prodigy,
  D-Adaptation) or a warm-up is a line, so it is followed with no lag;
  decays are not extrapolated (``b >= 0``), so the reference only lags above
  them, where it is looser;
* the **level**: the median of ``k`` over the last ``window`` steps, where a
  refused step enters at the threshold it exceeded (``min(k, log δ)``).

With ``σ`` the robust spread of the accepted steps around their line
(1.4826 × their median absolute residual from the unclamped Theil–Sen line),

    log δ_{t+1} = max(trend_{t+1}, level_t) + max(log multiple, z·σ)

so a step is an outlier when its predicted KL is more than ``multiple`` times
the reference — and more than ``z`` robust standard deviations of the run's
own step-to-step noise above it. An outlier is refused (``overshoot="skip"``,
the default with this controller) or scaled back to the radius (``"scale"``);
every other step passes untouched (``c = 1``). The first ``window`` steps only
fill the buffers (``δ`` = :data:`~ebc_optax.formulas.UNSET_DELTA`, nothing
clipped).

**Liveness** — why no sequence of steps is refused for ever, whatever the
guard, the overshoot and the base:

1. Outliers never enter the trend, so a burst cannot teach the trend its own
   size; it is judged against the line the accepted steps drew.
2. Each refused step enters the level's window at the threshold it exceeded,
   ``log δ_t >= level_t + log multiple`` (the trend is a second lower bound of
   the threshold, never a lower one). So after ``window/2 + 1`` consecutive
   outliers more than half the window holds such entries and the level — and
   with it the threshold — has risen by at least ``log multiple``. A
   run of outliers therefore meets a threshold that grows by ×``multiple``
   per half window, without bound, and any lasting step size passes after a
   number of refusals logarithmic in its size (×3 for good: ~17 steps; ×10:
   ~50; ×1000: ~150, with the defaults).
3. Whether a step is an outlier is this controller's own test ``K > δ``; the
   guard's factor on ``τ`` (which may refuse a step below ``δ``) does not make
   a step an outlier, so the guard cannot hold the references down, and the
   probe always measures a defined ``ρ`` (a refused step is probed at the
   radius), so the guard's factor is renewed from fresh evidence at every
   probe.

A burst of up to ``window/2`` steps (15 with the defaults) that is ≥ 10× the
trend in step size (100× in KL) cannot lift the level and never reaches the
trend, so it is refused whole. Two limits of "the trend": steps that ramp up
by a factor below ``multiple`` each time are a trend by this definition, and
are followed; and since decays are not extrapolated, in the last steps of a
decay to zero a burst is judged against the recent, larger steps (it must be
10× those to be refused).

It is a guard against outliers, not a step-size rule: an LR that is too large
from the start makes every step large, the trend with them, and nothing is
refused. Pair it with a base that sets a good step by itself.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ebc_optax import _controller
from ebc_optax import _validation
from ebc_optax import formulas



class RelativeRadiusState(NamedTuple):
  """State of :func:`relative_radius`.

  Attributes:
    log_step_kl: ``[window]`` float32, the level's ring buffer: ``log K`` of
      the last ``window`` steps with a non-zero update (an outlier's entry is
      the ``log δ`` it exceeded), oldest overwritten.
    median_steps: int32, steps that entered the level's window (the step
      clock of the trend).
    trend_log_kl: ``[trend]`` float32, ``log K`` of the last accepted steps.
    trend_step: ``[trend]`` int32, their ``median_steps`` clock.
    trend_count: int32, accepted steps seen (the trend ring's write count).
    outliers: int32, steps judged outliers (``K > δ``) in all.
    outlier_run: int32, consecutive outliers up to the last step.
  """
  log_step_kl: jax.Array
  median_steps: jax.Array
  trend_log_kl: jax.Array
  trend_step: jax.Array
  trend_count: jax.Array
  outliers: jax.Array
  outlier_run: jax.Array


def relative_radius(*, multiple: float = 4.0, window: int = 32,
                    trend: int = 12, z: float = 4.0
                    ) -> _controller.KLController:
  """Controller slot: ``δ`` = ``multiple`` × the trend of the recent
  predicted KL, widened to ``z`` robust standard deviations of its noise.

  Runs on every step (``every_step=True``): it reads the unclipped step's
  surrogate ``S`` from each step's measurement. A step with ``S = 0`` (a zero
  update) enters nothing. A step with ``K = S²/4 > δ`` is an outlier: it
  enters the level's window at ``δ`` and not the trend. See the module
  docstring for the rule and why no refusal lasts for ever.

  Args:
    multiple: how many times the reference KL a step may have before it is
      an outlier (> 1; 4 lets steps up to twice the typical logit change
      through: the KL grows with the square of the step).
    window: steps in the level's median and steps before the first decision
      (>= 4, static): bursts shorter than half of it are refused whole, and a
      lasting change of the step size passes after at most
      ``(window/2 + 1)·log_multiple(change in KL)`` refused steps.
    trend: accepted steps in the trend line (>= 3, static; at most
      ``window`` are used): fewer follow a change of growth rate sooner, more
      average more noise.
    z: the threshold is at least ``z`` robust standard deviations of the
      accepted steps' scatter around the trend above it (>= 0): a run whose
      step size is noisy is not refused for its noise.

  Returns:
    A :class:`KLController` with ``every_step=True``.
  """
  _validation.check_number("multiple", multiple, lo=1, lo_open=True)
  _validation.check_number("window", window, lo=4, integer=True)
  _validation.check_number("trend", trend, lo=3, integer=True)
  _validation.check_number("z", z, lo=0)
  trend = min(trend, window)

  def init(target_kl):
    del target_kl  # no target: the recent steps set δ
    return init_tracker(RelativeRadiusState, window, trend), jnp.asarray(
        formulas.UNSET_DELTA, jnp.float32)

  def update(state, measurement, delta, target_kl):
    del target_kl
    step_kl = formulas.surrogate_kl(measurement.surrogate)
    seen = step_kl > 0
    state, log_new = observe(state, jnp.log(jnp.where(seen, step_kl, 1.0)),
                             seen, jnp.log(jnp.asarray(delta, jnp.float32)),
                             window=window, multiple=multiple, z=z)
    new_delta = formulas.threshold_delta(log_new)
    return state, jnp.where(seen, new_delta, delta).astype(jnp.float32)

  return _controller.KLController(init=init, update=update, every_step=True)


# --- the tracker, shared with wrap's gradient-norm check ---------------------


def init_tracker(kind: type, window: int, trend: int, **extra: Any) -> Any:
  """An empty tracker state of type ``kind`` (:class:`RelativeRadiusState` or
  :class:`GradientOutlierState`, which share their fields; ``extra`` fills
  the fields of its own)."""
  return kind(**extra,
      log_step_kl=jnp.zeros([window], jnp.float32),
      median_steps=jnp.zeros([], jnp.int32),
      trend_log_kl=jnp.zeros([trend], jnp.float32),
      trend_step=-jnp.arange(trend, 0, -1, dtype=jnp.int32),
      trend_count=jnp.zeros([], jnp.int32),
      outliers=jnp.zeros([], jnp.int32),
      outlier_run=jnp.zeros([], jnp.int32))


def observe(state: Any, value: jax.Array, seen: jax.Array,
            log_threshold: jax.Array, *, window: int, multiple: float,
            z: float, min_fill: int | None = None,
            clamp_outliers: bool = True) -> tuple[Any, jax.Array]:
  """Records one observation ``value`` (a log) judged against
  ``log_threshold``; returns the new state and the next log threshold
  (:data:`LOG_UNSET` until ``min_fill`` observations, default ``window``,
  are recorded; before the window is full the level is the median of the
  recorded ones).

  An observation above the threshold is an outlier: it enters the level's
  window at the threshold (at its own value with ``clamp_outliers=False``)
  and not the trend. ``seen=False`` records nothing.
  """
  trend = state.trend_log_kl.shape[0]
  outlier = jnp.logical_and(seen, value > log_threshold)
  accepted = jnp.logical_and(seen, ~outlier)
  now = state.median_steps
  entry = formulas.level_entry(value, log_threshold, clamp_outliers)
  level_buf = jnp.where(
      seen, state.log_step_kl.at[now % window].set(entry), state.log_step_kl)
  slot = state.trend_count % trend
  trend_y = jnp.where(accepted, state.trend_log_kl.at[slot].set(value),
                      state.trend_log_kl)
  trend_t = jnp.where(accepted, state.trend_step.at[slot].set(now),
                      state.trend_step)
  steps = now + seen.astype(jnp.int32)
  fitted, spread = formulas.robust_trend(trend_t, trend_y, steps)
  level = formulas.window_level(level_buf, steps)
  log_new = formulas.relative_threshold(fitted, spread, level, multiple, z)
  ready = window if min_fill is None else min(min_fill, window)
  log_new = jnp.where(steps >= ready, log_new, formulas.LOG_UNSET)
  return state._replace(
      log_step_kl=level_buf, median_steps=steps, trend_log_kl=trend_y,
      trend_step=trend_t,
      trend_count=state.trend_count + accepted.astype(jnp.int32),
      outliers=state.outliers + outlier.astype(jnp.int32),
      outlier_run=jnp.where(outlier, state.outlier_run + 1, 0
                            ).astype(jnp.int32)), log_new.astype(jnp.float32)


class GradientOutlierState(NamedTuple):
  """State of :func:`wrap`'s gradient-norm check: the fields of
  :class:`RelativeRadiusState`, over ``log ‖g‖²`` instead of ``log K``, and
  the log threshold the next gradient is judged against (:data:`LOG_UNSET`
  while the window fills)."""
  log_step_kl: jax.Array
  median_steps: jax.Array
  trend_log_kl: jax.Array
  trend_step: jax.Array
  trend_count: jax.Array
  outliers: jax.Array
  outlier_run: jax.Array
  log_threshold: jax.Array
