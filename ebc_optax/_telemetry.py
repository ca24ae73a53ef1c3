"""Reading EBC's numbers back from an optimizer state (jit-safe)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ebc_optax import _clip
from ebc_optax import _guard
from ebc_optax import _probe
from ebc_optax import _safety

def _find(state: Any, kind: type) -> list[Any]:
  leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, kind))
  return [x for x in leaves if isinstance(x, kind)]


def telemetry(state: Any) -> dict[str, jax.Array]:
  """EBC's numbers, found anywhere inside an optimizer state.

  Works on the state of ``ellipsotope_budget_clip`` itself or of any chain /
  wrapper holding it (``optax.chain``, ``optax.inject_hyperparams``,
  ``optax.MultiSteps``, ``optax.apply_if_finite``, ...). Pure and jit-safe:
  it only reads arrays.

  Returns:
    A dict of arrays. Scalars: ``c`` (scale applied at the last step), ``S``
    (surrogate, per-token), ``tau`` (trust radius used, per-token), ``delta``
    (KL target in use for the next step, nats/token), ``guard_factor``
    (``τ``'s shrink factor for the next step), ``applied_kl`` and
    ``applied_change`` (``T``) and ``rho`` (guard ratio) at the last probe,
    counters ``step``, ``clipped_steps``, ``guard_trips``, ``probe_count``,
    ``nonfinite_skips``. Per layer (``[L]``, in the order of
    :func:`budget_layers`): ``beta`` (smoothed ``β_ℓ`` before the safety
    factor) and ``contribution`` (``s_ℓ = safety·β_ℓ·‖ΔW_ℓ‖``). Pieces that
    are absent from the composition report zeros.

  Raises:
    ValueError: when the state holds no EBC state, or more than one (pass the
      sub-state you mean).
  """
  clips = _find(state, _clip.BudgetClipState)
  if not clips:
    raise ValueError("telemetry: no EBC state (BudgetClipState) found in the "
                     "given optimizer state.")
  if len(clips) > 1:
    raise ValueError(f"telemetry: found {len(clips)} EBC states; pass the "
                     "sub-state of the one you want.")
  clip = clips[0]
  probes = _find(state, _probe.KLProbeState)
  skips = _find(state, _safety.NonFiniteSkipState)
  zero_f = jnp.zeros([], jnp.float32)
  zero_i = jnp.zeros([], jnp.int32)
  probe = probes[0] if probes else None
  guard = probe.guard_state if probe is not None else _guard.init_guard_state()
  return {
      "c": clip.clip_scale,
      "S": clip.surrogate,
      "tau": clip.trust_radius,
      "delta": clip.kl_target,
      "guard_factor": clip.radius_factor,
      "applied_kl": probe.applied_kl if probe is not None else zero_f,
      "applied_change": probe.applied_change if probe is not None else zero_f,
      "rho": probe.guard_ratio if probe is not None else zero_f,
      "beta": clip.sensitivity.layer_beta,
      "contribution": clip.layer_contribution,
      "step": clip.ebc_step,
      "clipped_steps": clip.clipped_steps,
      "guard_trips": guard.guard_trips,
      "probe_count": probe.probe_count if probe is not None else zero_i,
      "nonfinite_skips": skips[0].nonfinite_skips if skips else zero_i,
  }
