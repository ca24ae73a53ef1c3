"""The spike guards large-scale trainers use, as optax transformations.

The peers of EBC in the spike suite (:mod:`~ebc_optax.experiments.spikes`),
each written from its published code with the published defaults:

* :func:`skip_step` — skip the step when the loss or the pre-clip gradient
  norm exceeds mean + 6σ of the last 128 steps (active once 64 are recorded),
  the optimizer state untouched: OLMo-core's ``SkipStepOptimizer`` (OLMo 2,
  OLMo 3), Levanter's ``SkipStepConfig``, MaxText's ``skip_step_on_spikes``.
  Two history policies: the skipped values are recorded like any other
  (``keep_skipped=True``: OLMo-core, Levanter, MaxText), or left out
  (``keep_skipped=False``: axlearn's ``skip_and_clip_by_global_norm``
  keeps no statistics of dropped steps). ``keep_state=False`` lets the
  inner state absorb the skipped step (its update still dropped): the
  detector without the state handling, for the suite's 2 × 2.
* :func:`zclip` — ZClip (Kumar et al., 2025): the gradient norm's z-score
  against an EMA mean and variance (α 0.97) after a 25-step warm-up; above
  z 2.5 the gradient is scaled to ``mean + z_t² σ / z`` (the reciprocal,
  "adaptive scaling" rule), and the EMA is fed the clipped norm.
* :func:`spam` — SPAM (Huang et al., 2025): Adam whose gradient entries with
  ``g² > θ v`` (θ 5000) are cut to ``sign(g) √(θ v)``, whose moments are
  reset every 500 steps and whose step is ramped back from 1% over 150 steps
  (a cosine) after each reset; spike clipping waits 20 steps after a reset.
* :func:`stable_adamw` — StableAdamW's update clipping (Wortsman et al.,
  2023): Adam whose per-tensor step is divided by ``max(1, RMS(g / √v))``.
* :func:`clip_update_by_historical_norm` — Levanter's update-norm clip: the
  update's global norm capped at mean + 3σ of the last 128 (unclipped)
  update norms, active once 64 are recorded.

``optax.adaptive_grad_clip`` and ``optax.clip_by_global_norm`` are used as
optax ships them. Where the originals differ from each other in a detail
(a two-sided z-score in OLMo-core, ``torch.std``'s Bessel correction) the
docstrings say which one is followed.

Each state records what the guard did on the step just taken
(:func:`decision`): 0 passed, 1 scaled or clipped, 2 skipped.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

import ebc_optax
from ebc_optax import advanced

PASSED, CLIPPED, SKIPPED = 0, 1, 2

ScalarOrSchedule = float | Callable[[jax.Array], jax.Array]


def _norm(tree: Any) -> jax.Array:
  """The global L2 norm of ``tree`` (``optax.global_norm``, renamed
  ``optax.tree.norm`` in later optax)."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree.leaves(tree)))


def _any(flags: list[jax.Array]) -> jax.Array:
  """Whether any entry of any array in ``flags`` is true (traceable)."""
  return jnp.any(jnp.stack([jnp.any(f) for f in flags])) if flags else (
      jnp.array(False))


def window_stats(history: jax.Array, filled: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """Mean and (population) standard deviation of the first ``filled``
  entries of ``history`` (a ring buffer fills its slots in order).

  >>> m, s = window_stats(jnp.array([1., 3., 0., 0.]), jnp.int32(2))
  >>> float(m), float(s)
  (2.0, 1.0)
  """
  valid = jnp.arange(history.shape[0]) < filled
  n = jnp.maximum(filled, 1).astype(jnp.float32)
  mean = jnp.sum(jnp.where(valid, history, 0.0)) / n
  var = jnp.sum(jnp.where(valid, jnp.square(history - mean), 0.0)) / n
  return mean, jnp.sqrt(var)


def above_window(value: jax.Array, history: jax.Array, filled: jax.Array, *,
                 sigma: float, min_history: int) -> jax.Array:
  """Whether ``value > mean + sigma·std`` of the recorded history, once at
  least ``min_history`` values are recorded (Levanter's one-sided test, its
  σ floored at 1e-6)."""
  mean, std = window_stats(history, filled)
  return jnp.logical_and(filled >= min_history,
                         value > mean + sigma * jnp.maximum(std, 1e-6))


def _push(history: jax.Array, index: jax.Array, value: jax.Array,
          record: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Writes ``value`` at ``index`` of the ring where ``record``."""
  new = history.at[index].set(value.astype(history.dtype))
  return (jnp.where(record, new, history),
          jnp.where(record, (index + 1) % history.shape[0], index))


class SkipStepState(NamedTuple):
  """:func:`skip_step`'s state: the inner state and the two windows."""
  inner_state: Any
  losses: jax.Array  # f32 [window]
  grad_norms: jax.Array  # f32 [window]
  index: jax.Array  # int32: the next slot of both rings
  filled: jax.Array  # int32: recorded values, ≤ window
  decision: jax.Array  # int32: PASSED or SKIPPED, this step
  total_skipped: jax.Array  # int32


def skip_step(inner: optax.GradientTransformation, *, sigma: float = 6.0,
              window: int = 128, min_history: int = 64,
              keep_skipped: bool = True, keep_state: bool = True
              ) -> optax.GradientTransformationExtraArgs:
  """Skips a step whose loss or gradient norm is a ``sigma``-σ outlier.

  ``update(grads, state, params, *, loss, **extra)``: ``loss`` is the
  batch's training loss. The step is skipped (zero update) when
  ``loss > mean + σ·std`` or ``‖g‖ > mean + σ·std`` over the recorded
  window (Levanter's one-sided test with population σ; OLMo-core tests
  ``|z|`` with Bessel's σ, which also skips a step whose loss *drops* by 6σ),
  or when either is not finite. Integer leaves of the inner state (step
  counts, and the schedules read from them) advance on a skipped step as
  in :func:`ebc_optax.wrap`; the float leaves stay as they were
  (``keep_state``) or take the step (``keep_state=False``; a non-finite
  step never does).

  Args:
    inner: the optimizer whose step is skipped.
    sigma: the outlier threshold in standard deviations.
    window: the number of recent values the statistics are taken over.
    min_history: no step is skipped before this many values are recorded.
    keep_skipped: record the values of skipped steps (OLMo-core, Levanter,
      MaxText) or leave them out (axlearn).
    keep_state: leave the inner state untouched on a skipped step.
  """
  inner = optax.with_extra_args_support(inner)

  def init(params):
    zeros = jnp.zeros([window], jnp.float32)
    return SkipStepState(inner.init(params), zeros, zeros,
                         jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32),
                         jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32))

  def update(grads, state, params=None, *, loss=None, **extra):
    if loss is None:
      raise ValueError("skip_step: update(...) needs loss=<the batch's "
                       "training loss> (an extra argument).")
    loss = jnp.asarray(loss, jnp.float32)
    norm = _norm(grads).astype(jnp.float32)
    finite = jnp.logical_and(jnp.isfinite(loss), jnp.isfinite(norm))
    test = dict(sigma=sigma, min_history=min_history)
    skip = jnp.logical_or(
        ~finite, jnp.logical_or(
            above_window(loss, state.losses, state.filled, **test),
            above_window(norm, state.grad_norms, state.filled, **test)))
    updates, inner_state = inner.update(grads, state.inner_state, params,
                                        **extra)
    keep_old = jnp.logical_and(skip, keep_state) | ~finite
    inner_state = advanced.select_state(keep_old, state.inner_state, inner_state)
    updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u),
                           updates)
    record = jnp.logical_and(finite, keep_skipped | ~skip)
    losses, index = _push(state.losses, state.index, loss, record)
    grad_norms, _ = _push(state.grad_norms, state.index, norm, record)
    filled = jnp.where(record, jnp.minimum(state.filled + 1, window),
                       state.filled)
    return updates, SkipStepState(
        inner_state, losses, grad_norms, index, filled.astype(jnp.int32),
        jnp.where(skip, SKIPPED, PASSED).astype(jnp.int32),
        state.total_skipped + skip.astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init, update)


class ZClipState(NamedTuple):
  """:func:`zclip`'s state."""
  warmup_norms: jax.Array  # f32 [warmup]
  count: jax.Array  # int32: steps seen (the EMA starts at ``warmup``)
  mean: jax.Array  # f32
  var: jax.Array  # f32
  decision: jax.Array  # int32: PASSED or CLIPPED, this step


def zclip_target(norm: jax.Array, mean: jax.Array, var: jax.Array, *,
                 z_thresh: float, eps: float = 1e-6) -> jax.Array:
  """ZClip's norm after clipping: ``norm`` when its z-score is at most
  ``z_thresh``, else ``mean + z_thresh·σ / (z / z_thresh)``.

  >>> float(zclip_target(jnp.float32(10.), jnp.float32(1.), jnp.float32(1.),
  ...                    z_thresh=2.5, eps=0.))  # z = 9: 1 + 2.5²/9
  1.6944444179534912
  """
  std = jnp.sqrt(var)
  z = (norm - mean) / (std + eps)
  clipped = mean + z_thresh * std / (z / z_thresh)
  return jnp.where(z > z_thresh, clipped, norm)


def zclip(alpha: float = 0.97, z_thresh: float = 2.5, warmup: int = 25,
          eps: float = 1e-6) -> optax.GradientTransformation:
  """ZClip's z-score gradient-norm clipping (``mode="zscore"``,
  ``clip_option="adaptive_scaling"``, no ``max_grad_norm``).

  The first ``warmup`` norms are only collected; their mean and population
  variance start the EMA. Then a norm whose z-score exceeds ``z_thresh`` is
  scaled to :func:`zclip_target`, and the EMA is updated with the norm
  after clipping (mean first, then ``var ← α var + (1-α)(g - mean)²`` with
  the new mean, as the reference code). A non-finite norm passes through
  unrecorded.
  """

  def init(params):
    del params
    return ZClipState(jnp.zeros([warmup], jnp.float32), jnp.zeros([], jnp.int32),
                      jnp.zeros([], jnp.float32), jnp.zeros([], jnp.float32),
                      jnp.zeros([], jnp.int32))

  def update(grads, state, params=None):
    del params
    norm = _norm(grads).astype(jnp.float32)
    finite = jnp.isfinite(norm)
    warming = state.count < warmup
    buf = jnp.where(warming & finite,
                    state.warmup_norms.at[jnp.minimum(state.count, warmup - 1)
                                          ].set(norm), state.warmup_norms)
    starts = warming & finite & (state.count + 1 == warmup)
    start_mean = jnp.mean(buf)
    start_var = jnp.mean(jnp.square(buf - start_mean))
    target = zclip_target(norm, state.mean, state.var, z_thresh=z_thresh,
                          eps=eps)
    active = ~warming & finite
    clip = active & (target < norm)
    scale = jnp.where(clip, target / (norm + 1e-6), 1.0)
    mean = alpha * state.mean + (1 - alpha) * target
    var = alpha * state.var + (1 - alpha) * jnp.square(target - mean)
    mean = jnp.where(starts, start_mean, jnp.where(active, mean, state.mean))
    var = jnp.where(starts, start_var, jnp.where(active, var, state.var))
    count = state.count + (finite & warming).astype(jnp.int32)
    updates = jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads)
    return updates, ZClipState(buf, count, mean, var,
                               jnp.where(clip, CLIPPED, PASSED).astype(jnp.int32))

  return optax.GradientTransformation(init, update)


class SpamState(NamedTuple):
  """:func:`spam`'s state."""
  count: jax.Array  # int32: steps taken (bias correction is never reset)
  mu: Any
  nu: Any
  decision: jax.Array  # int32: CLIPPED when an entry was cut this step


def _schedule(learning_rate: ScalarOrSchedule) -> Callable[[jax.Array], jax.Array]:
  return learning_rate if callable(learning_rate) else (lambda _: learning_rate)


def _moments_init(kind: type, params: Any) -> Any:
  """``kind(count=0, mu=0, nu=0, decision=PASSED)``: an Adam-like state."""
  zeros = jax.tree.map(jnp.zeros_like, params)
  return kind(jnp.zeros([], jnp.int32), zeros, zeros, jnp.zeros([], jnp.int32))


def spam_ramp(steps_since_reset: jax.Array, warmup: int) -> jax.Array:
  """SPAM's step multiplier after a reset: ``1 − 0.99·(1 + cos(π (s+1) /
  (warmup+1)))/2`` for ``s < warmup`` (1% at the reset), then 1.

  >>> [round(float(spam_ramp(jnp.int32(s), 150)), 4) for s in (0, 75, 150)]
  [0.0101, 0.5101, 1.0]
  """
  s = steps_since_reset.astype(jnp.float32)
  dr = 0.99 * (1 + jnp.cos(jnp.pi * (s + 1) / (warmup + 1))) / 2
  return jnp.where(steps_since_reset < warmup, 1 - dr, 1.0)


def spam(learning_rate: ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
         eps: float = 1e-6, threshold: float = 5000.0, reset_every: int = 500,
         warmup: int = 150, clip_after: int = 20
         ) -> optax.GradientTransformation:
  """SPAM (``density=1``): Adam with spike-aware clipping and moment resets.

  Step ``t`` (0-based): when ``(t+1) % reset_every == 0`` both moments are
  zeroed first and the step multiplier restarts at :func:`spam_ramp`;
  entries with ``g² > threshold·v`` are cut to ``sign(g)·√(threshold·v)``
  once ``(t+1) % reset_every ≥ clip_after`` (and ``t+1 ≥ clip_after``);
  the step is ``lr·ramp·√(1-b2^{t+1})/(1-b1^{t+1}) · m / (√v + eps)``,
  as in the reference implementation (its bias correction is not reset).
  """
  lr = _schedule(learning_rate)

  def init(params):
    return _moments_init(SpamState, params)

  def update(grads, state, params=None):
    del params
    t = state.count
    reset = (t + 1) % reset_every == 0
    mu = jax.tree.map(lambda m: jnp.where(reset, 0, m), state.mu)
    nu = jax.tree.map(lambda v: jnp.where(reset, 0, v), state.nu)
    phase = (t + 1) % reset_every
    clip_on = jnp.logical_and(t + 1 >= clip_after, phase >= clip_after)

    def cut(g, v):
      spike = jnp.logical_and(clip_on, jnp.square(g) > threshold * v)
      return jnp.where(spike, jnp.sign(g) * jnp.sqrt(threshold * v), g), spike

    pairs = jax.tree.map(cut, grads, nu)
    is_pair = lambda x: isinstance(x, tuple)
    g = jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair)
    spiked = _any([p[1] for p in jax.tree.leaves(pairs, is_leaf=is_pair)])
    mu = jax.tree.map(lambda m, x: b1 * m + (1 - b1) * x, mu, g)
    nu = jax.tree.map(lambda v, x: b2 * v + (1 - b2) * jnp.square(x), nu, g)
    step = (t + 1).astype(jnp.float32)
    since = jnp.where(t + 1 >= reset_every, (t + 1) % reset_every, warmup)
    ramp = spam_ramp(since, warmup)
    size = lr(t) * ramp * jnp.sqrt(1 - b2 ** step) / (1 - b1 ** step)
    updates = jax.tree.map(lambda m, v: -size * m / (jnp.sqrt(v) + eps), mu, nu)
    return updates, SpamState(
        t + 1, mu, nu, jnp.where(spiked, CLIPPED, PASSED).astype(jnp.int32))

  return optax.GradientTransformation(init, update)


class StableAdamState(NamedTuple):
  """:func:`stable_adamw`'s state (Adam's, plus the decision)."""
  count: jax.Array
  mu: Any
  nu: Any
  decision: jax.Array  # int32: CLIPPED when a tensor's step was scaled


def update_rms(g: jax.Array, v_hat: jax.Array, eps: float) -> jax.Array:
  """StableAdamW's per-tensor ``RMS = √mean(g² / max(v̂, eps²))``.

  >>> float(update_rms(jnp.array([2., 0.]), jnp.array([1., 1.]), 1e-8))
  1.4142135381698608
  """
  return jnp.sqrt(jnp.mean(jnp.square(g) / jnp.maximum(v_hat, eps ** 2)))


def stable_adamw(learning_rate: ScalarOrSchedule, b1: float = 0.9,
                 b2: float = 0.999, eps: float = 1e-8
                 ) -> optax.GradientTransformation:
  """Adam with StableAdamW's update clipping (no weight decay: the harness
  adds it after): per tensor, the step ``m̂/(√v̂ + eps)`` is divided by
  ``max(1, RMS)`` (:func:`update_rms`, with this step's ``v̂``)."""
  lr = _schedule(learning_rate)

  def init(params):
    return _moments_init(StableAdamState, params)

  def update(grads, state, params=None):
    del params
    step = (state.count + 1).astype(jnp.float32)
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g),
                      state.nu, grads)
    c1, c2 = 1 - b1 ** step, 1 - b2 ** step
    rms = jax.tree.map(lambda g, v: update_rms(g, v / c2, eps), grads, nu)
    updates = jax.tree.map(
        lambda m, v, r: -lr(state.count) * (m / c1) / (jnp.sqrt(v / c2) + eps)
        / jnp.maximum(1.0, r), mu, nu, rms)
    clipped = _any([r > 1 for r in jax.tree.leaves(rms)])
    return updates, StableAdamState(
        state.count + 1, mu, nu,
        jnp.where(clipped, CLIPPED, PASSED).astype(jnp.int32))

  return optax.GradientTransformation(init, update)


class UpdateClipState(NamedTuple):
  """:func:`clip_update_by_historical_norm`'s state."""
  norms: jax.Array  # f32 [window]
  index: jax.Array  # int32
  filled: jax.Array  # int32
  decision: jax.Array  # int32: CLIPPED when the update was scaled


def clip_update_by_historical_norm(window: int = 128, sigma: float = 3.0
                                   ) -> optax.GradientTransformation:
  """Levanter's update clip: the update's global norm is capped at
  ``mean + sigma·std`` (population σ, floored at 1e-6) of the last
  ``window`` update norms once ``max(2, window // 2)`` are recorded; the
  *unclipped* norm is recorded (so the threshold cannot collapse)."""

  def init(params):
    del params
    return UpdateClipState(jnp.zeros([window], jnp.float32),
                           jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32),
                           jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    del params
    norm = _norm(updates).astype(jnp.float32)
    mean, std = window_stats(state.norms, state.filled)
    limit = jnp.where(state.filled >= max(2, window // 2),
                      mean + sigma * jnp.maximum(std, 1e-6), jnp.inf)
    clip = norm > limit
    scale = jnp.where(clip, limit / jnp.maximum(norm, 1e-6), 1.0)
    norms, index = _push(state.norms, state.index, norm, jnp.isfinite(norm))
    filled = jnp.where(jnp.isfinite(norm), jnp.minimum(state.filled + 1, window),
                       state.filled)
    return (jax.tree.map(lambda u: (u * scale).astype(u.dtype), updates),
            UpdateClipState(norms, index, filled.astype(jnp.int32),
                            jnp.where(clip, CLIPPED, PASSED).astype(jnp.int32)))

  return optax.GradientTransformation(init, update)


class RecordState(NamedTuple):
  """:func:`recording`'s state: the inner state and the decision."""
  inner_state: Any
  decision: jax.Array


def recording(inner: optax.GradientTransformation
              ) -> optax.GradientTransformation:
  """``inner`` (a stateless-in-effect clip, e.g. ``optax.clip_by_global_norm``
  or ``optax.adaptive_grad_clip``) with a decision: CLIPPED when its output
  differs from its input. Exact comparison is sound for these two: where
  they do not clip they select the input (``jnp.where``), they do not
  multiply it by 1."""

  def init(params):
    return RecordState(inner.init(params), jnp.zeros([], jnp.int32))

  def update(updates, state, params=None):
    out, inner_state = inner.update(updates, state.inner_state, params)
    changed = _any([a != b for a, b in
                    zip(jax.tree.leaves(out), jax.tree.leaves(updates))])
    return out, RecordState(inner_state,
                            jnp.where(changed, CLIPPED, PASSED).astype(jnp.int32))

  return optax.GradientTransformation(init, update)


_DECIDING = (SkipStepState, ZClipState, SpamState, StableAdamState,
             UpdateClipState, RecordState)


def decision(opt_state: Any) -> jax.Array:
  """What the spike guards in ``opt_state`` did on the step just taken, the
  strongest of them: 0 passed, 1 scaled or clipped, 2 skipped or refused
  (int32; 0 without a guard). For :func:`ebc_optax.wrap`: 2 on a step EBC
  refused, a gradient-norm outlier or a rejected non-finite gradient, 1
  when ``c < 1``."""
  found = [s.decision for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, _DECIDING))
           if isinstance(s, _DECIDING)]
  if any(isinstance(s, ebc_optax.WrapState) for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, ebc_optax.WrapState))):
    tel = ebc_optax.telemetry(opt_state)
    refused = jnp.logical_or(tel["refused_count"] > 0,
                             tel["notfinite_count"] > 0)
    for key in ("grad_outlier_run", "loss_outlier_run"):
      if key in tel:
        refused = jnp.logical_or(refused, tel[key] > 0)
    found.append(jnp.where(refused, SKIPPED,
                           jnp.where(tel["c"] < 1, CLIPPED, PASSED)))
  if not found:
    return jnp.int32(PASSED)
  return jnp.max(jnp.stack([jnp.asarray(f, jnp.int32) for f in found]))

