"""Reading EBC's numbers back from an optimizer state (jit-safe).

Every number is derived from a state field; the README's *Telemetry* table
names the field behind each key. Two rules keep a zero from posing as a
measurement:

* a key whose piece is not in the composition is **absent** (no probe: no
  ``applied_kl``; no trust-region controller: no ``rho_tr``; not under
  :func:`~ebc_optax.wrap`: no ``notfinite_count``);
* a quantity not measured yet is **NaN**: the per-step numbers before the
  first update, the probe's before the first probe, ``β`` of a layer never
  measured (its ``contribution`` is what entered ``S``: 0 for a zero
  update; NaN while no layer has been measured yet, which with
  ``aggregate="exact"`` every step is always), ``ρ`` when the surrogate
  promised no change (``c·S = 0``: no denominator).
"""

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


def _one(state: Any, kind: type) -> Any:
  found = _find(state, kind)
  return found[0] if found else None


def _when(cond: jax.Array, x: jax.Array) -> jax.Array:
  """``x`` where ``cond``, else NaN (float32; broadcast over ``x``'s shape)."""
  x = jnp.asarray(x, jnp.float32)
  cond = jnp.reshape(cond, jnp.shape(cond) + (1,) * (x.ndim - jnp.ndim(cond)))
  return jnp.where(cond, x, jnp.nan)


def telemetry(state: Any) -> dict[str, jax.Array]:
  """EBC's numbers, found anywhere inside an optimizer state.

  Works on the state of ``ellipsotope_budget_clip`` itself or of any chain /
  wrapper holding it (``optax.chain``, ``optax.inject_hyperparams``,
  ``optax.MultiSteps``, ``optax.apply_if_finite``, ``schedule_free``, ...).
  Pure and jit-safe: it only reads arrays (under ``pmap`` they keep the
  replica axis).

  Returns:
    A dict of arrays; see the module doc for absent keys and NaN.

    * The last step (``BudgetClipState``): ``c``, ``S``, ``tau``, ``delta``
      (the KL target used), ``guard_factor`` (the factor on ``τ`` used; so
      ``tau = sqrt(4·delta)·guard_factor``), ``update_norm``; per layer
      ``[L]`` in :func:`budget_layers` order ``beta`` (smoothed ``β_ℓ``
      before ``safety``) and ``contribution`` (``s_ℓ``); counters ``step``,
      ``clipped_steps``. With ``aggregate="exact"``: ``S_lin`` (last
      ``‖J ΔW‖``) and ``calibration``.
    * The probe (``KLProbeState``): ``applied_kl``, ``applied_change`` (``T``)
      and ``rho`` (``T / (c·S)``) at the last probe, ``probe_count``; with the
      guard ``guard_trips``.
    * ``nonfinite_skips`` (``skip_nonfinite``); ``rho_tr``, ``loss_change``,
      ``predicted_loss_change``, ``tr_accepted``, ``tr_shrunk``,
      ``tr_grown`` (trust-region controller); ``notfinite_count``,
      ``total_notfinite`` (:func:`wrap`).

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
  stepped = clip.ebc_step > 0
  measured = clip.sensitivity.beta_measured
  out = {
      "c": _when(stepped, clip.clip_scale),
      "S": _when(stepped, clip.surrogate),
      "tau": _when(stepped, clip.trust_radius),
      "delta": _when(stepped, clip.kl_target),
      "guard_factor": _when(stepped, clip.radius_factor),
      "update_norm": _when(stepped, clip.update_norm),
      "beta": _when(measured, clip.sensitivity.layer_beta),
      # What entered S (0 for a layer whose update was zero); NaN while no
      # layer has been measured (always with aggregate="exact" every step).
      "contribution": _when(jnp.logical_and(stepped, jnp.any(measured, -1)),
                            clip.layer_contribution),
      "step": clip.ebc_step,
      "clipped_steps": clip.clipped_steps,
  }
  if clip.linear_change is not None:
    out["S_lin"] = _when(stepped, clip.linear_change)
    out["calibration"] = _when(stepped, clip.surrogate_calibration)
  probe = _one(state, _probe.KLProbeState)
  if probe is not None:
    probed = probe.probe_count > 0
    promised = probe.predicted_change
    out["applied_kl"] = _when(probed, probe.applied_kl)
    out["applied_change"] = _when(probed, probe.applied_change)
    out["rho"] = _when(jnp.logical_and(probed, promised > 0),
                       probe.applied_change / jnp.where(promised > 0, promised, 1.0))
    out["probe_count"] = probe.probe_count
    if probe.guard_state is not None:
      out["guard_trips"] = probe.guard_state.guard_trips
  skip = _one(state, _safety.NonFiniteSkipState)
  if skip is not None:
    out["nonfinite_skips"] = skip.nonfinite_skips
  tr = _one(state, _trust_region.TrustRegionState)
  if tr is not None:
    evaluated = (tr.tr_accepted + tr.tr_shrunk + tr.tr_grown) > 0
    out["rho_tr"] = _when(evaluated, tr.tr_ratio)
    out["loss_change"] = _when(evaluated, tr.tr_loss_change)
    out["predicted_loss_change"] = _when(evaluated, tr.tr_predicted_change)
    out.update(tr_accepted=tr.tr_accepted, tr_shrunk=tr.tr_shrunk,
               tr_grown=tr.tr_grown)
  wrapped = _one(state, _wrap.WrapState)
  if wrapped is not None:
    out["notfinite_count"] = wrapped.notfinite_count
    out["total_notfinite"] = wrapped.total_notfinite
  return out
