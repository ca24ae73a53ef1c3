"""Data parallelism on 8 simulated CPU devices: pmap and sharded jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import ebc_optax
from conftest import next_token_loss, tiny_batch, tiny_logits_fn, tiny_params

STEPS = 4
KW = dict(target_kl=0.003, update_every=1, probe_layers=1, probe_every=1)


@pytest.fixture(scope="module")
def setup():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  params = tiny_params(jax.random.PRNGKey(0))
  batch = tiny_batch(jax.random.PRNGKey(1), batch=16)
  return params, batch


def _single_device_run(params, batch):
  tx = optax.chain(optax.adam(5e-2),
                   ebc_optax.ellipsotope_budget_clip(tiny_logits_fn, **KW))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(next_token_loss)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  for _ in range(STEPS):
    params, state = step(params, state)
  return params, ebc_optax.telemetry(state)


def _assert_matches(params, stats, reference):
  ref_params, ref_stats = reference
  chex.assert_trees_all_close(params, ref_params, rtol=2e-5, atol=2e-6)
  for key in ("c", "S", "tau", "delta", "applied_kl", "rho", "beta"):
    # KL of a small step cancels in float32: allow for the reduction order.
    np.testing.assert_allclose(stats[key], ref_stats[key],
                               rtol=1e-4 if key == "applied_kl" else 2e-5,
                               err_msg=key)


def _replica_step(tx):
  """One data-parallel step on a replica's shard: grads averaged over "dp"."""
  def step(params, state, batch):
    grads = jax.lax.pmean(jax.grad(next_token_loss)(params, batch), "dp")
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state
  return step


@pytest.fixture(scope="module")
def reference(setup):
  return _single_device_run(*setup)


def test_pmap_matches_single_device(setup, reference):
  params, batch = setup
  ref_params, ref_stats = reference
  assert float(ref_stats["c"]) < 1.0  # the clip is active: a meaningful check

  tx = optax.chain(
      optax.adam(5e-2),
      ebc_optax.ellipsotope_budget_clip(tiny_logits_fn, axis_name="dp", **KW))

  p_step = jax.pmap(_replica_step(tx), axis_name="dp")
  replicated = jax.tree.map(lambda x: jnp.stack([x] * 8), params)
  state = jax.pmap(tx.init)(replicated)
  shards = batch.reshape(8, -1, batch.shape[-1])
  for _ in range(STEPS):
    replicated, state = p_step(replicated, state, shards)

  # Identical on every replica ...
  for leaf in jax.tree.leaves(replicated):
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
  stats = ebc_optax.telemetry(state)
  for key in ("c", "S", "tau", "delta", "applied_kl", "beta"):
    np.testing.assert_array_equal(stats[key], np.broadcast_to(stats[key][0],
                                                              stats[key].shape))
  # ... and equal to one device on the concatenated batch.
  _assert_matches(jax.tree.map(lambda x: x[0], replicated),
                  jax.tree.map(lambda x: x[0], stats), reference)


def test_sharded_jit_over_mesh_matches_single_device(setup, reference):
  params, batch = setup

  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  batch_sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(params, replicated)
  tx = optax.chain(optax.adam(5e-2),
                   ebc_optax.ellipsotope_budget_clip(tiny_logits_fn, **KW))
  state = jax.device_put(tx.init(params), replicated)

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(next_token_loss)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  for _ in range(STEPS):
    params, state = step(params, state, batch_sharded)
  assert step._cache_size() == 1
  _assert_matches(params, ebc_optax.telemetry(state), reference)


def test_shard_map_with_axis_name_matches_single_device(setup, reference):
  params, batch = setup
  mesh = Mesh(np.array(jax.devices()[:8]), ("dp",))
  tx = optax.chain(
      optax.adam(5e-2),
      ebc_optax.ellipsotope_budget_clip(tiny_logits_fn, axis_name="dp", **KW))

  step = jax.jit(jax.shard_map(_replica_step(tx), mesh=mesh,
                               in_specs=(P(), P(), P("dp")),
                               out_specs=(P(), P())))
  state = tx.init(params)
  for _ in range(STEPS):
    params, state = step(params, state, batch)
  _assert_matches(params, ebc_optax.telemetry(state), reference)
