"""One process of the 2-process CPU run driven by ``test_multiprocess.py``.

Usage: ``python _mp_worker.py PROCESS_ID NUM_PROCESSES PORT OUT_DIR``, with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` in the environment.

Every process builds the same tiny model and data, joins the JAX distributed
runtime, shards the global batch over a mesh of all global devices (each
process supplies only its own rows) and trains ``STEPS`` steps of
``adam + ellipsotope_budget_clip`` under ``jax.jit``. It writes its final
params and EBC telemetry to ``OUT_DIR/process_<id>.npz``.

The problem (model, data, transform, step) is defined here once and imported
by the test for its single-device reference, so both sides run the same code.
"""

import sys

import jax
import numpy as np
import optax

import ebc_optax

STEPS = 5
GLOBAL_BATCH = 16
LEARNING_RATE = 5e-2
# Small target so that c < 1; refresh every step and probe every other step,
# so β refreshes, probes, the controller and the guard all run in STEPS steps.
EBC_KW = dict(controller="pi", target_kl=0.003, update_every=1, probe_layers=1, probe_every=2)
# Runs compared with the reference: name -> extra EBC keyword arguments.
# "full" measures β and the KL probe on every row; "probe4" on every 4th row
# of the *global* batch (rows 0, 4, 8, 12: two on each process's devices).
RUNS = {"full": {"probe_batch_size": None}, "probe4": {"probe_batch_size": 4}}
TELEMETRY_KEYS = ("c", "S", "tau", "delta", "applied_kl", "applied_change",
                  "rho", "beta", "guard_factor", "step", "clipped_steps",
                  "probe_count")


def problem():
  """(params, global batch) as numpy, identical in every process."""
  # Imported here, not at module level: conftest rewrites XLA_FLAGS when
  # imported, and in a worker the backend must already be up by then.
  from conftest import tiny_batch, tiny_params
  params = jax.tree.map(np.asarray, tiny_params(jax.random.PRNGKey(0)))
  batch = np.asarray(tiny_batch(jax.random.PRNGKey(1), batch=GLOBAL_BATCH))
  return params, batch


def make_tx(**ebc_kw):
  from conftest import tiny_logits_fn
  return optax.chain(
      optax.adam(LEARNING_RATE),
      ebc_optax.ellipsotope_budget_clip(tiny_logits_fn, **EBC_KW, **ebc_kw))


def make_step(tx):
  """The training step: plain code, no axis_name; sharding comes from jit."""
  from conftest import next_token_loss

  def step(params, state, batch):
    grads = jax.grad(next_token_loss)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state
  return step


def to_host(tree):
  """Numpy copies of (fully replicated) global arrays."""
  return jax.tree.map(np.asarray, tree)


def flatten(params, stats):
  """A flat dict for np.savez: ``param<keystr path>`` and ``stat/<key>``."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    out["param" + jax.tree_util.keystr(path)] = leaf
  for key in TELEMETRY_KEYS:
    out[f"stat/{key}"] = stats[key]
  return out


def main(process_id, num_processes, port, out_dir):
  # Cross-process collectives on CPU. "gloo" is already the default in jax
  # 0.10, set here so the requirement is explicit: with None a cross-process
  # step fails ("Multiprocess computations aren't implemented on the CPU
  # backend").
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_default_matmul_precision", "highest")
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=num_processes,
                             process_id=process_id,
                             initialization_timeout=120,
                             # Listen on loopback only (default: all interfaces).
                             coordinator_bind_address=f"127.0.0.1:{port}")
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  assert jax.process_count() == num_processes, jax.process_count()
  assert jax.local_device_count() == 4, jax.local_devices()
  assert jax.device_count() == 4 * num_processes, jax.devices()

  mesh = Mesh(np.array(jax.devices()), ("data",))
  data_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())

  params_np, batch_np = problem()
  # This process's rows of the global batch: the union of the slices its
  # devices hold (a contiguous block when the mesh is over jax.devices()).
  # A real input pipeline would load only these rows.
  slices = data_sharding.addressable_devices_indices_map(batch_np.shape)
  lo = min(s[0].start for s in slices.values())
  hi = max(s[0].stop for s in slices.values())
  batch = jax.make_array_from_process_local_data(
      data_sharding, batch_np[lo:hi], batch_np.shape)
  assert not batch.is_fully_addressable

  results = {"rows": np.array([lo, hi])}
  for name, ebc_kw in RUNS.items():
    tx = make_tx(**ebc_kw)
    params = jax.device_put(params_np, replicated)
    state = jax.jit(tx.init, out_shardings=replicated)(params)
    step = jax.jit(make_step(tx),
                   in_shardings=(replicated, replicated, data_sharding),
                   out_shardings=(replicated, replicated))
    for _ in range(STEPS):
      params, state = step(params, state, batch)
    assert step._cache_size() == 1
    # Replicated global arrays: any process can read them whole.
    stats = ebc_optax.telemetry(state)
    for key, value in flatten(to_host(params), to_host(stats)).items():
      results[f"{name}/{key}"] = value

  np.savez(f"{out_dir}/process_{process_id}.npz", **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
