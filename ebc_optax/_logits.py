"""Logit-space quantities: the check of ``logits_fn``'s output.

The equations — centering, norms, KL and the trust radius — live in
:mod:`ebc_optax.formulas`; their names stay importable from here until
``ebc_optax/__init__`` imports them from there.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp



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
