"""Contract tests: the transform behaves as an optax transformation should."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ebc_optax
from conftest import next_token_loss, tiny_batch, tiny_logits_fn, tiny_params


def _train(tx, params, batch, steps, loss_fn=next_token_loss):
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  for _ in range(steps):
    params, state, loss = step(params, state, batch)
    losses.append(float(loss))
  return params, state, losses, step


def _ebc(**kw):
  kw.setdefault("target_kl", 0.01)
  kw.setdefault("controller", "pi")
  return ebc_optax.ellipsotope_budget_clip(tiny_logits_fn, **kw)


def test_quickstart_chain_with_adam_trains_and_traces_once(tiny):
  _, params, batch, _ = tiny
  tx = optax.chain(optax.adam(3e-2), _ebc(probe_every=2, update_every=2))
  params, state, losses, step = _train(tx, params, batch, 12)
  assert losses[-1] < losses[0]
  assert step._cache_size() == 1
  stats = ebc_optax.telemetry(state)
  assert int(stats["step"]) == 12
  assert int(stats["probe_count"]) == 6
  assert stats["beta"].shape == (2,) and stats["contribution"].shape == (2,)
  chex.assert_tree_all_finite(state)


def test_chain_with_muon(tiny):
  _, params, batch, _ = tiny
  tx = optax.chain(optax.contrib.muon(1e-2), _ebc(probe_every=1))
  params, state, losses, step = _train(tx, params, batch, 4)
  chex.assert_tree_all_finite(params)
  assert step._cache_size() == 1
  assert 0 < float(ebc_optax.telemetry(state)["c"]) <= 1


def test_field_names_are_unique_next_to_adam_and_muon(tiny):
  _, params, _, _ = tiny
  for base in (optax.adam(1e-3), optax.contrib.muon(1e-3)):
    state = optax.chain(base, _ebc()).init(params)
    for name in ("clip_scale", "surrogate", "trust_radius", "kl_target",
                 "applied_kl", "guard_ratio", "guard_trips", "clipped_steps",
                 "nonfinite_skips", "layer_beta", "layer_contribution",
                 "ebc_step"):
      optax.tree.get(state, name)  # raises on missing or ambiguous names


def test_clipped_update_is_scaled_copy_of_input(tiny):
  """c·S ≤ τ, c = 1 under budget, direction (and embed/out scaling) unchanged."""
  logits_fn, params, batch, _ = tiny
  updates = jax.tree.map(lambda p: 0.3 * jnp.ones_like(p), params)
  for target_kl, clipped in ((1e-4, True), (1e4, False)):
    tx = _ebc(target_kl=target_kl, controller=None, guard=False)
    out, state = tx.update(updates, tx.init(params), params, batch=batch)
    stats = ebc_optax.telemetry(state)
    c, s, tau = (float(stats[k]) for k in ("c", "S", "tau"))
    assert c * s <= tau * (1 + 1e-6)
    assert (c < 1) == clipped
    if not clipped:
      assert c == 1.0
    chex.assert_trees_all_close(
        out, jax.tree.map(lambda u: c * u, updates), rtol=1e-6)


def test_bf16_params_keep_dtype_and_f32_statistics():
  params = tiny_params(jax.random.PRNGKey(0), dtype=jnp.bfloat16)
  batch = tiny_batch(jax.random.PRNGKey(1))
  tx = optax.chain(optax.adam(1e-2), _ebc(probe_every=1))
  new_params, state, _, _ = _train(tx, params, batch, 3)
  chex.assert_trees_all_equal_dtypes(new_params, params)
  stats = ebc_optax.telemetry(state)
  for key in ("c", "S", "tau", "delta", "applied_kl", "beta", "contribution"):
    assert stats[key].dtype == jnp.float32, key
  chex.assert_tree_all_finite(stats)
  assert float(stats["beta"].min()) > 0


def test_inside_inject_hyperparams(tiny):
  _, params, batch, _ = tiny
  # EBC inside an injected chain ...
  outer = optax.inject_hyperparams(
      lambda learning_rate: optax.chain(optax.adam(learning_rate), _ebc()))(
          learning_rate=1e-2)
  _, state, _, step = _train(outer, params, batch, 3)
  assert int(ebc_optax.telemetry(state)["step"]) == 3
  # ... and EBC's own target_kl injected (a scheduled δ with a fixed-δ clip).
  # Callables must be static, or inject_hyperparams takes them for schedules;
  # probe_batch_size slices the batch, so it must be static too.
  with pytest.raises(ValueError, match="static_args"):
    optax.inject_hyperparams(ebc_optax.ellipsotope_budget_clip,
                             static_args=("logits_fn",))(
        logits_fn=tiny_logits_fn, target_kl=0.02, controller=None).init(params)
  inner = optax.inject_hyperparams(
      ebc_optax.ellipsotope_budget_clip,
      static_args=("logits_fn", "probe_batch_size"))(
      logits_fn=tiny_logits_fn, target_kl=0.02, controller=None)
  tx = optax.chain(optax.adam(1e-2), inner)
  _, state, _, step = _train(tx, params, batch, 2)
  assert step._cache_size() == 1
  np.testing.assert_allclose(ebc_optax.telemetry(state)["delta"], 0.02, rtol=1e-6)
  state[1].hyperparams["target_kl"] = jnp.asarray(0.04)
  grads = jax.grad(next_token_loss)(params, batch)
  _, state = tx.update(grads, state, params, batch=batch)
  np.testing.assert_allclose(ebc_optax.telemetry(state)["delta"], 0.04, rtol=1e-6)


def test_inside_multisteps_accumulates_then_clips(tiny):
  _, params, batch, _ = tiny
  tx = optax.MultiSteps(optax.chain(optax.adam(1e-2), _ebc()), every_k_schedule=3)
  _, state, _, step = _train(tx, params, batch, 6)
  assert step._cache_size() == 1
  assert int(ebc_optax.telemetry(state)["step"]) == 2  # two real updates


def test_telemetry_through_apply_if_finite_and_jit(tiny):
  _, params, batch, _ = tiny
  tx = optax.apply_if_finite(optax.chain(optax.adam(1e-2), _ebc()), 5)
  _, state, _, _ = _train(tx, params, batch, 2)
  stats = jax.jit(ebc_optax.telemetry)(state)
  assert set(stats) >= {"c", "S", "tau", "delta", "applied_kl", "rho", "beta",
                        "contribution", "clipped_steps", "guard_trips",
                        "nonfinite_skips"}


def test_telemetry_errors():
  with pytest.raises(ValueError, match="no EBC state"):
    ebc_optax.telemetry(optax.adam(1e-3).init({"w": jnp.ones(2)}))


def test_missing_params_or_batch_is_a_clear_error(tiny):
  _, params, batch, _ = tiny
  tx = _ebc()
  state = tx.init(params)
  with pytest.raises(ValueError, match="params"):
    tx.update(params, state, None, batch=batch)
  with pytest.raises(ValueError, match="batch"):
    tx.update(params, state, params)
  # Unknown extra args are ignored, like every optax transform.
  tx.update(params, state, params, batch=batch, unrelated=1)


def test_pieces_compose_without_controller_or_probe(tiny):
  """A user-assembled variant: estimator + budget clip only (fixed τ, no probe)."""
  _, params, batch, _ = tiny
  est = ebc_optax.advanced.sensitivity_estimator(
      tiny_logits_fn, **ebc_optax.EBCConfig(
          beta_ema=0.0, safety=1.0, probe_batch_size=None).estimator_kwargs())
  clip = ebc_optax.advanced.budget_clip(est, **ebc_optax.EBCConfig(
      controller="none", target_kl=1e-3).clip_kwargs())
  tx = optax.chain(optax.sgd(1e-1), clip)
  _, state, _, step = _train(tx, params, batch, 3)
  stats = ebc_optax.telemetry(state)
  assert "applied_kl" not in stats and "probe_count" not in stats  # no probe
  np.testing.assert_allclose(stats["tau"], np.sqrt(4e-3), rtol=1e-6)
  assert int(stats["clipped_steps"]) == 3


def test_custom_controller_slot(tiny):
  """Any KLController can replace the PI controller."""
  _, params, batch, _ = tiny
  halve = ebc_optax.controllers.KLController(
      init=lambda target: (optax.EmptyState(), target),
      update=lambda st, meas, delta, target: (st, 0.5 * delta))
  tx = optax.chain(optax.adam(1e-2), _ebc(target_kl=0.08, controller=halve,
                                          probe_every=1))
  _, state, _, _ = _train(tx, params, batch, 3)
  # δ used at steps 1, 2, 3: 0.08, 0.04, 0.02; proposed for step 4: 0.01.
  np.testing.assert_allclose(ebc_optax.telemetry(state)["delta"], 0.02, rtol=1e-6)
  np.testing.assert_allclose(optax.tree.get(state, "next_kl_target"), 0.01,
                             rtol=1e-6)
