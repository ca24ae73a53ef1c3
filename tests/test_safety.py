"""Non-finite updates and statistics never reach the parameters or the state."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ebc_optax
from conftest import next_token_loss, tiny_logits_fn

BAD_STEPS = {2: jnp.nan, 5: jnp.inf, 6: -jnp.inf}
STEPS = 9


def _ebc():
  return ebc_optax.ellipsotope_budget_clip(
      tiny_logits_fn, 0.003, update_every=2, probe_every=2, controller="pi")


def _run(tx, params, batch, bad_steps, skip_bad=False):
  state = tx.init(params)

  @jax.jit
  def step(params, state, poison):
    grads = jax.grad(next_token_loss)(params, batch)
    grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].add(poison), grads)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  for i in range(STEPS):
    if i in bad_steps and skip_bad:
      continue
    params, state = step(params, state, jnp.float32(bad_steps.get(i, 0.0)))
    chex.assert_tree_all_finite(params)
  return params, state


def test_stateless_base_bad_steps_are_skipped_exactly(tiny):
  """sgd + EBC with NaN/Inf gradients = the same run without those steps."""
  _, params, batch, _ = tiny
  tx = optax.chain(optax.sgd(0.5), _ebc())
  got, state = _run(tx, params, batch, BAD_STEPS)
  want, ref_state = _run(tx, params, batch, BAD_STEPS, skip_bad=True)
  chex.assert_tree_all_finite(state)
  chex.assert_trees_all_close(got, want, rtol=1e-6)
  stats, ref = ebc_optax.telemetry(state), ebc_optax.telemetry(ref_state)
  assert int(stats["nonfinite_skips"]) == len(BAD_STEPS)
  assert int(stats["step"]) == STEPS - len(BAD_STEPS) == int(ref["step"])
  assert float(stats["c"]) < 1.0


def test_apply_if_finite_protects_the_base_optimizer_state(tiny):
  """EBC cannot un-poison adam's moments; wrapping the chain does, exactly."""
  _, params, batch, _ = tiny
  tx = optax.apply_if_finite(optax.chain(optax.adam(5e-2), _ebc()), 10**6)
  got, state = _run(tx, params, batch, BAD_STEPS)
  want, _ = _run(tx, params, batch, BAD_STEPS, skip_bad=True)
  chex.assert_tree_all_finite(state)
  chex.assert_trees_all_close(got, want, rtol=1e-6)
  assert int(optax.tree.get(state, "total_notfinite")) == len(BAD_STEPS)


def test_bare_chain_never_lets_nonfinite_reach_params(tiny):
  _, params, batch, _ = tiny
  tx = optax.chain(optax.adam(5e-2), _ebc())
  got, state = _run(tx, params, batch, {3: jnp.nan})
  # adam's moments are NaN from step 3 on, so every later step is skipped.
  assert int(ebc_optax.telemetry(state)["nonfinite_skips"]) == STEPS - 3
  chex.assert_tree_all_finite(ebc_optax.telemetry(state))


def test_nonfinite_probe_result_skips_the_step(tiny):
  """A NaN that appears only inside EBC (β, probe) is caught too."""
  _, params, batch, _ = tiny

  def logits_fn(p, b):
    return tiny_logits_fn(p, b["tokens"]) * b["scale"]

  tx = optax.chain(optax.sgd(0.5), ebc_optax.ellipsotope_budget_clip(
      logits_fn, 0.003, update_every=1, probe_every=1, controller="pi"))
  state = tx.init(params)
  grads = jax.grad(next_token_loss)(params, batch)
  for scale, skipped in ((1.0, 0), (jnp.nan, 1), (1.0, 1)):
    updates, state = tx.update(grads, state, params,
                               batch={"tokens": batch, "scale": scale})
    stats = ebc_optax.telemetry(state)
    assert int(stats["nonfinite_skips"]) == skipped
    chex.assert_tree_all_finite((updates, state))
  assert int(stats["step"]) == 2
  assert all(np.any(np.asarray(u) != 0) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize("leaf", ["embed", "lm_head"])
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_nonfinite_only_in_an_unbudgeted_leaf_is_caught(tiny, leaf, bad):
  """The embedding/head are outside S, but update_norm still sees them."""
  _, params, batch, _ = tiny
  tx = optax.chain(optax.sgd(0.5), _ebc())
  state = tx.init(params)
  grads = jax.grad(next_token_loss)(params, batch)
  grads[leaf] = grads[leaf].at[0, 0].set(bad)
  updates, state = jax.jit(lambda g, s: tx.update(g, s, params, batch=batch))(
      grads, state)
  stats = ebc_optax.telemetry(state)
  assert int(stats["nonfinite_skips"]) == 1 and int(stats["step"]) == 0
  assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))


def test_update_norm_is_the_norm_of_the_whole_update(tiny):
  _, params, batch, _ = tiny
  tx = _ebc()
  grads = jax.grad(next_token_loss)(params, batch)
  _, state = tx.update(grads, tx.init(params), params, batch=batch)
  want = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2)
                     for g in jax.tree.leaves(grads)))
  np.testing.assert_allclose(optax.tree.get(state, "update_norm"), want, rtol=1e-5)
