"""Tests for the logit-space helpers in ``ebc_optax._logits``.

Every reference below is an explicit float64 numpy computation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import ebc_optax
from ebc_optax import _logits
from ebc_optax import formulas

SETTINGS = settings(max_examples=25, deadline=None)

# Shapes [tokens..., vocab] with at least one token axis and vocab >= 2 (a
# fixed menu, so that eager jax ops are compiled for few shapes only).
shapes = st.sampled_from([
    (1, 2), (3, 2), (4, 7), (6, 9), (1, 1, 3), (2, 3, 5), (3, 4, 9),
    (2, 1, 3, 4), (1, 2, 2, 6),
])
seeds = st.integers(0, 2**31 - 1)


def _rand(seed, shape, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(
      np.float32)


def np_center(x):
  x = np.asarray(x, np.float64)
  v = x.shape[-1]
  out = np.empty_like(x)
  flat_in = x.reshape(-1, v)
  flat_out = out.reshape(-1, v)
  for t in range(flat_in.shape[0]):
    m = sum(flat_in[t]) / v
    flat_out[t] = flat_in[t] - m
  return out


def np_softmax(z):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_rms(dz, center=True):
  dz = np.asarray(dz, np.float64)
  if center:
    dz = np_center(dz)
  n = int(np.prod(dz.shape[:-1]))
  return np.sqrt(np.sum(dz**2) / n)


def np_kl_per_token(z, z_new):
  """[tokens] array of KL(softmax(z_t) || softmax(z_new_t)), float64."""
  v = z.shape[-1]
  p = np_softmax(z).reshape(-1, v)
  q = np_softmax(z_new).reshape(-1, v)
  return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


# ---------------------------------------------------------------------------
# center_per_token
# ---------------------------------------------------------------------------


@SETTINGS
@given(shape=shapes, seed=seeds)
def test_center_per_token_matches_numpy(shape, seed):
  x = _rand(seed, shape, 3.0)
  got = np.asarray(ebc_optax.formulas.center_per_token(jnp.asarray(x)))
  assert got.shape == x.shape
  np.testing.assert_allclose(got, np_center(x), rtol=1e-5, atol=1e-5)
  # Each token's centered logits sum to zero.
  np.testing.assert_allclose(got.sum(-1), 0.0, atol=1e-5)


@SETTINGS
@given(shape=shapes, seed=seeds)
def test_center_per_token_softmax_invariance(shape, seed):
  x = _rand(seed, shape, 2.0)
  shift = _rand(seed + 1, shape[:-1] + (1,), 5.0)
  centered = np.asarray(ebc_optax.formulas.center_per_token(jnp.asarray(x)))
  # Same predictions.
  np.testing.assert_allclose(np_softmax(centered), np_softmax(x), rtol=1e-5,
                             atol=1e-7)
  # A per-token constant shift is removed entirely.
  shifted = np.asarray(ebc_optax.formulas.center_per_token(jnp.asarray(x + shift)))
  np.testing.assert_allclose(shifted, centered, atol=5e-5)
  # Idempotent.
  twice = np.asarray(ebc_optax.formulas.center_per_token(jnp.asarray(centered)))
  np.testing.assert_allclose(twice, centered, atol=1e-5)


def test_center_per_token_is_per_token_not_global():
  x = jnp.array([[1.0, 3.0], [10.0, 20.0]])
  np.testing.assert_allclose(ebc_optax.formulas.center_per_token(x),
                             [[-1.0, 1.0], [-5.0, 5.0]])


# ---------------------------------------------------------------------------
# per_token_rms_norm
# ---------------------------------------------------------------------------


@SETTINGS
@given(shape=shapes, seed=seeds, center=st.booleans())
def test_per_token_rms_norm_matches_numpy(shape, seed, center):
  dz = _rand(seed, shape, 2.0)
  got = float(ebc_optax.formulas.per_token_rms_norm(jnp.asarray(dz), center=center))
  np.testing.assert_allclose(got, np_rms(dz, center), rtol=1e-5, atol=1e-7)


def test_per_token_rms_norm_explicit_values():
  # Two tokens, centered already: sqrt((2 + 8) / 2).
  dz = jnp.array([[1.0, -1.0], [2.0, -2.0]])
  np.testing.assert_allclose(float(ebc_optax.formulas.per_token_rms_norm(dz)),
                             np.sqrt(5.0), rtol=1e-6)
  # A pure per-token shift has zero centered norm but not an uncentered one.
  shift = jnp.array([[3.0, 3.0, 3.0], [-1.0, -1.0, -1.0]])
  assert float(ebc_optax.formulas.per_token_rms_norm(shift)) == pytest.approx(0.0, abs=1e-6)
  np.testing.assert_allclose(
      float(ebc_optax.formulas.per_token_rms_norm(shift, center=False)),
      np.sqrt((27.0 + 3.0) / 2), rtol=1e-6)


def test_per_token_rms_norm_independent_of_batch_size():
  dz = _rand(0, (3, 4, 7))
  tiled = np.concatenate([dz, dz, dz], axis=0)
  np.testing.assert_allclose(float(ebc_optax.formulas.per_token_rms_norm(dz)),
                             float(ebc_optax.formulas.per_token_rms_norm(tiled)),
                             rtol=1e-6)


def test_per_token_rms_norm_and_kl_all_reduce_over_axis_name():
  """Under pmap with axis_name the numbers are the global ones on every replica."""
  dz = _rand(3, (4, 2, 3, 6))
  z = _rand(4, (4, 2, 3, 6), 2.0)
  z_new = z + _rand(5, (4, 2, 3, 6), 0.5)

  @functools.partial(jax.pmap, axis_name="r")
  def f(dz, z, z_new):
    return (ebc_optax.formulas.per_token_rms_norm(dz, axis_name="r"),
            ebc_optax.formulas.per_token_kl(z, z_new, axis_name="r"))

  rms, kl = f(dz, z, z_new)
  np.testing.assert_allclose(np.asarray(rms),
                             np.full(4, np_rms(dz.reshape(-1, 6))), rtol=1e-5)
  np.testing.assert_allclose(
      np.asarray(kl), np.full(4, np.mean(np_kl_per_token(z, z_new))), rtol=1e-4)


# ---------------------------------------------------------------------------
# per_token_kl
# ---------------------------------------------------------------------------


@SETTINGS
@given(shape=shapes, seed=seeds, scale=st.sampled_from([0.1, 0.5, 1.0, 3.0]))
def test_per_token_kl_matches_numpy(shape, seed, scale):
  z = _rand(seed, shape, 2.0)
  z_new = z + _rand(seed + 7, shape, scale)
  got = float(ebc_optax.formulas.per_token_kl(jnp.asarray(z), jnp.asarray(z_new)))
  want = float(np.mean(np_kl_per_token(z, z_new)))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
  assert got >= 0.0


def test_per_token_kl_explicit_two_class_value():
  # p = (1/2, 1/2), q = softmax((0, log 3)) = (1/4, 3/4):
  # KL = 1/2 log(2) + 1/2 log(2/3).
  z = jnp.zeros((1, 2))
  z_new = jnp.array([[0.0, np.log(3.0)]], jnp.float32)
  want = 0.5 * np.log(2.0) + 0.5 * np.log(2.0 / 3.0)
  np.testing.assert_allclose(float(ebc_optax.formulas.per_token_kl(z, z_new)), want,
                             rtol=1e-5)
  # Direction matters: KL(q || p) differs.
  rev = 0.25 * np.log(0.25 / 0.5) + 0.75 * np.log(0.75 / 0.5)
  np.testing.assert_allclose(float(ebc_optax.formulas.per_token_kl(z_new, z)), rev,
                             rtol=1e-5)


def test_per_token_kl_is_a_mean_over_tokens():
  z = _rand(1, (2, 3, 5), 2.0)
  z_new = z + _rand(2, (2, 3, 5))
  per_tok = np_kl_per_token(z, z_new)
  np.testing.assert_allclose(float(ebc_optax.formulas.per_token_kl(z, z_new)),
                             per_tok.mean(), rtol=1e-4)
  # Shift-invariant in both arguments.
  np.testing.assert_allclose(
      float(ebc_optax.formulas.per_token_kl(z + 4.0, z_new - 2.0)), per_tok.mean(),
      rtol=1e-4)


def test_per_token_kl_zero_for_identical_and_shifted_logits():
  z = _rand(9, (4, 6), 3.0)
  assert float(ebc_optax.formulas.per_token_kl(z, z)) == pytest.approx(0.0, abs=1e-6)
  shift = _rand(10, (4, 1), 5.0)
  assert float(ebc_optax.formulas.per_token_kl(z, z + shift)) == pytest.approx(0.0, abs=1e-5)


# ---------------------------------------------------------------------------
# trust_radius
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("delta", [1e-6, 1e-3, 0.01, 0.05, 0.25, 1.0, 7.5])
def test_trust_radius_is_sqrt_4_delta(delta):
  np.testing.assert_allclose(float(ebc_optax.formulas.trust_radius(delta)),
                             np.sqrt(4.0 * delta), rtol=1e-6)


def test_trust_radius_array_and_dtype():
  deltas = np.array([0.01, 0.04, 0.25, 1.0])
  got = ebc_optax.formulas.trust_radius(jnp.asarray(deltas))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), [0.2, 0.4, 1.0, 2.0], rtol=1e-6)


# ---------------------------------------------------------------------------
# KL(p(z) || p(z + dz)) <= 1/4 ||center(dz)||^2
# ---------------------------------------------------------------------------


# Per-token versions of the library's numbers (each token as a 1-token batch).
_per_token_kls = jax.jit(jax.vmap(
    lambda a, b: ebc_optax.formulas.per_token_kl(a[None], b[None])))
_per_token_norms = jax.jit(jax.vmap(
    lambda d: ebc_optax.formulas.per_token_rms_norm(d[None])))


@SETTINGS
@given(tokens=st.sampled_from([1, 3, 8]), vocab=st.sampled_from([2, 5, 12]),
       seed=seeds,
       zscale=st.sampled_from([0.0, 1.0, 3.0]),
       dscale=st.sampled_from([1e-2, 3e-2, 1e-1]))
def test_kl_bounded_by_quarter_centered_sq_norm_per_token(tokens, vocab, seed,
                                                          zscale, dscale):
  z = _rand(seed, (tokens, vocab), zscale)
  # Add a large per-token shift to dz: it must not matter (centering).
  dz = _rand(seed + 1, (tokens, vocab), dscale) + _rand(seed + 2, (tokens, 1), 1.0)
  z_new = z + dz
  # The change actually made in float32 (z + dz is rounded).
  dz = (z_new.astype(np.float64) - z.astype(np.float64)).astype(np.float32)
  cdz = np_center(z_new.astype(np.float64) - z.astype(np.float64))
  bound = 0.25 * np.sum(cdz**2, axis=-1)  # [tokens]
  slack = 1e-3 * bound + 1e-7
  # Per token, with the library's KL and norm on single-token arrays.
  kl_t = np.asarray(_per_token_kls(jnp.asarray(z), jnp.asarray(z_new)))
  rms_t = np.asarray(_per_token_norms(jnp.asarray(dz)))
  np.testing.assert_allclose(rms_t**2, np.sum(cdz**2, -1),
                             rtol=1e-4, atol=1e-9)
  assert np.all(kl_t <= 0.25 * rms_t**2 + slack), (kl_t, 0.25 * rms_t**2)
  # The float64 reference satisfies the same bound (up to float64 rounding of
  # the KL's log terms, absolute ~1e-16 each).
  assert np.all(np_kl_per_token(z, z_new) <= bound * (1 + 1e-9) + 1e-13)
  # Averaged over tokens: mean KL <= 1/4 RMS^2.
  kl = float(ebc_optax.formulas.per_token_kl(z, z_new))
  rms = float(ebc_optax.formulas.per_token_rms_norm(jnp.asarray(dz)))
  assert kl <= 0.25 * rms**2 * (1 + 1e-3) + 1e-7
  # Hence an RMS change of at most tau = sqrt(4 delta) keeps KL <= delta.
  delta = rms**2 / 4.0
  assert float(ebc_optax.formulas.trust_radius(delta)) == pytest.approx(rms, rel=1e-5)
  assert kl <= delta * (1 + 1e-3) + 1e-7


def test_kl_bound_is_tight_for_two_equal_classes():
  # p = (1/2, 1/2), dz = (t, -t): KL = log cosh t ~ t^2/2 = 1/4 ||dz||^2.
  t = 1e-2
  z = jnp.zeros((1, 2))
  dz = jnp.array([[t, -t]], jnp.float32)
  kl = float(ebc_optax.formulas.per_token_kl(z, z + dz))
  bound = 0.25 * float(ebc_optax.formulas.per_token_rms_norm(dz)) ** 2
  np.testing.assert_allclose(kl, np.log(np.cosh(t)), rtol=1e-2)
  assert kl == pytest.approx(bound, rel=1e-2)


# ---------------------------------------------------------------------------
# check_logits
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(5,), ()])
def test_check_logits_rejects_missing_token_axis(shape):
  with pytest.raises(ValueError, match="shape"):
    _logits.check_logits(jnp.zeros(shape))


def test_check_logits_rejects_vocab_of_one():
  with pytest.raises(ValueError, match="vocab"):
    _logits.check_logits(jnp.zeros((4, 1)))
  with pytest.raises(ValueError, match="vocab"):
    _logits.check_logits(jnp.zeros((2, 3, 1)))


def test_check_logits_rejects_integer_logits_and_non_arrays():
  with pytest.raises(ValueError):
    _logits.check_logits(jnp.zeros((3, 4), jnp.int32))
  with pytest.raises(ValueError):
    _logits.check_logits([[0.0, 1.0]])


@pytest.mark.parametrize("shape", [(1, 2), (3, 5), (2, 3, 4)])
def test_check_logits_accepts_valid_shapes(shape):
  _logits.check_logits(jnp.zeros(shape))
  _logits.check_logits(jnp.zeros(shape, jnp.bfloat16))


def test_token_count_is_product_of_leading_axes():
  assert formulas.token_count(jnp.zeros((2, 3, 5))) == 6
  assert formulas.token_count(jnp.zeros((7, 4))) == 7
