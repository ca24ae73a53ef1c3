"""Which rows of ``batch`` the logit-space measurements use (the probe rows).

β, ``‖J ΔW‖`` and the applied-KL probe are per-token averages, so a subset of
the batch's rows estimates them. The rule, in full:

* **Which leaves carry rows.** The batch has ``R`` rows, ``R`` being the
  leading size of ``logits_fn(params, batch)`` (every leading axis of the
  logits is a token axis, the first one the rows). A leaf of ``batch`` carries
  rows when its leading size is ``R``; every other leaf — a ``[T]`` table, a
  ``[T, T]`` mask, a scalar — is passed whole. A leaf that has ``R`` leading
  entries by coincidence (a ``[T, T]`` mask with ``T == R``) cannot be told
  from a row leaf by its shape: pass ``probe_batch_fn`` for such batches.
* **Which rows.** Every ``s``-th row from the first: ``x[::s]``, with the
  stride ``s = round(1/f)`` for a fraction ``f`` (0.25 -> every 4th row; so
  0.4 takes every 2nd row and any ``f > 2/3`` every row) and
  ``s = R // n`` for a count ``n`` (then the first ``n`` of them). A strided
  subset takes rows from every part of the batch, so it is the same subset on
  one device, under sharded ``jax.jit`` (where ``x[::s]`` is taken from the
  global batch, so every host contributes) and under ``pmap`` /
  ``shard_map`` (where each replica takes every ``s``-th of its own rows —
  the same rows of the global batch whenever ``s`` divides the rows per
  replica). The first rows only, as before, would probe the first host's data.
* **Override.** ``probe_batch_fn(batch) -> probe batch`` replaces the rule
  (e.g. ``lambda b: {**b, "tokens": b["tokens"][::4]}``).

When no leaf of ``batch`` has the logits' leading size (e.g. logits
flattened to ``[B·T, V]``), nothing can be sliced: the measurements use the
whole batch and a warning says so.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import jax

from ebc_optax import _logits

ProbeBatchSize = int | float | None
ProbeBatchFn = Callable[[Any], Any]


def probe_stride(probe_batch_size: ProbeBatchSize, rows: int) -> tuple[int, int]:
  """``(stride, count)`` of the probe rows out of ``rows``.

  ``None``: every row; a float ``f`` in ``(0, 1]``: stride ``round(1/f)``
  (at least 1), all ``ceil(rows/stride)`` strided rows; an int ``n <= rows``:
  stride ``rows // n``, the first ``n`` strided rows.

  Example:
    >>> probe_stride(0.25, 16), probe_stride(4, 16), probe_stride(None, 16)
    ((4, 4), (4, 4), (1, 16))
  """
  if probe_batch_size is None:
    return 1, rows
  if isinstance(probe_batch_size, float):
    stride = max(1, round(1.0 / probe_batch_size))
    return stride, math.ceil(rows / stride)
  if probe_batch_size > rows:
    raise ValueError(
        f"probe_batch_size={probe_batch_size} exceeds the batch's {rows} rows "
        f"(the leading size of the logits); it must be in [1, {rows}] (or a "
        "fraction in (0, 1]).")
  return max(1, rows // probe_batch_size), probe_batch_size


def take_rows(batch: Any, rows: int, stride: int, count: int) -> Any:
  """Every ``stride``-th of the first ``stride·count`` rows of the leaves of
  ``batch`` whose leading size is ``rows``; other leaves whole."""
  def take(x):
    shape = getattr(x, "shape", ())
    if not shape or shape[0] != rows:
      return x
    return x[::stride][:count]
  return jax.tree.map(take, batch)


def carries_rows(batch: Any, rows: int) -> bool:
  return any(getattr(x, "shape", ())[:1] == (rows,)
             for x in jax.tree.leaves(batch))


def probe_batch(logits_fn: Callable[[Any, Any], jax.Array], params: Any,
                batch: Any, probe_batch_size: ProbeBatchSize,
                probe_batch_fn: ProbeBatchFn | None = None) -> Any:
  """The probe rows of ``batch`` (see the module doc); static shapes only.

  Raises:
    ValueError: when the sliced batch does not give logits with the expected
      rows (a leaf was sliced that does not carry rows, or the other way
      round), naming the rule and the override.
  """
  if probe_batch_fn is not None:
    return probe_batch_fn(batch)
  if probe_batch_size is None:
    return batch
  if isinstance(probe_batch_size, jax.core.Tracer):
    raise ValueError(
        "probe_batch_size must be static (an int or a float); with "
        "optax.inject_hyperparams list it in static_args.")
  logits = jax.eval_shape(logits_fn, params, batch)
  _logits.check_logits(logits, batch=batch)
  rows = logits.shape[0]
  stride, count = probe_stride(probe_batch_size, rows)
  if count == rows:
    return batch
  if not carries_rows(batch, rows):
    warnings.warn(
        f"probe_batch_size={probe_batch_size!r} has no effect: no leaf of "
        f"batch has the logits' leading size {rows}, so the probes use the "
        "whole batch. Pass probe_batch_fn=(batch -> probe batch) to choose "
        "the rows.", stacklevel=4)
    return batch
  sub = take_rows(batch, rows, stride, count)
  shapes = jax.tree.map(lambda x: getattr(x, "shape", ()), batch)
  try:
    got = jax.eval_shape(logits_fn, params, sub).shape[0]
  except Exception as e:  # re-raised with the rule and the override
    raise ValueError(
        f"probe_batch_size={probe_batch_size!r}: every leaf of batch with the "
        f"logits' leading size {rows} was cut to every {stride}-th row, and "
        f"logits_fn failed on the result ({type(e).__name__}: {e}). Batch "
        f"leaf shapes: {shapes}. A leaf whose leading size is {rows} but "
        "which does not hold rows (a mask or table) must be passed whole: "
        "give probe_batch_fn=(batch -> probe batch), or "
        "probe_batch_size=None.") from e
  if got != count:
    raise ValueError(
        f"probe_batch_size={probe_batch_size!r}: the probe rows should give "
        f"logits with {count} rows, got {got}. Batch leaf shapes: {shapes}. "
        "Give probe_batch_fn=(batch -> probe batch), or probe_batch_size=None.")
  return sub
