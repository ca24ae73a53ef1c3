"""Shared runners for the data-parallel tests (8 simulated CPU devices).

Each runs ``steps`` training steps of ``tx`` on ``batch`` (16 rows) and returns
``(params, telemetry)``: on one device, under ``jax.pmap`` with ``axis_name``
(after checking that every replica holds identical params and ``keys``), or
under ``jax.jit`` with the batch sharded over a mesh (no axis name).
``loss(params, batch)`` is the scalar training loss.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import pytest

import ebc_optax
from conftest import tiny_batch, tiny_params

NUM_DEVICES = 8


def problem():
  """``(params, batch)`` of the tiny model with 16 rows; skips without 8 devices."""
  if jax.device_count() < NUM_DEVICES:
    pytest.skip(f"needs {NUM_DEVICES} (simulated) devices")
  return tiny_params(jax.random.PRNGKey(0)), tiny_batch(jax.random.PRNGKey(1), batch=16)


def train_step(tx, loss, axis_name=None):
  """``step(params, state, batch)``; grads ``pmean``-ed over ``axis_name``."""
  def step(params, state, batch):
    grads = jax.grad(loss)(params, batch)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state
  return step


def single_device_run(tx, loss, params, batch, steps):
  step = jax.jit(train_step(tx, loss))
  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state, batch)
  assert step._cache_size() == 1
  return params, ebc_optax.telemetry(state)


def pmap_run(tx, loss, params, batch, steps, keys=()):
  """``tx`` must be built with ``axis_name="dp"``."""
  p_step = jax.pmap(train_step(tx, loss, "dp"), axis_name="dp")
  replicated = jax.tree.map(lambda x: jnp.stack([x] * NUM_DEVICES), params)
  state = jax.pmap(tx.init)(replicated)
  shards = batch.reshape(NUM_DEVICES, -1, *batch.shape[1:])
  for _ in range(steps):
    replicated, state = p_step(replicated, state, shards)
  stats = ebc_optax.telemetry(state)
  # Every replica applied the same update and holds the same numbers.
  for leaf in jax.tree.leaves(replicated) + [stats[k] for k in keys if k in stats]:
    np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))
  return (jax.tree.map(lambda x: x[0], replicated),
          jax.tree.map(lambda x: x[0], stats))


def sharded_jit_run(tx, loss, params, batch, steps):
  """Plain ``jax.jit``; the batch is sharded over a mesh, params replicated."""
  mesh = Mesh(np.array(jax.devices()[:NUM_DEVICES]), ("data",))
  replicated = NamedSharding(mesh, P())
  params = jax.device_put(params, replicated)
  state = jax.device_put(tx.init(params), replicated)
  sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
  step = jax.jit(train_step(tx, loss))
  for _ in range(steps):
    params, state = step(params, state, sharded)
  assert step._cache_size() == 1
  return params, ebc_optax.telemetry(state)


def shard_map_run(tx, loss, params, batch, steps):
  """``jax.shard_map`` over a ``"dp"`` mesh; ``tx`` with ``axis_name="dp"``."""
  mesh = Mesh(np.array(jax.devices()[:NUM_DEVICES]), ("dp",))
  step = jax.jit(jax.shard_map(train_step(tx, loss, "dp"), mesh=mesh,
                               in_specs=(P(), P(), P("dp")),
                               out_specs=(P(), P())))
  state = tx.init(params)
  for _ in range(steps):
    params, state = step(params, state, batch)
  return params, ebc_optax.telemetry(state)
