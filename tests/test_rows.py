"""The probe rows (``_rows``): which leaves carry rows, which rows, the same
subset on one device, under pmap / shard_map and under sharded jit."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ebc_optax
from ebc_optax import _rows
import _data_parallel as dp
from conftest import next_token_loss, tiny_batch, tiny_logits_fn, tiny_params


@pytest.mark.parametrize("size,rows,want", [
    (0.25, 16, (4, 4)), (0.3, 8, (3, 3)), (1.0, 8, (1, 8)), (0.5, 5, (2, 3)),
    (0.01, 8, (100, 1)), (4, 16, (4, 4)), (3, 10, (3, 3)), (8, 8, (1, 8)),
    (None, 8, (1, 8))])
def test_probe_stride(size, rows, want):
  assert _rows.probe_stride(size, rows) == want


def test_int_larger_than_the_rows_raises_naming_it():
  with pytest.raises(ValueError, match=r"probe_batch_size=9 exceeds the batch's 8"):
    _rows.probe_stride(9, 8)


def test_strided_rows_match_a_brute_force_slice():
  for rows in range(1, 30):
    for size in (0.1, 0.25, 0.5, 1.0, 1, 2, 3):
      if isinstance(size, int) and size > rows:
        continue
      stride, count = _rows.probe_stride(size, rows)
      got = _rows.take_rows(jnp.arange(rows), rows, stride, count)
      if isinstance(size, float):
        want = np.arange(0, rows, max(1, round(1 / size)))
      else:
        want = np.arange(0, rows, max(1, rows // size))[:size]
      np.testing.assert_array_equal(got, want)
      assert len(want) == (math.ceil(rows / stride) if isinstance(size, float)
                           else size)


def _dict_logits_fn(params, batch):
  """A dict batch: tokens [B, T], a per-row mask [B, T], a [T] position table."""
  z = tiny_logits_fn(params, batch["tokens"])
  z = z + batch["positions"][None, :, None] * 0.01
  return z * batch["mask"][..., None]


def test_only_leaves_with_the_logits_rows_are_sliced():
  params = tiny_params(jax.random.PRNGKey(0))
  tokens = tiny_batch(jax.random.PRNGKey(1), batch=8, seq=5)
  batch = {"tokens": tokens, "mask": jnp.ones((8, 5)),
           "positions": jnp.arange(5.0), "scale": jnp.float32(2.0)}
  sub = _rows.probe_batch(_dict_logits_fn, params, batch, 0.25)
  np.testing.assert_array_equal(sub["tokens"], tokens[::4])
  assert sub["mask"].shape == (2, 5)
  np.testing.assert_array_equal(sub["positions"], batch["positions"])
  assert float(sub["scale"]) == 2.0


def test_a_table_with_other_leading_size_is_passed_whole_in_the_transform():
  """The old rule sliced every leaf: a [T] table broke with a TypeError."""
  params = tiny_params(jax.random.PRNGKey(0))
  tokens = tiny_batch(jax.random.PRNGKey(1), batch=8, seq=5)
  batch = {"tokens": tokens, "mask": jnp.ones((8, 5)), "positions": jnp.arange(5.0)}
  sliced = {"tokens": tokens[::4], "mask": jnp.ones((2, 5)),
            "positions": jnp.arange(5.0)}
  grads = jax.tree.map(lambda x: 0.3 * jnp.ones_like(x), params)
  stats = []
  for kw, b in (({}, batch),
                ({"probe_batch_fn": lambda b: sliced}, batch),
                ({"probe_batch_size": None}, sliced)):
    tx = ebc_optax.ellipsotope_budget_clip(_dict_logits_fn, 0.01, probe_every=1,
                                           **{"controller": "pi", **kw})
    _, state = tx.update(grads, tx.init(params), params, batch=b)
    stats.append(ebc_optax.telemetry(state))
  for other in stats[1:]:
    for key in ("c", "S", "beta", "applied_kl", "applied_change"):
      np.testing.assert_allclose(stats[0][key], other[key], rtol=1e-6, err_msg=key)


def test_a_mask_that_breaks_when_sliced_is_a_clear_error():
  """A [T, T] mask with T == B has the rows' leading size but holds none."""
  params = tiny_params(jax.random.PRNGKey(0))
  tokens = tiny_batch(jax.random.PRNGKey(1), batch=5, seq=5)

  def logits_fn(params, batch):
    z = tiny_logits_fn(params, batch["tokens"])
    return z + (batch["causal"] @ jnp.ones((5, 1)))[None] * 0.0

  batch = {"tokens": tokens, "causal": jnp.tril(jnp.ones((5, 5)))}
  with pytest.raises(ValueError, match="probe_batch_fn"):
    _rows.probe_batch(logits_fn, params, batch, 0.5)
  # The override takes the rows the user means.
  sub = _rows.probe_batch(logits_fn, params, batch, 0.5,
                          lambda b: {**b, "tokens": b["tokens"][::2]})
  assert sub["causal"].shape == (5, 5) and sub["tokens"].shape == (3, 5)


def test_flattened_logits_warn_and_probe_every_row():
  params = tiny_params(jax.random.PRNGKey(0))
  tokens = tiny_batch(jax.random.PRNGKey(1), batch=8, seq=5)

  def flat_fn(params, tokens):
    z = tiny_logits_fn(params, tokens)
    return z.reshape(-1, z.shape[-1])

  with pytest.warns(UserWarning, match="no effect"):
    sub = _rows.probe_batch(flat_fn, params, tokens, 0.25)
  assert sub is tokens


# --- the same rows on one device, pmap, shard_map and sharded jit -------------

def _tx(axis_name=None):
  return optax.chain(optax.adam(5e-2), ebc_optax.ellipsotope_budget_clip(
      tiny_logits_fn, 0.002, probe_every=2, update_every=2, aggregate="exact",
      exact_every=2, kl="fisher", probe_batch_size=0.25, axis_name=axis_name, controller="pi"))


KEYS = ("c", "S", "beta", "applied_kl", "applied_change", "delta")


def test_default_rows_are_the_same_subset_on_every_layout():
  """32 rows on 8 devices: every replica's every 4th row is the global every
  4th row, so all four layouts probe rows 0, 4, ..., 28 — from every device,
  not only the first ones."""
  params, _ = dp.problem()
  batch = tiny_batch(jax.random.PRNGKey(1), batch=32)
  steps = 4
  ref = dp.single_device_run(_tx(), next_token_loss, params, batch, steps)
  assert float(ref[1]["c"]) < 1.0
  runs = {
      "pmap": dp.pmap_run(_tx("dp"), next_token_loss, params, batch, steps),
      "shard_map": dp.shard_map_run(_tx("dp"), next_token_loss, params, batch,
                                    steps),
      "sharded jit": dp.sharded_jit_run(_tx(), next_token_loss, params, batch,
                                        steps)}
  for name, (p, stats) in runs.items():
    for key in KEYS:
      np.testing.assert_allclose(np.asarray(stats[key]), np.asarray(ref[1][key]),
                                 rtol=2e-4, err_msg=f"{name}: {key}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5,
                                                         atol=2e-6), p, ref[0])
  # The check can fail: the first 8 rows (the first two devices' rows only)
  # are another probe batch.
  first = optax.chain(optax.adam(5e-2), ebc_optax.ellipsotope_budget_clip(
      tiny_logits_fn, 0.002, probe_every=2, update_every=2, aggregate="exact",
      exact_every=2, kl="fisher", probe_batch_fn=lambda b: b[:8], controller="pi"))
  other = dp.single_device_run(first, next_token_loss, params, batch, steps)
  assert abs(float(other[1]["S"]) / float(ref[1]["S"]) - 1) > 1e-3
