"""δ relative to the base optimizer's own steps: typical steps pass, outliers
are cut.

A fixed δ is a knob: the right one moves with the model, the data, the
learning rate and the phase of training. :func:`relative_radius` needs none.
It keeps the predicted KL *before clipping* of each of the last ``window``
steps, ``K_t = S_t²/4`` (nats/token in the estimator's metric; with
``kl="fisher", aggregate="exact"`` the step's quadratic KL itself), and sets

    δ_{t+1} = multiple · median(K_{t-window+1}, …, K_t)

so a step whose predicted KL is more than ``multiple`` times the recent
typical one — a corrupted batch, a gradient spike, an LR spike — is refused
(``overshoot="skip"``, the default with this controller) or scaled back to
that size (``"scale"``), and every ordinary step passes untouched (``c = 1``).

Why a window median: a burst shorter than half the window cannot move it
(fewer than half its entries are outliers), while a sustained change of the
step size — Prodigy's step growing by orders of magnitude while it estimates
its learning rate, a warm-up, a decay — is followed with a lag of half a
window. With ``window = 32`` and ``multiple = 4`` a step may grow by up to 9%
in KL (4.4% in size) per step for ever without being clipped, and a burst of
up to 15 steps (fewer than half the window) is caught. The first ``window``
steps only fill the window (not clipped).

It is a guard against outliers, not a step-size rule: an LR that is too large
from the start makes every step large, the median with them, and nothing is
clipped. Pair it with a base that sets a good step by itself.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ebc_optax import _controller
from ebc_optax import _validation

# δ while the window fills: no clipping (τ = sqrt(4δ) ≈ 2e15).
UNSET_DELTA = 1e30


class RelativeRadiusState(NamedTuple):
  """State of :func:`relative_radius`.

  Attributes:
    log_step_kl: ``[window]`` float32, ``log K`` of the last ``window``
      steps with a non-zero update, a ring buffer (oldest overwritten).
    median_steps: int32, steps that entered the window.
  """
  log_step_kl: jax.Array
  median_steps: jax.Array


def window_threshold(log_step_kl: jax.Array, filled: jax.Array,
                     multiple: float) -> jax.Array:
  """``multiple · exp(median(log K))`` once the window is ``filled``, else
  :data:`UNSET_DELTA` (float32).

  Example:
    >>> import jax.numpy as jnp
    >>> float(window_threshold(jnp.log(jnp.array([1., 2., 100.])), True, 4.))
    8.0
  """
  median = jnp.exp(jnp.median(jnp.asarray(log_step_kl, jnp.float32)))
  return jnp.where(filled, multiple * median, UNSET_DELTA).astype(jnp.float32)


def relative_radius(*, multiple: float = 4.0,
                    window: int = 32) -> _controller.KLController:
  """Controller slot: ``δ = multiple × median predicted KL of the last steps``.

  Runs on every step (``every_step=True``): it reads the unclipped step's
  surrogate ``S`` from each step's measurement. A step with ``S = 0`` (a zero
  update) does not enter the window. A step the clip refused
  (``overshoot="skip"``: ``c = 0`` with ``S > 0``) enters it at the threshold
  ``δ`` it exceeded, not at its own ``K``: a burst cannot drag the median up
  to itself, and a lasting change of the step size still raises the
  threshold — by up to ``multiple`` per half window — so steps are never
  refused for ever (with the defaults, a step size that jumps ×3 for good
  passes after 17 refused steps, ×10 after 49).

  Args:
    multiple: how many times the typical predicted KL a step may have before
      it is scaled back (> 1; 4 lets steps up to twice the typical logit
      change through: the KL grows with the square of the step).
    window: steps in the median (>= 2, static): bursts shorter than half of
      it are cut, trends are followed with a lag of half of it.

  Returns:
    A :class:`KLController` with ``every_step=True``.
  """
  _validation.check_number("multiple", multiple, lo=1, lo_open=True)
  _validation.check_number("window", window, lo=2, integer=True)

  def init(target_kl):
    del target_kl  # no target: the median sets δ
    state = RelativeRadiusState(log_step_kl=jnp.zeros([window], jnp.float32),
                                median_steps=jnp.zeros([], jnp.int32))
    return state, jnp.asarray(UNSET_DELTA, jnp.float32)

  def update(state, measurement, delta, target_kl):
    del target_kl
    step_kl = 0.25 * jnp.square(jnp.asarray(measurement.surrogate, jnp.float32))
    seen = step_kl > 0
    refused = jnp.logical_and(seen, measurement.clip_scale <= 0)
    step_kl = jnp.where(refused, jnp.minimum(step_kl, delta), step_kl)
    slot = state.median_steps % window
    log_kl = jnp.log(jnp.where(seen, step_kl, 1.0))
    buf = jnp.where(seen, state.log_step_kl.at[slot].set(log_kl),
                    state.log_step_kl)
    steps = state.median_steps + seen.astype(jnp.int32)
    new_delta = window_threshold(buf, steps >= window, multiple)
    return RelativeRadiusState(log_step_kl=buf, median_steps=steps), new_delta

  return _controller.KLController(init=init, update=update, every_step=True)
