"""The refresh / sweep / probe schedule (``ebc_optax.cadence``) against a
brute-force reading of its definition, on host ints and on traced arrays."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ebc_optax import cadence


def test_sweep_interval_auto_is_200_per_8_layers():
  got = [cadence.sweep_interval("auto", n) for n in (1, 3, 8, 9, 16, 32, 64)]
  assert got == [200, 200, 200, 400, 400, 800, 1600]
  assert cadence.sweep_interval(50, 64) == 50
  assert cadence.sweep_interval(None, 64) is None


def _brute(t, update_every, probe_every, sweep_every):
  sweep = bool(sweep_every) and t % sweep_every == 0
  refresh = (not sweep) and t % update_every == 0
  probe = probe_every > 0 and t % probe_every == 0
  name = "sweep" if sweep else "refresh" if refresh else ""
  if name and probe:
    return name + "+probe"
  return name or ("probe" if probe else "plain")


@pytest.mark.parametrize("update_every,probe_every,sweep_every",
                         [(20, 20, 200), (7, 3, 0), (1, 0, None), (5, 10, 30)])
def test_step_kinds_match_the_definition(update_every, probe_every, sweep_every):
  for t in range(0, 130):
    assert cadence.step_kind(t, update_every=update_every,
                             probe_every=probe_every,
                             sweep_every=sweep_every) == _brute(
        t, update_every, probe_every, sweep_every), t


def test_traced_predicates_agree_with_the_host_ones():
  steps = jnp.arange(0, 90, dtype=jnp.int32)
  for every in (0, 1, 4, 15):
    traced = jax.jit(jax.vmap(lambda t, e=every: jnp.stack([
        cadence.is_refresh(t, jnp.int32(max(e, 1))),
        cadence.is_probe(t, jnp.int32(e)),
        cadence.is_sweep(t, jnp.int32(e))])))(steps)
    host = np.array([[cadence.is_refresh(t, max(every, 1)),
                      cadence.is_probe(t, every), cadence.is_sweep(t, every)]
                     for t in range(90)])
    np.testing.assert_array_equal(np.asarray(traced), host)
  assert cadence.is_probe(np.int64(40), 20) is True  # numpy ints stay on host
  assert cadence.is_sweep(jnp.int32(0), None) is False


@pytest.mark.parametrize("layers", [3, 9, 32])
def test_one_interval_holds_every_kind_once_counted(layers):
  every = cadence.sweep_interval("auto", layers)
  kinds = cadence.kinds_in_interval(every, update_every=20, probe_every=20)
  assert sum(n for _, n in kinds.values()) == every
  assert kinds["sweep+probe"] == (2 * every, 1)
  assert kinds["refresh+probe"] == (every + 20, every // 20 - 1)
  assert kinds["plain"] == (every + 1, every - every // 20)
  for kind, (first, _) in kinds.items():  # the first step is of its kind
    assert cadence.step_kind(first, update_every=20, probe_every=20,
                             sweep_every=every) == kind
  assert not any(cadence.measures(t, update_every=20, probe_every=20,
                                  sweep_every=every)
                 for t in itertools.chain(range(every + 1, every + 20)))
