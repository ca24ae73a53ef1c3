"""Spectral projections: norms against numpy's SVD, caps, tree handling, jit."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ebc_optax.experiments import spectral as S

SHAPES = [(8, 8), (16, 5), (5, 16), (32, 64)]
PROJECTIONS = {
    "spec_normalize": S.spec_normalize,
    "hard_cap": lambda w, w_max, **_: S.hard_cap(w, w_max),  # SVD only
    "spec_hammer": S.spec_hammer,
}


def np_spectrum(w):
  return np.linalg.svd(np.asarray(w, np.float64), compute_uv=False)


def gaussian(shape, seed=0, scale=1.0):
  return scale * jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def with_spectrum(shape, spectrum, seed=0):
  """A float32 matrix ``U diag(spectrum) Vᵀ`` with random orthonormal U, V."""
  rng = np.random.default_rng(seed)
  k = min(shape)
  u, _ = np.linalg.qr(rng.normal(size=(shape[0], k)))
  v, _ = np.linalg.qr(rng.normal(size=(shape[1], k)))
  s = np.zeros(k)
  s[:len(spectrum)] = spectrum
  return jnp.asarray((u * s) @ v.T, jnp.float32)


@pytest.mark.parametrize("shape", SHAPES)
def test_spectral_norm_matches_numpy(shape):
  w = gaussian(shape, seed=shape[0] + shape[1])
  top = np_spectrum(w)[0]
  np.testing.assert_allclose(S.spectral_norm(w, method="svd"), top, rtol=1e-5)
  power = S.spectral_norm(w, method="power", iters=200)
  np.testing.assert_allclose(power, top, rtol=1e-3)
  assert power.dtype == jnp.float32
  # Deterministic start vector: same answer twice; a key changes the start only.
  assert float(S.spectral_norm(w)) == float(S.spectral_norm(w))
  keyed = S.spectral_norm(w, iters=200, key=jax.random.PRNGKey(3))
  np.testing.assert_allclose(keyed, top, rtol=1e-3)


def test_power_iteration_converges_fast_with_a_gap():
  w = with_spectrum((24, 40), [5.0, 2.0, 1.0, 0.5])
  np.testing.assert_allclose(S.spectral_norm(w), 5.0, rtol=1e-5)  # default 20 iters
  assert float(S.spectral_norm(jnp.zeros((3, 4)))) == 0.0


@pytest.mark.parametrize("kind", sorted(PROJECTIONS))
@pytest.mark.parametrize("method", ["power", "svd"])
@pytest.mark.parametrize("shape", SHAPES)
def test_projection_caps_top_singular_value(kind, method, shape):
  # spec_hammer only lowers σ_1, so its input has only σ_1 above the cap;
  # power iteration gets enough iterations for the random matrices' small gap.
  if kind == "spec_hammer":
    w = with_spectrum(shape, [4.0, 0.6, 0.5, 0.1], seed=shape[0])
  else:
    w = gaussian(shape, seed=shape[1], scale=2.0)
  project = PROJECTIONS[kind]
  w_max = 0.7
  out = project(w, w_max, method=method, iters=200)
  assert out.shape == w.shape and out.dtype == w.dtype
  assert np_spectrum(out)[0] <= w_max * (1 + 1e-3)


@pytest.mark.parametrize("kind", sorted(PROJECTIONS))
def test_matrix_under_the_cap_is_unchanged(kind):
  w = with_spectrum((12, 7), [0.9, 0.4, 0.2])
  out = PROJECTIONS[kind](w, 1.0, method="power")
  if kind == "hard_cap":  # SVD round trip: unchanged up to float32 rounding.
    np.testing.assert_allclose(out, w, atol=1e-6)
  else:
    np.testing.assert_array_equal(out, w)


def test_spec_normalize_scales_the_whole_matrix():
  w = with_spectrum((10, 6), [3.0, 1.5, 0.6])
  out = S.spec_normalize(w, 1.0, method="svd")
  np.testing.assert_allclose(np_spectrum(out)[:3], [1.0, 0.5, 0.2], atol=1e-5)


@pytest.mark.parametrize("shape", [(9, 9), (12, 5), (5, 12)])
def test_hard_cap_clips_only_the_singular_values_above_the_cap(shape):
  spectrum = [3.0, 1.7, 0.8, 0.3, 0.05]
  w = with_spectrum(shape, spectrum, seed=1)
  out = S.hard_cap(w, 1.0)
  expected = np.minimum(np_spectrum(w), 1.0)
  np.testing.assert_allclose(np_spectrum(out), expected, atol=1e-5)
  np.testing.assert_allclose(np_spectrum(out)[:5], [1.0, 1.0, 0.8, 0.3, 0.05], atol=1e-5)


@pytest.mark.parametrize("method, atol", [("svd", 1e-5), ("power", 1e-4)])
@pytest.mark.parametrize("shape", [(9, 9), (12, 5), (5, 12)])
def test_spec_hammer_changes_only_the_top_singular_value(shape, method, atol):
  w = with_spectrum(shape, [3.0, 0.9, 0.5, 0.1, 0.02], seed=2)
  out = S.spec_hammer(w, 1.0, method=method)
  expected = np_spectrum(w)
  expected[0] = 1.0
  np.testing.assert_allclose(np_spectrum(out), expected, atol=atol)
  # With σ_2 above the cap too, σ_max ends at σ_2, not at the cap.
  w2 = with_spectrum(shape, [3.0, 2.0, 0.5], seed=3)
  np.testing.assert_allclose(
      np_spectrum(S.spec_hammer(w2, 1.0, method="svd"))[:3], [2.0, 1.0, 0.5],
      atol=1e-5)


def _tree(dtype=jnp.float32):
  return {
      "tok_embed": {"embedding": gaussian((11, 6), 1, 3.0).astype(dtype)},
      "blocks": {
          0: {"w": gaussian((6, 6), 2, 3.0).astype(dtype),
              "b": gaussian((6,), 3, 3.0).astype(dtype),
              "conv": gaussian((3, 6, 6), 4, 3.0).astype(dtype)},
          1: {"w": gaussian((6, 12), 5, 3.0).astype(dtype),
              "counts": jnp.full((4, 4), 7, jnp.int32)},
      },
      "lm_head": {"kernel": gaussian((6, 11), 6, 3.0).astype(dtype)},
  }


@pytest.mark.parametrize("kind", ["spec_normalize", "hard_cap", "spec_hammer"])
def test_project_params_touches_only_2d_non_embedding_leaves(kind):
  params = _tree()
  out = S.project_params(params, kind, w_max=1.0, method="svd")
  assert jax.tree.structure(out) == jax.tree.structure(params)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    new = functools.reduce(lambda t, k: t[k.key], path, out)
    assert new.dtype == leaf.dtype and new.shape == leaf.shape
    names = [k.key for k in path]
    if names in (["blocks", 0, "w"], ["blocks", 1, "w"], ["lm_head", "kernel"]):
      assert not np.allclose(new, leaf)
      if kind != "spec_hammer":
        assert np_spectrum(new)[0] <= 1.0 + 1e-3
    else:
      np.testing.assert_array_equal(new, leaf)


def test_project_params_none_returns_params():
  params = _tree()
  assert S.project_params(params, "none") is params


def test_project_params_keeps_bf16_and_caps():
  params = _tree(jnp.bfloat16)
  out = S.project_params(params, "spec_normalize", w_max=1.0, iters=50)
  assert all(a.dtype == b.dtype for a, b in
             zip(jax.tree.leaves(out), jax.tree.leaves(params)))
  kernel = out["lm_head"]["kernel"]
  assert kernel.dtype == jnp.bfloat16
  assert np_spectrum(kernel.astype(jnp.float32))[0] <= 1.0 + 1e-2  # bf16 rounding


@pytest.mark.parametrize("kind", ["spec_normalize", "hard_cap", "spec_hammer"])
def test_project_params_under_jit(kind):
  params = _tree()
  project = functools.partial(S.project_params, kind=kind, w_max=0.5)
  jitted = jax.jit(project)(params)
  eager = project(params)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5), jitted, eager)
  # w_max may be traced too.
  traced = jax.jit(lambda p, c: S.project_params(p, kind, w_max=c))(params, 0.5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, atol=1e-5), traced, eager)


@pytest.mark.parametrize("call, name", [
    (lambda p: S.project_params(p, "spectral"), "kind"),
    (lambda p: S.project_params(p, "hard_cap", w_max=0.0), "w_max"),
    (lambda p: S.project_params(p, "hard_cap", w_max=-1), "w_max"),
    (lambda p: S.project_params(p, "spec_hammer", method="qr"), "method"),
    (lambda p: S.project_params(p, "spec_hammer", iters=0), "iters"),
    (lambda p: S.spectral_norm(p["blocks"][0]["conv"]), "2-D"),
    (lambda p: S.spectral_norm(p["lm_head"]["kernel"], method="exact"), "method"),
])
def test_invalid_arguments(call, name):
  with pytest.raises(ValueError, match=name):
    call(_tree())
