"""``relative_radius``: δ a multiple of the running median of the unclipped
steps' predicted KL — ordinary steps pass, outliers are cut."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ebc_optax
from ebc_optax import _relative
from conftest import random_like, tiny_logits_fn


def test_median_tracker_converges_to_the_median():
  rng = np.random.default_rng(0)
  xs = rng.lognormal(mean=1.5, sigma=0.7, size=4000)
  log_m, trace = np.log(xs[0]), []
  for x in xs[1:]:
    log_m = float(_relative.median_step(log_m, np.log(x), 0.02))
    trace.append(log_m)
  # It hovers around the median (± about 0.1 in log at this rate).
  assert np.exp(np.mean(trace[1000:])) == pytest.approx(np.median(xs), rel=0.03)
  assert np.std(trace[1000:]) < 0.15


def test_a_burst_moves_the_median_by_at_most_rate_per_step():
  log_m = 0.0
  for _ in range(10):
    log_m = float(_relative.median_step(log_m, 50.0, 0.02))
  assert log_m == pytest.approx(0.2)


def _run(surrogates, multiple=4.0, rate=0.02):
  """Drives the controller with given S values; returns the δ after each."""
  ctrl = ebc_optax.relative_radius(multiple=multiple, rate=rate)
  state, delta = ctrl.init(jnp.float32(0.05))
  deltas = [float(delta)]
  for s in surrogates:
    m = ebc_optax.ProbeMeasurement(
        applied_kl=0.0, applied_change=0.0, clip_scale=1.0, surrogate=s,
        guard_ratio=float("nan"), interval=1)
    state, delta = ctrl.update(state, m, delta, jnp.float32(0.05))
    deltas.append(float(delta))
  return deltas, state


def test_controller_sets_delta_from_the_median_and_skips_zero_steps():
  deltas, state = _run([2.0, 0.0, 2.0])
  assert deltas[0] >= 1e29  # nothing seen yet: no clipping at the first step
  assert deltas[1] == pytest.approx(4.0 * 2.0 ** 2 / 4)  # multiple × S²/4
  assert deltas[2] == deltas[1]  # a zero update does not move the median
  assert int(state.median_steps) == 2


def test_ordinary_steps_pass_and_an_outlier_is_cut(tiny):
  _, params, batch, _ = tiny
  tx = ebc_optax.ellipsotope_budget_clip(
      tiny_logits_fn, controller="relative", aggregate="exact", kl="fisher",
      probe_every=0, probe_batch_size=None)
  state = tx.init(params)
  update = jax.jit(tx.update)
  base = random_like(jax.random.PRNGKey(3), params, 0.01)
  cs = []
  for t in range(30):
    scale = 50.0 if t == 25 else 1.0 + 0.1 * np.sin(t)  # one step 50× larger
    _, state = update(jax.tree.map(lambda u: scale * u, base), state, params,
                      batch=batch)
    stats = ebc_optax.telemetry(state)
    cs.append(float(stats["c"]))
    if t == 25:
      # Cut back to twice the typical size (multiple 4 in KL): c·S = sqrt(4δ).
      np.testing.assert_allclose(float(stats["c"]) * float(stats["S"]),
                                 float(stats["tau"]), rtol=1e-5)
      np.testing.assert_allclose(float(stats["c"]) * 50, 2 * 1.0, rtol=0.15)
  assert all(c == 1.0 for i, c in enumerate(cs) if i != 25)
  assert cs[25] < 0.05


def test_bad_arguments_raise_naming_them():
  with pytest.raises(ValueError, match="multiple"):
    ebc_optax.relative_radius(multiple=1.0)
  with pytest.raises(ValueError, match="rate"):
    ebc_optax.relative_radius(rate=0.0)
