"""Test setup: 8 simulated CPU devices, and a tiny GPT-like model to test on."""

import os

# Must happen before jax is imported anywhere.
# XLA aborts the whole process ("Termination timeout ... exceeded. Exiting to
# ensure a consistent program state") when one simulated device's thread has
# not reached a collective within its default timeout; on a loaded 2-core CI
# machine, beside the other test worker, that happened (.ci/run, 2026-12-07):
# a slow machine, not a deadlock. Wait up to 20 minutes before calling it one.
TEST_XLA_FLAGS = (" --xla_cpu_collective_call_terminate_timeout_seconds=1200"
                  " --xla_cpu_collective_timeout_seconds=1200")
# Most tests train tiny models for a few steps: compiling is most of their
# time, and XLA's backend optimisation passes most of compiling (the CLI's
# 8-arm ablation: 88 s -> 46 s; 300-step model-zoo runs unchanged). The suite
# tests behaviour, not code generation: EBC_OPTAX_TEST_FULL_OPT=1 runs it with
# XLA's default optimisation.
if not os.environ.get("EBC_OPTAX_TEST_FULL_OPT"):
  TEST_XLA_FLAGS += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    + TEST_XLA_FLAGS)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def tiny_logits_fn(params, tokens):
  """A 2-block residual tanh 'transformer' with embed / lm_head: [B, T] -> [B, T, V]."""
  h = params["embed"][tokens]
  for block in params["blocks"]:
    h = h + jnp.tanh(h @ block["w"] + block["b"])
  return h @ params["lm_head"]


def tiny_params(key, vocab=11, width=6, num_blocks=2, dtype=jnp.float32):
  keys = jax.random.split(key, num_blocks + 2)
  return {
      "embed": (jax.random.normal(keys[0], (vocab, width))).astype(dtype),
      "blocks": [
          {"w": (0.6 * jax.random.normal(keys[1 + i], (width, width))).astype(dtype),
           "b": jnp.zeros((width,), dtype)}
          for i in range(num_blocks)],
      "lm_head": (jax.random.normal(keys[-1], (width, vocab)) / width**0.5).astype(dtype),
  }


def tiny_batch(key, batch=8, seq=5, vocab=11):
  return jax.random.randint(key, (batch, seq), 0, vocab)


def next_token_loss(params, tokens):
  logits = tiny_logits_fn(params, tokens)[:, :-1].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


def telemetry_per_step(tx, params, batch, steps, loss=next_token_loss):
  """Trains ``steps`` jitted steps of ``tx`` on ``loss``; the telemetry after
  each (numpy) and the final params."""
  import ebc_optax
  import optax
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  out = []
  for _ in range(steps):
    params, state = step(params, state)
    out.append(jax.tree.map(np.asarray, ebc_optax.telemetry(state)))
  assert step._cache_size() == 1  # one trace for the whole run
  return out, params


@pytest.fixture
def tiny():
  """(logits_fn, params, batch, loss_fn) on vocab 11, 2 blocks."""
  params = tiny_params(jax.random.PRNGKey(0))
  batch = tiny_batch(jax.random.PRNGKey(1))
  return tiny_logits_fn, params, batch, next_token_loss


# --- brute-force references shared by the math tests -------------------------

def np_center(x):
  """Per-token centering in float64 numpy."""
  x = np.asarray(x, np.float64)
  return x - x.mean(-1, keepdims=True)


def block_jacobian(logits_fn, params, batch, i):
  """[N*V, P] float64 Jacobian of the flattened logits w.r.t. block ``i``."""
  flat, unravel = ravel_pytree(params["blocks"][i])

  def f(theta):
    blocks = list(params["blocks"])
    blocks[i] = unravel(theta)
    return logits_fn({**params, "blocks": blocks}, batch).reshape(-1)

  return np.asarray(jax.jacfwd(f)(flat), np.float64)


def random_like(key, tree, scale=1.0):
  """A pytree like ``tree`` of ``scale``-sized standard normal draws."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
      treedef, [scale * jax.random.normal(k, x.shape, x.dtype)
                for k, x in zip(keys, leaves)])


def flat_block(tree, i):
  """Block ``i`` of a tiny-model pytree as one float64 vector."""
  return np.asarray(ravel_pytree(tree["blocks"][i])[0], np.float64)


def block_norms(updates):
  """``[‖ΔW_ℓ‖]`` over the tiny model's blocks (float64)."""
  return np.asarray([np.linalg.norm(flat_block(updates, i))
                     for i in range(len(updates["blocks"]))])
