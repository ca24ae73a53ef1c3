"""Spectral weight constraints, applied to the parameters after each update.

The "Lipschitz transformers" seed study keeps the largest singular value of
every weight matrix at most ``w_max``. The constraints here are projections:
they act on ``params`` after ``optax.apply_updates`` (they are not optax
transformations, since they act on the weights, not on the update)::

  params = optax.apply_updates(params, updates)
  params = project_params(params, "spec_normalize", w_max=1.0)

Three projections, for a 2-D matrix ``W = Σ_i σ_i u_i v_iᵀ`` (``σ_1 ≥ σ_2 ≥ …``):

* ``spec_normalize``: ``W ← W / max(1, σ_1/w_max)`` (scales the whole matrix);
* ``hard_cap``: ``σ_i ← min(σ_i, w_max)`` for every ``i`` (exact SVD);
* ``spec_hammer``: ``σ_1 ← min(σ_1, w_max)``, other singular values untouched.

``σ_1`` (and ``u_1, v_1``) come from power iteration (``method="power"``, a
fixed start vector, so everything is deterministic and jittable) or from an
exact SVD (``method="svd"``). Power iteration approaches ``σ_1`` from below,
so a projection based on it can leave ``σ_1`` slightly above ``w_max`` when the
top two singular values are close and ``iters`` is small.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ebc_optax import layers

SPECTRAL_METHODS = ("none", "spec_normalize", "hard_cap", "spec_hammer")
NORM_METHODS = ("power", "svd")

# Path components naming an embedding table (token-wise, as in
# ``ebc_optax.layers.is_embed_or_output``, but without the output-head names: the
# output projection and ``unembed`` matrices are constrained).
_EMBED_TOKENS = frozenset({"embed", "embeds", "embedding", "embeddings",
                           "wte", "wpe"})


# --- validation ----------------------------------------------------------------

def _check_method(method: str) -> None:
  if method not in NORM_METHODS:
    raise ValueError(f"method must be one of {NORM_METHODS}; got {method!r}.")


def _check_iters(iters: Any) -> None:
  if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
    raise ValueError(f"iters must be a positive int; got {iters!r}.")


def _check_w_max(w_max: Any) -> None:
  if isinstance(w_max, bool):
    raise ValueError(f"w_max must be a positive number; got {w_max!r}.")
  if isinstance(w_max, (int, float)) and not w_max > 0:
    raise ValueError(f"w_max must be a positive number; got {w_max!r}.")


def _check_matrix(w: jax.Array) -> None:
  if w.ndim != 2:
    raise ValueError(f"w must be a 2-D matrix; got shape {w.shape}.")


# --- top singular triplet ----------------------------------------------------------

def _power_triplet(w: jax.Array, iters: int, key: jax.Array | None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``(σ_1, u_1, v_1)`` of a float32 matrix by power iteration on ``WᵀW``."""
  m, n = w.shape
  key = jax.random.PRNGKey(0) if key is None else key
  tiny = jnp.finfo(jnp.float32).tiny

  def normalise(x):
    return x / jnp.maximum(jnp.linalg.norm(x), tiny)

  # Iterate on the smaller side: v ∈ R^n for W (m x n) with n <= m.
  a = w if n <= m else w.T
  v = normalise(jax.random.normal(key, (a.shape[1],), jnp.float32))
  v = jax.lax.fori_loop(0, iters, lambda _, v: normalise(a.T @ (a @ v)), v)
  av = a @ v
  sigma = jnp.linalg.norm(av)
  u = av / jnp.maximum(sigma, tiny)
  return (sigma, u, v) if n <= m else (sigma, v, u)


def _svd_triplet(w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  u, s, vt = jnp.linalg.svd(w, full_matrices=False)
  return s[0], u[:, 0], vt[0]


def top_singular_triplet(w: jax.Array, *, method: str = "power", iters: int = 20,
                         key: jax.Array | None = None
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Largest singular value and its singular vectors.

  .. math::
    W v_1 = \sigma_1 u_1, \qquad \sigma_1 = \max_{\lVert v\rVert = 1}
    \lVert W v\rVert .

  Args:
    w: a 2-D matrix ``[m, n]`` (computed in float32).
    method: ``"power"`` (power iteration on ``WᵀW`` from a fixed random start,
      ``PRNGKey(0)`` unless ``key`` is given) or ``"svd"`` (exact).
    iters: power iterations (ignored by ``"svd"``).
    key: optional PRNG key for the start vector of ``"power"``.

  Returns:
    ``(σ_1, u_1, v_1)``: a float32 scalar, ``[m]`` and ``[n]`` unit vectors.

  Raises:
    ValueError: for a non-2-D ``w``, unknown ``method`` or ``iters < 1``.
  """
  _check_matrix(w)
  _check_method(method)
  _check_iters(iters)
  w32 = w.astype(jnp.float32)
  if method == "svd":
    return _svd_triplet(w32)
  return _power_triplet(w32, iters, key)


def spectral_norm(w: jax.Array, *, method: str = "power", iters: int = 20,
                  key: jax.Array | None = None) -> jax.Array:
  r"""Largest singular value of a matrix.

  .. math::
    \sigma_{\max}(W) = \lVert W\rVert_{2} .

  Args:
    w: a 2-D matrix.
    method: ``"power"`` (a lower bound that converges as
      ``(σ_2/σ_1)^{2·iters}``) or ``"svd"`` (exact).
    iters: power iterations.
    key: optional PRNG key for the power-iteration start vector.

  Returns:
    A float32 scalar.
  """
  return top_singular_triplet(w, method=method, iters=iters, key=key)[0]


# --- projections -------------------------------------------------------------------

def spec_normalize(w: jax.Array, w_max: float = 1.0, *, method: str = "power",
                   iters: int = 20, key: jax.Array | None = None) -> jax.Array:
  r"""Scales a matrix down so that its spectral norm is at most ``w_max``.

  .. math::
    W \leftarrow W / \max(1, \sigma_{\max}(W) / w_{\max}) .

  Args:
    w: a 2-D matrix.
    w_max: the cap (> 0).
    method: how ``σ_max`` is computed, see :func:`spectral_norm`.
    iters: power iterations.
    key: optional PRNG key for the power-iteration start vector.

  Returns:
    The projected matrix, in ``w``'s dtype (computed in float32).
  """
  _check_w_max(w_max)
  sigma = spectral_norm(w, method=method, iters=iters, key=key)
  scale = jnp.maximum(1.0, sigma / w_max)
  return (w.astype(jnp.float32) / scale).astype(w.dtype)


def hard_cap(w: jax.Array, w_max: float = 1.0) -> jax.Array:
  r"""Clips every singular value of a matrix to at most ``w_max``.

  .. math::
    W = U \operatorname{diag}(\sigma) V^\top \;\leftarrow\;
    U \operatorname{diag}(\min(\sigma, w_{\max})) V^\top .

  Implemented with an exact (thin) SVD; there is no power-iteration variant.

  Args:
    w: a 2-D matrix.
    w_max: the cap (> 0).

  Returns:
    The projected matrix, in ``w``'s dtype (computed in float32).
  """
  _check_matrix(w)
  _check_w_max(w_max)
  u, s, vt = jnp.linalg.svd(w.astype(jnp.float32), full_matrices=False)
  return ((u * jnp.minimum(s, w_max)) @ vt).astype(w.dtype)


def spec_hammer(w: jax.Array, w_max: float = 1.0, *, method: str = "power",
                iters: int = 20, key: jax.Array | None = None) -> jax.Array:
  r"""Lowers only the largest singular value to ``w_max`` when it exceeds it.

  .. math::
    W \leftarrow W - \max(\sigma_1 - w_{\max}, 0)\, u_1 v_1^\top .

  The other singular values are left as they are (exactly with
  ``method="svd"``, up to the power-iteration error otherwise), so ``σ_max``
  ends at ``max(w_max, σ_2)``: applied every step, it keeps the spectrum
  capped as long as one singular value at a time crosses the cap.

  Args:
    w: a 2-D matrix.
    w_max: the cap (> 0).
    method: how ``(σ_1, u_1, v_1)`` are computed, see
      :func:`top_singular_triplet`.
    iters: power iterations.
    key: optional PRNG key for the power-iteration start vector.

  Returns:
    The projected matrix, in ``w``'s dtype (computed in float32).
  """
  _check_w_max(w_max)
  sigma, u, v = top_singular_triplet(w, method=method, iters=iters, key=key)
  excess = jnp.maximum(sigma - w_max, 0.0)
  return (w.astype(jnp.float32) - excess * jnp.outer(u, v)).astype(w.dtype)


# --- parameter trees -----------------------------------------------------------------

def is_embedding_path(path: tuple[Any, ...]) -> bool:
  """Whether a leaf's path names an embedding table.

  A path component is split into lower-case tokens at non-alphanumeric
  characters and camel-case boundaries; the leaf is an embedding when some
  token is ``embed(s)``, ``embedding(s)``, ``wte`` or ``wpe``. Output heads
  (``lm_head``, ``unembed``) are not embeddings.

  Args:
    path: a ``jax.tree_util`` key path (or a tuple of names).

  Returns:
    A Python bool.
  """
  for entry in path:
    if layers.name_tokens(layers.key_name(entry)) & _EMBED_TOKENS:
      return True
  return False


def _projection(kind: str, w_max: float, method: str, iters: int
                ) -> Callable[[jax.Array], jax.Array]:
  if kind == "spec_normalize":
    return lambda w: spec_normalize(w, w_max, method=method, iters=iters)
  if kind == "hard_cap":
    return lambda w: hard_cap(w, w_max)
  return lambda w: spec_hammer(w, w_max, method=method, iters=iters)


def project_params(params: Any, kind: str, *, w_max: float = 1.0,
                   method: str = "power", iters: int = 20) -> Any:
  r"""Applies a spectral projection to every weight matrix of a parameter tree.

  .. math::
    W_\ell \leftarrow \Pi_{\text{kind}}(W_\ell) \quad \text{for every 2-D
    floating leaf that is not an embedding table.}

  Embedding tables (see :func:`is_embedding_path`; e.g. ``tok_embed``,
  ``pos_embed``) are lookups, not linear maps of the residual stream, and are
  left unconstrained, as are 1-D (biases, norm scales) and >2-D leaves and
  integer leaves. The output projection is constrained.

  Args:
    params: a parameter pytree (e.g. from
      :func:`ebc_optax.experiments.model.split_model`).
    kind: one of :data:`SPECTRAL_METHODS`; ``"none"`` returns ``params``.
    w_max: the cap (> 0).
    method: ``"power"`` or ``"svd"`` for ``σ_1`` in ``spec_normalize`` and
      ``spec_hammer`` (``hard_cap`` always uses the SVD).
    iters: power iterations.

  Returns:
    A pytree with the structure and dtypes of ``params``.

  Raises:
    ValueError: for an unknown ``kind`` or ``method``, ``w_max <= 0`` or
      ``iters < 1``.
  """
  if kind not in SPECTRAL_METHODS:
    raise ValueError(f"kind must be one of {SPECTRAL_METHODS}; got {kind!r}.")
  _check_w_max(w_max)
  _check_method(method)
  _check_iters(iters)
  if kind == "none":
    return params
  project = _projection(kind, w_max, method, iters)

  def leaf_fn(path, leaf):
    if (getattr(leaf, "ndim", None) == 2
        and jnp.issubdtype(leaf.dtype, jnp.floating)
        and not is_embedding_path(path)):
      return project(leaf)
    return leaf

  return jax.tree_util.tree_map_with_path(leaf_fn, params)
