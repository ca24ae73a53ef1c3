"""Argument checks shared by the factories: clear errors at construction.

Values that are tracers (e.g. hyperparameters injected by
``optax.inject_hyperparams``) cannot be checked at construction and are let
through.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax


def _concrete(value: Any) -> float | None:
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return None


def check_number(name: str, value: Any, *, lo: float | None = None,
                 hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False, integer: bool = False,
                 allow_none: bool = False) -> None:
  """Raises ``ValueError`` naming ``name`` and the accepted range."""
  if value is None and allow_none:
    return
  if isinstance(value, (str, bytes)):  # float("0.05") would parse
    raise ValueError(
        f"{name} must be a number, not a string; got {value!r}. Pass "
        f"{name}={value!s} without quotes.")
  if isinstance(value, bool) or (integer and not isinstance(value, int)
                                 and not hasattr(value, "dtype")):
    kind = "an int" if integer else "a number"
    raise ValueError(f"{name} must be {kind}; got {value!r}.")
  v = _concrete(value)
  if v is None:
    if isinstance(value, jax.core.Tracer):
      return
    raise ValueError(f"{name} must be a number; got {value!r}.")
  left = "(" if lo_open else "["
  right = ")" if hi_open else "]"
  rng = f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{right}"
  bad = not math.isfinite(v)
  if lo is not None:
    bad |= v <= lo if lo_open else v < lo
  if hi is not None:
    bad |= v >= hi if hi_open else v > hi
  if bad:
    raise ValueError(f"{name} must be in {rng}; got {value!r}.")


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {tuple(choices)}; got {value!r}.")


def check_probe_batch_size(value: Any) -> None:
  """``None`` (all rows), an int ``>= 1`` (rows) or a float in ``(0, 1]`` (a fraction)."""
  if value is None:
    return
  if isinstance(value, (jax.Array, jax.core.Tracer)) or hasattr(value, "dtype"):
    raise ValueError(
        f"probe_batch_size must be static (a Python int or float); got "
        f"{value!r}. With optax.inject_hyperparams add 'probe_batch_size' to "
        "static_args.")
  if isinstance(value, float):
    check_number("probe_batch_size", value, lo=0, hi=1, lo_open=True)
    return
  check_number("probe_batch_size", value, lo=1, integer=True)
