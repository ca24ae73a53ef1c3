"""Reading EBC's numbers back from an optimizer state (jit-safe)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from ebc_optax import _clip
from ebc_optax import _probe
from ebc_optax import _safety
from ebc_optax import _trust_region
from ebc_optax import _wrap

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
    factor) and ``contribution`` (``s_ℓ = safety·β_ℓ·‖ΔW_ℓ‖``). With
    ``aggregate="exact"``: ``S_lin`` (last measured ``‖J ΔW‖``) and
    ``calibration`` (``‖J ΔW‖ / S_L1`` then). ``update_norm``: ``‖ΔW‖``
    of the whole incoming update at the last step. With the trust-region
    controller: ``rho_tr``, ``loss_change``, ``predicted_loss_change`` (at
    the last evaluation) and counters ``tr_accepted``, ``tr_shrunk``,
    ``tr_grown``. Under :func:`wrap`: ``notfinite_count`` (consecutive
    rejected gradients) and ``total_notfinite``. Pieces that are absent from the composition report zeros
    shaped like ``c`` (so the dict has the same keys and leading axes, e.g.
    the replica axis under ``pmap``, whatever the composition).

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
  # Shaped like the clip's own scalars: under pmap they carry a replica axis.
  zero_f = jnp.zeros_like(clip.clip_scale, jnp.float32)
  zero_i = jnp.zeros_like(clip.ebc_step, jnp.int32)
  probe = probes[0] if probes else None
  trs = _find(state, _trust_region.TrustRegionState)
  tr = trs[0] if trs else None
  guard_trips = probe.guard_state.guard_trips if probe is not None else zero_i
  wraps = _find(state, _wrap.WrapState)
  wrapped = wraps[0] if wraps else None
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
      "S_lin": clip.linear_change,
      "calibration": clip.surrogate_calibration,
      "update_norm": clip.update_norm,
      "step": clip.ebc_step,
      "clipped_steps": clip.clipped_steps,
      "guard_trips": guard_trips,
      "probe_count": probe.probe_count if probe is not None else zero_i,
      "nonfinite_skips": skips[0].nonfinite_skips if skips else zero_i,
      "rho_tr": tr.tr_ratio if tr is not None else zero_f,
      "loss_change": tr.tr_loss_change if tr is not None else zero_f,
      "predicted_loss_change": (tr.tr_predicted_change if tr is not None
                                else zero_f),
      "tr_accepted": tr.tr_accepted if tr is not None else zero_i,
      "tr_shrunk": tr.tr_shrunk if tr is not None else zero_i,
      "tr_grown": tr.tr_grown if tr is not None else zero_i,
      "notfinite_count": (wrapped.notfinite_count if wrapped is not None
                          else zero_i),
      "total_notfinite": (wrapped.total_notfinite if wrapped is not None
                          else zero_i),
  }
