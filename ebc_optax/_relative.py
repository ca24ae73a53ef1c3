"""δ relative to the base optimizer's own steps: typical steps pass, outliers
are cut.

A fixed δ is a knob: the right one moves with the model, the data, the
learning rate and the phase of training. :func:`relative_radius` needs none.
It tracks the running median of the *unclipped* step's predicted KL,
``K_t = S_t²/4`` (nats/token in the estimator's metric; with
``kl="fisher", aggregate="exact"`` the step's quadratic KL itself), and sets

    δ_{t+1} = multiple · median_{s ≤ t} K_s

so a step whose predicted KL is more than ``multiple`` times the typical one
— a corrupted batch, a gradient spike, an LR spike — is scaled back to that
size, and every ordinary step passes untouched (``c = 1``). The median is
tracked in log space by a sign step, ``log m ← log m + rate·sign(log K − log
m)``, which converges to the median and which one outlier moves by at most
``rate``: a burst of ``n`` bad steps raises the threshold by at most
``exp(n·rate)``.

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

# δ before the first step has been seen: no clipping (τ = sqrt(4δ) ≈ 2e15).
UNSET_DELTA = 1e30


class RelativeRadiusState(NamedTuple):
  """State of :func:`relative_radius`.

  Attributes:
    log_step_kl_median: float32, running median of ``log K_t``, the unclipped
      steps' predicted KL (0 until ``median_steps > 0``).
    median_steps: int32, steps that entered the median.
  """
  log_step_kl_median: jax.Array
  median_steps: jax.Array


def median_step(log_median: jax.Array, log_value: jax.Array,
                rate: float) -> jax.Array:
  """One step of the log-space median tracker:
  ``log m + rate · sign(log K − log m)``.

  Example:
    >>> float(median_step(0.0, 5.0, 0.1)), float(median_step(0.0, -5.0, 0.1))
    (0.1, -0.1)
  """
  log_median = jnp.asarray(log_median, jnp.float32)
  return log_median + rate * jnp.sign(jnp.asarray(log_value, jnp.float32)
                                      - log_median)


def relative_radius(*, multiple: float = 4.0,
                    rate: float = 0.02) -> _controller.KLController:
  """Controller slot: ``δ = multiple × running median of the step's predicted KL``.

  Runs on every step (``every_step=True``): it reads the unclipped step's
  surrogate ``S`` from each step's measurement. The first step only sets the
  median (it is not clipped); a step with ``S = 0`` leaves it alone.

  Args:
    multiple: how many times the typical predicted KL a step may have before
      it is scaled back (> 1; 4 lets steps up to twice the typical logit
      change through, and the KL grows with the square of the step).
    rate: log-space step of the median tracker, in ``(0, 1)``.

  Returns:
    A :class:`KLController` with ``every_step=True``.
  """
  _validation.check_number("multiple", multiple, lo=1, lo_open=True)
  _validation.check_number("rate", rate, lo=0, hi=1, lo_open=True, hi_open=True)

  def init(target_kl):
    del target_kl  # no target: the median sets δ
    state = RelativeRadiusState(log_step_kl_median=jnp.zeros([], jnp.float32),
                                median_steps=jnp.zeros([], jnp.int32))
    return state, jnp.asarray(UNSET_DELTA, jnp.float32)

  def update(state, measurement, delta, target_kl):
    del delta, target_kl
    step_kl = 0.25 * jnp.square(jnp.asarray(measurement.surrogate, jnp.float32))
    seen = step_kl > 0
    log_kl = jnp.log(jnp.where(seen, step_kl, 1.0))
    first = state.median_steps == 0
    log_median = jnp.where(
        seen, jnp.where(first, log_kl,
                        median_step(state.log_step_kl_median, log_kl, rate)),
        state.log_step_kl_median)
    steps = state.median_steps + seen.astype(jnp.int32)
    new_delta = jnp.where(steps > 0, multiple * jnp.exp(log_median),
                          UNSET_DELTA).astype(jnp.float32)
    return RelativeRadiusState(log_step_kl_median=log_median.astype(jnp.float32),
                               median_steps=steps), new_delta

  return _controller.KLController(init=init, update=update, every_step=True)
