"""``kl_probe``: it owns δ and the guard factor and passes them down; the
clip never knows it is wrapped; one metric spec, the estimator's."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ebc_optax
from conftest import (next_token_loss, random_like, telemetry_per_step,
                      tiny_logits_fn)


def test_scheduled_target_kl_sets_tau_on_its_own_step(tiny):
  """With inject_hyperparams, τ_t = sqrt(4·δ_t) on every step t (it lagged a
  step when the probe wrote δ into the clip's state)."""
  _, params, batch, _ = tiny
  schedule = optax.exponential_decay(0.05, transition_steps=1, decay_rate=0.5)
  tx = optax.chain(optax.sgd(0.5), optax.inject_hyperparams(
      ebc_optax.ellipsotope_budget_clip,
      static_args=("logits_fn", "probe_batch_size"))(
          logits_fn=tiny_logits_fn, target_kl=schedule, controller=None,
          guard=False, probe_batch_size=None))
  for t, stats in enumerate(telemetry_per_step(tx, params, batch, 5)[0]):
    delta_t = 0.05 * 0.5 ** t
    np.testing.assert_allclose(stats["delta"], delta_t, rtol=1e-6)
    np.testing.assert_allclose(stats["tau"], np.sqrt(4 * delta_t), rtol=1e-6)
    np.testing.assert_allclose(stats["c"], min(1.0, stats["tau"] / stats["S"]),
                               rtol=1e-6)
  assert stats["c"] < 1  # the schedule reached the clip: it binds


def test_controller_proposal_is_used_on_the_next_step(tiny):
  """δ used at step t+1 is what the controller proposed at probe step t."""
  _, params, batch, _ = tiny
  tx = optax.chain(optax.sgd(0.5), ebc_optax.ellipsotope_budget_clip(
      tiny_logits_fn, 0.05, probe_every=1, probe_batch_size=None,
      controller=ebc_optax.controllers.pi_controller(delta_min=1e-4, delta_max=1.0)))
  state = tx.init(params)
  grads = jax.grad(next_token_loss)(params, batch)
  for _ in range(4):
    proposed = float(optax.tree.get(state, "next_kl_target"))
    factor = float(optax.tree.get(state, "next_radius_factor"))
    _, state = tx.update(grads, state, params, batch=batch)
    stats = ebc_optax.telemetry(state)
    assert float(stats["delta"]) == pytest.approx(proposed, rel=1e-6)
    assert float(stats["guard_factor"]) == pytest.approx(factor, rel=1e-6)
    np.testing.assert_allclose(
        stats["tau"], np.sqrt(4 * proposed) * factor, rtol=1e-6)
  assert float(optax.tree.get(state, "next_kl_target")) != pytest.approx(0.05)


def test_budget_clip_uses_what_it_is_given(tiny):
  """The clip alone: kl_target and radius_factor arrive as update arguments."""
  _, params, batch, _ = tiny
  est = ebc_optax.advanced.sensitivity_estimator(
      tiny_logits_fn, **ebc_optax.EBCConfig(
          beta_ema=0.0, safety=1.0, probe_batch_size=None).estimator_kwargs())
  clip = ebc_optax.advanced.budget_clip(est, **ebc_optax.EBCConfig(
      controller="none", target_kl=0.5).clip_kwargs())
  updates = random_like(jax.random.PRNGKey(3), params, 0.2)
  state = clip.init(params)
  _, own = clip.update(updates, state, params, batch=batch)
  _, given = clip.update(updates, state, params, batch=batch,
                         kl_target=jnp.float32(0.002), radius_factor=0.5)
  assert float(own.kl_target) == pytest.approx(0.5)
  assert float(own.radius_factor) == 1.0
  assert float(given.trust_radius) == pytest.approx(np.sqrt(4 * 0.002) * 0.5,
                                                    rel=1e-6)
  assert float(given.clip_scale) == pytest.approx(
      min(1.0, float(given.trust_radius) / float(given.surrogate)), rel=1e-6)
  assert float(given.clip_scale) < float(own.clip_scale)


def test_probe_measures_in_the_estimators_metric(tiny):
  """T is in the estimator's metric (here Fisher, on its probe rows)."""
  _, params, batch, _ = tiny
  est = ebc_optax.advanced.sensitivity_estimator(
      tiny_logits_fn, **ebc_optax.EBCConfig(
          kl="fisher", probe_batch_size=0.5).estimator_kwargs())
  cfg = ebc_optax.EBCConfig(controller="none", target_kl=1e-3, guard=True,
                            probe_every=1)
  tx = ebc_optax.advanced.kl_probe(
      ebc_optax.advanced.budget_clip(est, **cfg.clip_kwargs()), est,
      **cfg.probe_kwargs())
  updates = random_like(jax.random.PRNGKey(4), params, 0.05)
  out, state = tx.update(updates, tx.init(params), params, batch=batch)
  rows = batch[::2]
  z = tiny_logits_fn(params, rows)
  dz = tiny_logits_fn(optax.apply_updates(params, out), rows) - z
  want = float(ebc_optax.formulas.per_token_change_norm(dz, z, kl="fisher"))
  np.testing.assert_allclose(float(ebc_optax.telemetry(state)["applied_change"]),
                             want, rtol=1e-4)


def test_kl_probe_needs_the_estimator():
  cfg = ebc_optax.EBCConfig(controller="none")
  est = ebc_optax.advanced.sensitivity_estimator(
      tiny_logits_fn, **cfg.estimator_kwargs())
  with pytest.raises(ValueError, match="SensitivityEstimator"):
    ebc_optax.advanced.kl_probe(
        ebc_optax.advanced.budget_clip(est, **cfg.clip_kwargs()),
        tiny_logits_fn, **cfg.probe_kwargs())


def test_guard_is_left_alone_when_the_surrogate_promises_nothing(tiny):
  """Only the (unbudgeted) embedding moves: c·S = 0, so ρ has no denominator.
  It used to read T/1e-12 ≈ 1e11 and drive τ to ~0 for good."""
  _, params, batch, _ = tiny
  tx = ebc_optax.ellipsotope_budget_clip(tiny_logits_fn, 0.01, probe_every=1,
                                         probe_batch_size=None, controller="pi")
  embed_only = jax.tree.map(jnp.zeros_like, params)
  embed_only["embed"] = 0.1 * jnp.ones_like(params["embed"])
  _, state = tx.update(embed_only, tx.init(params), params, batch=batch)
  stats = ebc_optax.telemetry(state)
  assert float(stats["S"]) == 0.0 and float(stats["applied_change"]) > 0
  assert np.isnan(float(stats["rho"]))
  assert int(stats["guard_trips"]) == 0
  assert float(optax.tree.get(state, "next_radius_factor")) == 1.0
  # The next ordinary step runs at the full radius.
  updates = random_like(jax.random.PRNGKey(5), params, 0.2)
  _, state = tx.update(updates, state, params, batch=batch)
  stats = ebc_optax.telemetry(state)
  assert float(stats["tau"]) == pytest.approx(np.sqrt(4 * 0.01), rel=1e-6)
  assert np.isfinite(float(stats["rho"]))


def test_an_undefined_ratio_keeps_the_guard_factor(tiny):
  """After a shrink, a probe with nothing promised (c·S = 0) is no evidence
  that the surrogate stopped under-estimating: g stays where it was."""
  _, params, batch, _ = tiny
  tx = ebc_optax.ellipsotope_budget_clip(tiny_logits_fn, 0.01, probe_every=1,
                                         safety=0.2, beta_ema=0.0,
                                         controller=None, probe_batch_size=None)
  state = tx.init(params)
  _, state = tx.update(random_like(jax.random.PRNGKey(6), params, 0.2), state,
                       params, batch=batch)
  shrunk = float(optax.tree.get(state, "next_radius_factor"))
  assert shrunk < 1.0  # safety 0.2: S under-estimates T, the guard trips
  embed_only = jax.tree.map(jnp.zeros_like, params)
  embed_only["embed"] = 0.1 * jnp.ones_like(params["embed"])
  _, state = tx.update(embed_only, state, params, batch=batch)
  assert np.isnan(float(ebc_optax.telemetry(state)["rho"]))
  assert float(optax.tree.get(state, "next_radius_factor")) == shrunk
