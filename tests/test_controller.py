"""The PI controller on the applied KL."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ebc_optax
from ebc_optax import formulas
from conftest import next_token_loss, tiny_batch, tiny_logits_fn, tiny_params


def test_pi_step_matches_reference():
  rng = np.random.default_rng(0)
  log_delta, ema = 0.0, 0.0
  ld, e = jnp.float32(log_delta), jnp.float32(ema)
  for _ in range(20):
    err = float(rng.normal())
    ema = 0.8 * ema + 0.2 * err
    log_delta = min(max(log_delta + 0.15 * err + 0.02 * ema, -2.0), 1.0)
    ld, e = formulas.pi_step(ld, jnp.float32(err), e, kp=0.15, ki=0.02,
                                ema_decay=jnp.float32(0.8), log_delta_min=-2.0,
                                log_delta_max=1.0)
    np.testing.assert_allclose([ld, e], [log_delta, ema], rtol=1e-5, atol=1e-6)


def test_log_error_is_clipped_and_safe_at_zero_kl():
  err = formulas.pi_log_error(0.05, 0.0, math.log(10.0))
  np.testing.assert_allclose(err, math.log(10.0), rtol=1e-6)
  np.testing.assert_allclose(formulas.pi_log_error(0.05, 0.1, 5.0),
                             math.log(0.5), rtol=1e-6)


def _measurement(kl, c):
  return ebc_optax.controllers.ProbeMeasurement(
      applied_kl=jnp.float32(kl), applied_change=jnp.float32(1.0),
      clip_scale=jnp.float32(c), surrogate=jnp.float32(1.0),
      guard_ratio=jnp.float32(1.0), interval=20)


def test_pi_controller_direction_clamp_and_antiwindup():
  ctrl = ebc_optax.controllers.pi_controller(delta_min=0.01, delta_max=0.3)
  state, delta = ctrl.init(jnp.float32(0.05))
  assert float(delta) == pytest.approx(0.05)
  _, up = ctrl.update(state, _measurement(0.01, 0.5), delta, jnp.float32(0.05))
  _, down = ctrl.update(state, _measurement(0.2, 0.5), delta, jnp.float32(0.05))
  assert float(up) > 0.05 > float(down)
  # Inactive clip + KL below target: growing δ would do nothing, so it waits.
  st, same = ctrl.update(state, _measurement(0.01, 1.0), delta, jnp.float32(0.05))
  assert float(same) == pytest.approx(0.05) and float(st.kl_error_ema) == 0.0
  # Clamp.
  d = delta
  for _ in range(200):
    state, d = ctrl.update(state, _measurement(1e-6, 0.5), d, jnp.float32(0.05))
  assert float(d) == pytest.approx(0.3)
  # Initial δ is clamped into the range.
  assert float(ctrl.init(jnp.float32(1.0))[1]) == pytest.approx(0.3)


def _tracking(controller, target=1e-3, steps=200):
  params = tiny_params(jax.random.PRNGKey(0))
  tx = optax.chain(optax.adam(0.5), ebc_optax.ellipsotope_budget_clip(
      tiny_logits_fn, target, controller=controller, probe_every=1,
      update_every=1, probe_layers=4, include_embed_out=True))
  state = tx.init(params)

  @jax.jit
  def step(params, state, key):
    batch = tiny_batch(key, batch=16, seq=8)
    grads = jax.grad(next_token_loss)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  kls = []
  for i in range(steps):
    params, state = step(params, state, jax.random.PRNGKey(100 + i))
    kls.append(float(ebc_optax.telemetry(state)["applied_kl"]))
  return np.asarray(kls[steps // 2:]) / target


def test_pi_controller_tracks_applied_kl_within_30_percent():
  ratio = _tracking(ebc_optax.controllers.pi_controller(delta_min=1e-4, delta_max=1.0))
  assert abs(np.median(ratio) - 1) < 0.3
  assert np.mean(np.abs(ratio - 1) < 0.3) > 0.5
  # Without the controller the bound KL ≤ ¼‖dz‖² is loose: far below target.
  fixed = _tracking(None)
  assert np.median(fixed) < 0.5
