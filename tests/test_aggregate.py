"""Tests for ``budget_surrogate``, ``clip_scale`` and the bound ``S`` provides.

The bound is checked against the true linearised logit change, computed from
Jacobians materialised with ``jax.jacfwd`` (independently of the library's
JVP-based sensitivity estimator).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from jax.flatten_util import ravel_pytree

import ebc_optax
from conftest import block_jacobian
from conftest import np_center
from conftest import tiny_batch
from conftest import tiny_logits_fn
from conftest import tiny_params

SETTINGS = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------------------
# budget_surrogate / layer_contributions vs numpy
# ---------------------------------------------------------------------------

contribs = st.lists(st.floats(0.0, 100.0, allow_nan=False, width=32),
                    min_size=1, max_size=9)


@SETTINGS
@given(s=contribs)
def test_budget_surrogate_l1_matches_numpy(s):
  s64 = np.asarray(s, np.float64)
  got = float(ebc_optax.formulas.budget_surrogate(jnp.asarray(s, jnp.float32), "l1"))
  np.testing.assert_allclose(got, s64.sum(), rtol=1e-6, atol=1e-6)
  # l1 is the default.
  assert float(ebc_optax.formulas.budget_surrogate(jnp.asarray(s, jnp.float32))) == got


@SETTINGS
@given(s=contribs)
def test_budget_surrogate_l2_matches_numpy_and_dominates_l1(s):
  s64 = np.asarray(s, np.float64)
  got = float(ebc_optax.formulas.budget_surrogate(jnp.asarray(s, jnp.float32), "l2"))
  want = np.sqrt(len(s)) * np.sqrt(np.sum(s64**2))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # Cauchy-Schwarz: sqrt(L) * ||s||_2 >= ||s||_1.
  assert got >= s64.sum() * (1 - 1e-6) - 1e-6


def test_budget_surrogate_explicit_values():
  s = jnp.array([3.0, 4.0])
  assert float(ebc_optax.formulas.budget_surrogate(s, "l1")) == pytest.approx(7.0)
  assert float(ebc_optax.formulas.budget_surrogate(s, "l2")) == pytest.approx(
      np.sqrt(2.0) * 5.0, rel=1e-6)
  # Equal contributions: the two surrogates agree (L * s).
  eq = jnp.full((4,), 2.5)
  assert float(ebc_optax.formulas.budget_surrogate(eq, "l1")) == pytest.approx(10.0)
  assert float(ebc_optax.formulas.budget_surrogate(eq, "l2")) == pytest.approx(10.0, rel=1e-6)
  # A single layer: both are that layer's contribution.
  one = jnp.array([1.75])
  assert float(ebc_optax.formulas.budget_surrogate(one, "l1")) == pytest.approx(1.75)
  assert float(ebc_optax.formulas.budget_surrogate(one, "l2")) == pytest.approx(1.75)
  assert ebc_optax.formulas.budget_surrogate(s, "l2").dtype == jnp.float32


def test_budget_surrogate_rejects_unknown_aggregate():
  with pytest.raises(ValueError, match="aggregate"):
    ebc_optax.formulas.budget_surrogate(jnp.ones(3), "linf")


@SETTINGS
@given(beta=st.lists(st.floats(0.0, 10.0, width=32), min_size=1, max_size=6),
       seed=st.integers(0, 2**31 - 1))
def test_layer_contributions_is_elementwise_product(beta, seed):
  norms = np.random.default_rng(seed).uniform(0.0, 5.0, len(beta))
  got = np.asarray(ebc_optax.formulas.layer_contributions(jnp.asarray(beta),
                                                 jnp.asarray(norms)))
  assert got.dtype == np.float32
  np.testing.assert_allclose(got, np.asarray(beta) * norms, rtol=1e-6,
                             atol=1e-7)


# ---------------------------------------------------------------------------
# clip_scale
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("surrogate,radius,expected", [
    (4.0, 1.0, 0.25),       # clipped
    (0.5, 1.0, 1.0),        # inside the radius
    (1.0, 1.0, 1.0),        # exactly on the boundary
    (10.0, 0.2, 0.02),
    (0.0, 1.0, 1.0),        # S = 0 -> tau / eps is huge -> 1
    (3.0, 0.0, 0.0),        # zero radius -> zero step
])
def test_clip_scale_cases(surrogate, radius, expected):
  got = float(ebc_optax.formulas.clip_scale(surrogate, radius))
  assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("surrogate,radius,expected", [
    (4.0, 1.0, 0.0),        # beyond the radius: refused
    (0.5, 1.0, 1.0),        # inside: passes whole
    (1.0, 1.0, 1.0),        # on the boundary: passes
    (0.0, 1.0, 1.0),        # a zero step
    (3.0, 0.0, 0.0),
])
def test_clip_scale_skip_refuses_what_is_beyond_the_radius(surrogate, radius,
                                                           expected):
  got = float(ebc_optax.formulas.clip_scale(surrogate, radius, overshoot="skip"))
  assert got == expected
  with pytest.raises(ValueError, match="overshoot"):
    ebc_optax.formulas.clip_scale(surrogate, radius, overshoot="drop")


def test_clip_scale_eps_floor():
  # S below the floor is replaced by eps: c = min(1, tau / eps).
  assert float(ebc_optax.formulas.clip_scale(0.0, 1e-14, eps=1e-12)) == pytest.approx(
      1e-2, rel=1e-5)
  assert float(ebc_optax.formulas.clip_scale(1e-20, 1e-14, eps=1e-12)) == pytest.approx(
      1e-2, rel=1e-5)
  # Above the floor eps is irrelevant.
  assert float(ebc_optax.formulas.clip_scale(2.0, 1.0, eps=1e-3)) == pytest.approx(0.5)


@SETTINGS
@given(s=st.floats(1e-6, 1e6), tau=st.floats(1e-6, 1e6))
def test_clip_scale_property(s, tau):
  c = float(ebc_optax.formulas.clip_scale(s, tau))
  np.testing.assert_allclose(c, min(1.0, tau / s), rtol=1e-5)
  assert 0.0 < c <= 1.0
  # After scaling, the surrogate is within the radius.
  assert c * s <= tau * (1 + 1e-5)


def test_clip_scale_vectorised():
  s = jnp.array([0.5, 2.0, 8.0])
  np.testing.assert_allclose(np.asarray(ebc_optax.formulas.clip_scale(s, 2.0)),
                             [1.0, 1.0, 0.25], rtol=1e-6)


# ---------------------------------------------------------------------------
# The surrogate bounds the true linearised (centered, per-token) logit change.
# ---------------------------------------------------------------------------


@SETTINGS
@given(width=st.sampled_from([3, 5]), num_blocks=st.sampled_from([1, 2, 3]),
       vocab=st.sampled_from([4, 7]), seed=st.integers(0, 2**31 - 1),
       layer_scales=st.lists(st.sampled_from([0.0, 1e-3, 1.0, 30.0]),
                             min_size=3, max_size=3))
def test_surrogates_bound_true_linearised_change(width, num_blocks, vocab, seed,
                                                 layer_scales):
  k_param, k_batch, k_upd = jax.random.split(jax.random.PRNGKey(seed), 3)
  params = tiny_params(k_param, vocab=vocab, width=width, num_blocks=num_blocks)
  batch = tiny_batch(k_batch, batch=2, seq=3, vocab=vocab)
  n_tokens = 2 * 3
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(k_upd, len(leaves))
  updates = jax.tree.unflatten(
      treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  # Different magnitudes per block (possibly an all-zero block).
  updates["blocks"] = [jax.tree.map(lambda u, sc=layer_scales[i]: sc * u, b)
                       for i, b in enumerate(updates["blocks"])]

  total = np.zeros(n_tokens * vocab)
  contributions, betas, norms = [], [], []
  for i in range(num_blocks):
    jac = block_jacobian(tiny_logits_fn, params, batch, i)
    dw = np.asarray(ravel_pytree(updates["blocks"][i])[0], np.float64)
    dz = jac @ dw
    total += dz
    s_i = np.linalg.norm(np_center(dz.reshape(n_tokens, vocab))) / np.sqrt(n_tokens)
    contributions.append(s_i)
    norm = np.linalg.norm(dw)
    norms.append(norm)
    betas.append(s_i / norm if norm > 0 else 0.0)
  true_change = (np.linalg.norm(np_center(total.reshape(n_tokens, vocab)))
                 / np.sqrt(n_tokens))

  # s_l = beta_l * ||dW_l|| through the library.
  s = ebc_optax.formulas.layer_contributions(jnp.asarray(betas, jnp.float32),
                                    jnp.asarray(norms, jnp.float32))
  np.testing.assert_allclose(np.asarray(s), contributions, rtol=1e-5, atol=1e-12)
  l1 = float(ebc_optax.formulas.budget_surrogate(s, "l1"))
  l2 = float(ebc_optax.formulas.budget_surrogate(s, "l2"))
  assert l1 >= true_change * (1 - 1e-5), (l1, true_change)
  assert l2 >= true_change * (1 - 1e-5), (l2, true_change)
  assert l2 >= l1 * (1 - 1e-6)
  # The per-token library norm of the total change is the same number.
  rms = float(ebc_optax.formulas.per_token_rms_norm(
      jnp.asarray(total.reshape(n_tokens, vocab), jnp.float32)))
  np.testing.assert_allclose(rms, true_change, rtol=1e-4, atol=1e-9)


def test_l2_without_sqrt_num_layers_is_not_a_bound():
  """Two layers with identical contributions J_1 dW_1 = J_2 dW_2 = v."""
  rng = np.random.default_rng(0)
  n_tokens, vocab = 6, 5
  v = rng.standard_normal((n_tokens, vocab))
  s_one = np.linalg.norm(np_center(v)) / np.sqrt(n_tokens)
  true_change = np.linalg.norm(np_center(v + v)) / np.sqrt(n_tokens)  # 2 s_one
  s = jnp.asarray([s_one, s_one], jnp.float32)
  naive_l2 = float(jnp.sqrt(jnp.sum(jnp.square(s))))  # sqrt(2) s_one
  assert naive_l2 < true_change * 0.8  # fails to bound (by a factor sqrt 2)
  l2 = float(ebc_optax.formulas.budget_surrogate(s, "l2"))
  l1 = float(ebc_optax.formulas.budget_surrogate(s, "l1"))
  assert l2 >= true_change * (1 - 1e-6)
  assert l1 >= true_change * (1 - 1e-6)
  # With identical contributions the bound is tight.
  np.testing.assert_allclose(l2, true_change, rtol=1e-5)


def _shared_logits_fn(params, x):
  """Logits x @ (W_0 + W_1): J_0 dW = J_1 dW for the same dW."""
  return x @ (params["blocks"][0] + params["blocks"][1])


def test_l2_surrogate_in_full_transform_bounds_aligned_layers():
  """Through the transform: S (l2) >= the true change, sqrt(2) s would not be."""
  k0, k1, k2, k3 = jax.random.split(jax.random.PRNGKey(3), 4)
  x = jax.random.normal(k0, (4, 3, 5))
  params = {"blocks": [jax.random.normal(k1, (5, 6)),
                       jax.random.normal(k2, (5, 6))]}
  dw = 0.01 * jax.random.normal(k3, (5, 6))
  updates = {"blocks": [dw, dw]}
  n_tokens = 12

  jacs = [block_jacobian(_shared_logits_fn, params, x, i) for i in range(2)]
  dzs = [jac @ np.asarray(dw, np.float64).reshape(-1) for jac in jacs]
  np.testing.assert_allclose(dzs[0], dzs[1], rtol=1e-6, atol=1e-9)
  true_change = (np.linalg.norm(np_center((dzs[0] + dzs[1]).reshape(n_tokens, 6)))
                 / np.sqrt(n_tokens))
  s_one = np.linalg.norm(np_center(dzs[0].reshape(n_tokens, 6))) / np.sqrt(n_tokens)

  for aggregate in ("l1", "l2"):
    tx = ebc_optax.ellipsotope_budget_clip(
        _shared_logits_fn, 1e3, aggregate=aggregate, beta_ema=0.0, safety=1.0,
        controller=None, guard=False, probe_every=0, probe_batch_size=None)
    state = tx.init(params)
    out, state = tx.update(updates, state, params, batch=x)
    stats = ebc_optax.telemetry(state)
    np.testing.assert_allclose(np.asarray(stats["contribution"]), [s_one, s_one],
                               rtol=1e-5)
    surrogate = float(stats["S"])
    assert surrogate >= true_change * (1 - 1e-5)
    np.testing.assert_allclose(surrogate, 2 * s_one, rtol=1e-5)
    assert np.sqrt(2.0) * s_one < true_change * 0.8
    assert float(stats["c"]) == 1.0
