"""The shrink-only guard on the applied logit change."""

import jax
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import ebc_optax
from conftest import next_token_loss, tiny_logits_fn


@settings(max_examples=50, deadline=None)
@given(t=st.floats(0, 1e3), c=st.floats(1e-3, 1), s=st.floats(1e-3, 1e3))
def test_ratio_and_factor_against_reference(t, c, s):
  """ρ = T/(c·S) and g = min(1, 1/ρ); c·S >= 1e-6 here, so ρ is defined."""
  rho = float(ebc_optax.formulas.guard_ratio(t, c, s))
  assert rho == pytest.approx(t / (c * s), rel=1e-5, abs=1e-30)
  g = float(ebc_optax.formulas.guard_factor(rho))
  assert g <= 1.0
  assert g == pytest.approx(1.0 if rho <= 1 else 1.0 / rho, rel=1e-6)


def test_no_ratio_without_a_denominator():
  assert np.isnan(float(ebc_optax.formulas.guard_ratio(1.0, 1.0, 0.0)))
  assert np.isnan(float(ebc_optax.formulas.guard_ratio(1.0, 0.0, 5.0)))
  assert float(ebc_optax.formulas.guard_factor(float("nan"))) == 1.0


def _step(tiny, safety, steps=2):
  _, params, batch, _ = tiny
  tx = optax.chain(optax.sgd(1.0), ebc_optax.ellipsotope_budget_clip(
      tiny_logits_fn, 0.01, controller=None, safety=safety, beta_ema=0.0,
      probe_every=1, include_embed_out=True))
  state = tx.init(params)
  grads = jax.grad(next_token_loss)(params, batch)
  for _ in range(steps):
    _, state = tx.update(grads, state, params, batch=batch)
  return ebc_optax.telemetry(state)


def test_guard_shrinks_tau_when_surrogate_underestimates(tiny):
  # safety 0.2 makes every β five times too small: S under-estimates T.
  stats = _step(tiny, safety=0.2)
  first_rho = float(_step(tiny, 0.2, 1)["rho"])
  assert first_rho > 1 and int(stats["guard_trips"]) == 2
  # Step 2 ran with the factor from step 1's probe, min(1, 1/ρ).
  np.testing.assert_allclose(stats["guard_factor"], 1 / first_rho, rtol=1e-6)
  np.testing.assert_allclose(stats["tau"], np.sqrt(4 * 0.01) / first_rho,
                             rtol=1e-5)


def test_guard_never_grows_tau(tiny):
  # safety 5 over-estimates: ρ < 1 and τ stays exactly sqrt(4δ).
  stats = _step(tiny, safety=5.0, steps=3)
  assert float(stats["rho"]) < 1 and int(stats["guard_trips"]) == 0
  assert float(stats["guard_factor"]) == 1.0
  np.testing.assert_allclose(stats["tau"], np.sqrt(4 * 0.01), rtol=1e-6)


def test_guard_off_leaves_tau_alone(tiny):
  _, params, batch, _ = tiny
  tx = ebc_optax.ellipsotope_budget_clip(tiny_logits_fn, 0.01, controller=None,
                                         safety=0.2, guard=False, probe_every=1)
  state = tx.init(params)
  grads = jax.grad(next_token_loss)(params, batch)
  for _ in range(2):
    _, state = tx.update(grads, state, params, batch=batch)
  stats = ebc_optax.telemetry(state)
  assert float(stats["rho"]) > 1 and "guard_trips" not in stats
  assert float(stats["guard_factor"]) == 1.0
  np.testing.assert_allclose(stats["tau"], np.sqrt(4 * 0.01), rtol=1e-6)
