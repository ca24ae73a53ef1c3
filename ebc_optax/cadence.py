"""When EBC measures: the β refresh, full-sweep and probe schedule.

Pure integer code, the one home of the schedule: the transform calls it under
``jit`` (a step or an interval may then be a tracer, e.g. under
``optax.inject_hyperparams``), the harness to log what ran, the benchmarks to
pick which steps to time. On EBC's own step counter ``t`` (0-based):

* a **full sweep** (β of every budgeted layer) when ``t % sweep_every == 0``
  with ``sweep_every = sweep_interval(full_sweep_every, L) > 0`` — and, in the
  transform, on any step where an active layer has no β yet;
* otherwise a **round-robin refresh** of ``probe_layers`` layers when
  ``t % update_every == 0``;
* a **probe** of the applied change when ``probe_every > 0`` and
  ``t % probe_every == 0``;
* every other step is **plain**: no tangent pass, no probe.

The predicates take Python ints or arrays and return a bool of the same
kind.

Example:
  >>> sweep_interval("auto", 3), sweep_interval("auto", 32)
  (200, 800)
  >>> [step_kind(t, update_every=20, probe_every=20, sweep_every=200)
  ...  for t in (200, 220, 221)]
  ['sweep+probe', 'refresh+probe', 'plain']
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ("SWEEP_EVERY", "SWEEP_LAYERS", "is_probe", "is_refresh", "is_sweep",
           "kinds_in_interval", "measures", "step_kind", "sweep_interval")

#: full_sweep_every="auto": a full sweep every SWEEP_EVERY steps per
#: SWEEP_LAYERS budgeted layers, so its amortised cost does not grow with depth.
SWEEP_EVERY = 200
SWEEP_LAYERS = 8


def sweep_interval(full_sweep_every: int | str | None,
                   num_layers: int) -> Any:
  """Steps between full β sweeps for ``num_layers`` budgeted layers.

  ``"auto"`` is ``200 · ⌈L / 8⌉``: every 200 steps up to 8 layers and
  proportionally less often beyond, so a sweep (one tangent pass per layer)
  costs the same share of training at 64 blocks as at 8
  (``benchmarks/RESULTS.md``: at 32 blocks a sweep is ≈ 4.4 Adam steps).
  Between sweeps the round-robin refresh still visits every layer every
  ``update_every · ⌈L / k⌉`` steps. An int (or None/0: no periodic sweep) is
  used as given.

  Example:
    >>> sweep_interval("auto", 9), sweep_interval(50, 32), sweep_interval(None, 8)
    (400, 50, None)
  """
  if isinstance(full_sweep_every, str):
    return SWEEP_EVERY * max(1, -(-num_layers // SWEEP_LAYERS))
  return full_sweep_every


def _every(step: Any, interval: Any) -> Any:
  """``interval > 0 and step % interval == 0``, for ints or arrays."""
  if not isinstance(step, jax.Array) and not isinstance(interval, jax.Array):
    interval = int(interval)  # a host step (int, numpy): a Python bool
    return interval > 0 and int(step) % interval == 0
  interval = jnp.asarray(interval, jnp.int32)
  return jnp.logical_and(interval > 0,
                         jnp.asarray(step, jnp.int32) % jnp.maximum(interval, 1)
                         == 0)


def is_sweep(step: Any, sweep_every: Any) -> Any:
  """Whether step ``step`` is a periodic full sweep (``sweep_every`` from
  :func:`sweep_interval`; None or 0: never).

  Example:
    >>> is_sweep(400, 200), is_sweep(401, 200), is_sweep(0, None)
    (True, False, False)
  """
  return False if sweep_every is None else _every(step, sweep_every)


def is_refresh(step: Any, update_every: Any) -> Any:
  """Whether step ``step`` refreshes β round-robin (``update_every >= 1``).

  Example:
    >>> is_refresh(40, 20), is_refresh(41, 20)
    (True, False)
  """
  return _every(step, update_every)


def is_probe(step: Any, probe_every: Any) -> Any:
  """Whether step ``step`` probes the applied change (``probe_every`` 0:
  never).

  Example:
    >>> is_probe(60, 20), is_probe(60, 0)
    (True, False)
  """
  return _every(step, probe_every)


def step_kind(step: int, *, update_every: int, probe_every: int,
              sweep_every: int | None) -> str:
  """What the step measures: ``"plain"``, or ``"sweep"`` / ``"refresh"``,
  with ``"+probe"`` on a probe step (``"probe"`` alone without a β
  measurement). Python ints only (the harness and the benchmarks)."""
  beta = ("sweep" if is_sweep(step, sweep_every) else
          "refresh" if is_refresh(step, update_every) else "")
  probe = bool(is_probe(step, probe_every))
  if beta and probe:
    return f"{beta}+probe"
  return beta or ("probe" if probe else "plain")


def measures(step: int, *, update_every: int, probe_every: int,
             sweep_every: int | None) -> bool:
  """Whether the step runs any measurement (not plain)."""
  return step_kind(step, update_every=update_every, probe_every=probe_every,
                   sweep_every=sweep_every) != "plain"


def kinds_in_interval(sweep_every: int, *, update_every: int,
                      probe_every: int) -> dict[str, tuple[int, int]]:
  """Per kind of step, its first step and how many of them one sweep
  interval ``(sweep_every, 2·sweep_every]`` holds (after the start-up).

  Example:
    >>> kinds_in_interval(200, update_every=20, probe_every=20)
    {'plain': (201, 190), 'refresh+probe': (220, 9), 'sweep+probe': (400, 1)}
  """
  out: dict[str, tuple[int, int]] = {}
  for t in range(sweep_every + 1, 2 * sweep_every + 1):
    kind = step_kind(t, update_every=update_every, probe_every=probe_every,
                     sweep_every=sweep_every)
    first, count = out.get(kind, (t, 0))
    out[kind] = (first, count + 1)
  return out
