"""Logit-space quantities: centering, norms, KL, and the trust radius.

Every norm is *per token*: a sum over tokens divided by the token count (and
all-reduced over ``axis_name`` when given), so a number does not depend on the
batch size. ``τ = sqrt(4 δ)`` on these per-token RMS norms is the seeds'
``τ = sqrt(4·B·δ)`` on a batch of ``B`` tokens, divided by ``sqrt(B)``.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp

AxisName = Hashable | None
KL_METRICS = ("bound", "fisher")


def check_logits(logits: Any, who: str = "logits_fn", batch: Any = None) -> None:
  """Raises a clear error unless ``logits`` has shape ``[tokens..., vocab]``.

  ``logits`` is ``logits_fn``'s output (an array or its ``jax.eval_shape``).
  A tuple, dict or model-output object is named as such (return the logits
  array itself, e.g. ``out.logits`` or ``out[0]``). With ``batch``, an output
  whose shape is that of an integer leaf of the batch (tokens ``[B, T]`` in,
  ``[B, T]`` out) is an error too: it has no vocab axis.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> check_logits(jax.ShapeDtypeStruct((2, 3, 5), jnp.float32))
    >>> check_logits((jnp.zeros((2, 5)), jnp.zeros(())))
    Traceback (most recent call last):
    ...
    ValueError: logits_fn(params, batch) must return the logits array ...
  """
  shape = getattr(logits, "shape", None)
  if shape is None:
    kind = type(logits).__name__
    size = f" of {len(logits)} items" if hasattr(logits, "__len__") else ""
    hint = (" (a model output: return its .logits)"
            if hasattr(logits, "logits") else "")
    raise ValueError(
        f"{who}(params, batch) must return the logits array [..., vocab]; got "
        f"a {kind}{size}{hint}. Return the logits themselves, e.g. "
        "`out.logits` or `out[0]`.")
  if len(shape) < 2:
    raise ValueError(
        f"{who}(params, batch) must return logits of shape [..., vocab] with at "
        f"least one leading token axis and a vocab axis; got shape {shape}. "
        "For a single example add a leading axis.")
  if shape[-1] < 2:
    raise ValueError(
        f"{who} returned a vocab axis of size {shape[-1]}; it must be >= 2.")
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(f"{who} must return floating-point logits; got {logits.dtype}.")
  tokens = [tuple(x.shape) for x in jax.tree.leaves(batch)
            if hasattr(x, "shape") and hasattr(x, "dtype")
            and jnp.issubdtype(x.dtype, jnp.integer) and len(x.shape) >= 2]
  if tuple(shape) in tokens:
    raise ValueError(
        f"{who}(params, batch) returned shape {tuple(shape)}, the shape of the "
        "batch's integer tokens: the vocab axis is missing (per-token "
        "losses or token ids instead of logits?). Return logits of shape "
        f"{tuple(shape) + ('vocab',)}.")


def token_count(logits: jax.Array) -> int:
  """Number of tokens: the product of all axes but the last (vocab) one."""
  n = 1
  for d in logits.shape[:-1]:
    n *= d
  return n


def center_per_token(x: jax.Array) -> jax.Array:
  """Removes the per-token mean over the vocab axis: ``x - mean(x, -1)``.

  Softmax is invariant to adding a constant to a token's logits, so this is the
  component of a logit change that can change the predictions.
  """
  return x - jnp.mean(x, axis=-1, keepdims=True)


def logit_change_sq_sum(dz: jax.Array, center: bool = True) -> jax.Array:
  """``Σ_t ‖center(dz_t)‖²`` in float32 (no per-token normalisation)."""
  dz = dz.astype(jnp.float32)
  if center:
    dz = center_per_token(dz)
  return jnp.sum(jnp.square(dz))


def fisher_sq_sum(z: jax.Array, dz: jax.Array) -> jax.Array:
  """``Σ_t 2·Var_{p_t}(dz_t)`` in float32, ``p_t = softmax(z_t)``.

  ``½·Var_p(dz)`` is the exact second-order term of ``KL(p(z) ‖ p(z + dz))``
  (``dzᵀ(diag p − ppᵀ)dz / 2``), so ``¼`` of this sum is the quadratic KL of
  the whole batch, in the same units as :func:`logit_change_sq_sum` (whose
  ``¼`` is the softmax bound ``KL ≤ ¼‖center(dz)‖²``). Invariant to adding a
  constant per token, so no centering is needed.
  """
  p = jax.nn.softmax(z.astype(jnp.float32), axis=-1)
  dz = dz.astype(jnp.float32)
  mean = jnp.sum(p * dz, axis=-1, keepdims=True)
  return 2.0 * jnp.sum(p * jnp.square(dz - mean))


def change_sq_sum(dz: jax.Array, z: jax.Array | None = None, *,
                  kl: str = "bound", center: bool = True) -> jax.Array:
  """Squared size of a logit change in the metric of the ``kl`` mode.

  ``kl="bound"``: ``Σ_t ‖center(dz_t)‖²`` (the seeds' metric; ``¼`` of it
  bounds the KL). ``kl="fisher"``: :func:`fisher_sq_sum` at logits ``z`` (``¼``
  of it is the KL to second order). Either way a per-token RMS ``r`` of this
  size predicts a KL of ``r²/4`` nats/token, so ``τ = sqrt(4δ)`` serves both.
  """
  if kl == "fisher":
    if z is None:
      raise ValueError("kl='fisher' needs the logits z at which p is taken.")
    return fisher_sq_sum(z, dz)
  return logit_change_sq_sum(dz, center)


def _psum(x: jax.Array, axis_name: AxisName) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def per_token_rms_norm(dz: jax.Array, center: bool = True,
                       axis_name: AxisName = None) -> jax.Array:
  """``sqrt(Σ_t ‖center(dz_t)‖² / N)`` over all tokens of all replicas.

  Example:
    >>> import jax.numpy as jnp
    >>> float(per_token_rms_norm(jnp.array([[1., -1.], [2., -2.]])))  # sqrt(10/2)
    2.236...
  """
  return per_token_change_norm(dz, center=center, axis_name=axis_name)


def per_token_change_norm(dz: jax.Array, z: jax.Array | None = None, *,
                          kl: str = "bound", center: bool = True,
                          axis_name: AxisName = None) -> jax.Array:
  """Per-token RMS size of ``dz`` in the ``kl`` metric (see :func:`change_sq_sum`)."""
  sq = _psum(change_sq_sum(dz, z, kl=kl, center=center), axis_name)
  n = _psum(jnp.asarray(token_count(dz), jnp.float32), axis_name)
  return jnp.sqrt(sq / n)


def fisher_kl(z: jax.Array, dz: jax.Array,
              axis_name: AxisName = None) -> jax.Array:
  """Quadratic (Fisher) per-token KL ``mean_t ½·Var_{p_t}(dz_t)``, nats/token.

  The second-order expansion of ``KL(p(z) ‖ p(z + dz))``: exact as ``dz → 0``.

  Example:
    >>> import jax.numpy as jnp
    >>> round(float(fisher_kl(jnp.zeros((1, 2)), jnp.array([[1., -1.]]))), 6)
    0.5
  """
  return 0.25 * jnp.square(per_token_change_norm(dz, z, kl="fisher",
                                                 axis_name=axis_name))


def softmax_kl_sum(z: jax.Array, z_new: jax.Array) -> jax.Array:
  """``Σ_t KL(softmax(z_t) ‖ softmax(z_new_t))`` in float32, exact."""
  logp = jax.nn.log_softmax(z.astype(jnp.float32), axis=-1)
  logq = jax.nn.log_softmax(z_new.astype(jnp.float32), axis=-1)
  kl = jnp.sum(jnp.exp(logp) * (logp - logq), axis=-1)
  # KL is >= 0; rounding can give tiny negatives when z_new ≈ z.
  return jnp.sum(jnp.maximum(kl, 0.0))


def per_token_kl(z: jax.Array, z_new: jax.Array,
                 axis_name: AxisName = None) -> jax.Array:
  """Mean per-token ``KL(p(z) ‖ p(z_new))`` in nats/token, over all replicas.

  Example:
    >>> import jax.numpy as jnp
    >>> float(per_token_kl(jnp.zeros((3, 4)), jnp.zeros((3, 4))))
    0.0
  """
  total = _psum(softmax_kl_sum(z, z_new), axis_name)
  n = _psum(jnp.asarray(token_count(z), jnp.float32), axis_name)
  return total / n


def trust_radius(kl_target: jax.Array) -> jax.Array:
  """Per-token logit radius ``τ = sqrt(4 δ)`` from a KL target ``δ`` (nats/token).

  Uses ``KL(p(z) ‖ p(z + dz)) ≲ ¼ ‖center(dz)‖²`` (the softmax Fisher has
  spectral norm ≤ ½), so an RMS per-token centered change of ``τ`` keeps the
  mean KL at most ``δ`` to second order.

  Example:
    >>> float(trust_radius(0.25))
    1.0
  """
  return jnp.sqrt(4.0 * jnp.asarray(kl_target, jnp.float32))
