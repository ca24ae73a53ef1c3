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
from ebc_optax import _relative
from ebc_optax import _safety
from ebc_optax import _trust_region
from ebc_optax import _wrap
from ebc_optax import formulas


def _is_variable(x: Any) -> bool:
  """A Flax NNX ``Variable`` box (``nnx.Optimizer`` keeps its optimizer state
  in ``OptArray`` boxes), recognised without importing Flax."""
  return (type(x).__module__.startswith("flax.")
          and callable(getattr(x, "get_value", None)))


def unbox(state: Any) -> Any:
  """``state`` with every Flax NNX ``Variable`` box replaced by its value, so
  ``nnx.Optimizer(...).opt_state`` reads like the plain optax state.

  Example:
    >>> import jax.numpy as jnp
    >>> unbox({"a": jnp.ones(2)})["a"].shape
    (2,)
  """
  return jax.tree.map(lambda x: x.get_value() if _is_variable(x) else x,
                      state, is_leaf=_is_variable)


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
  ``optax.MultiSteps``, ``optax.apply_if_finite``, ``schedule_free``, ...),
  and on ``nnx.Optimizer(...).opt_state`` (its ``OptArray`` boxes are read
  through).
  Pure and jit-safe: it only reads arrays (under ``pmap`` they keep the
  replica axis).

  Returns:
    A dict of arrays; see the module doc for absent keys and NaN.

    * The last step (``BudgetClipState``): ``c``, ``S``, ``tau``, ``delta``
      (the KL target used), ``guard_factor`` (the factor on ``τ`` used; so
      ``tau = sqrt(4·delta)·guard_factor``), ``update_norm``; per layer
      ``[L]`` in :func:`budget_layers` order ``beta`` (smoothed ``β_ℓ``
      before ``safety``) and ``contribution`` (``s_ℓ``); counters ``step``,
      ``clipped_steps``; ``beta_refreshed``, the layers whose ``β`` the
      step measured. With ``aggregate="exact"``: ``S_lin`` (last
      ``‖J ΔW‖``) and ``calibration``.
    * The probe (``KLProbeState``): ``applied_kl``, ``applied_change`` (``T``),
      ``budgeted_change`` (``T_b``, the budgeted leaves' share) and ``rho``
      (``T_b / (c·S)``) at the last probe, ``probe_count``, ``probed``
      (whether the last step probed); with the guard
      ``guard_trips``.
    * The relative radius (``RelativeRadiusState``): ``outliers`` (steps
      judged beyond the trend, in all) and ``outlier_run`` (consecutive, up
      to the last step).
    * ``nonfinite_skips`` (``skip_nonfinite``); ``rho_tr``, ``loss_change``,
      ``predicted_loss_change``, ``tr_accepted``, ``tr_shrunk``,
      ``tr_grown`` (trust-region controller); ``notfinite_count``,
      ``total_notfinite``, ``refused_count``, ``total_refused``,
      ``grad_outliers``, ``grad_outlier_run``, ``loss_outliers``,
      ``loss_outlier_run`` (:func:`wrap`; the last four with its gradient
      and loss checks).

  Raises:
    ValueError: when the state holds no EBC state, or more than one (pass the
      sub-state you mean).
  """
  state = unbox(state)
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
      # What ran at the last step (ebc_optax.cadence planned it).
      "beta_refreshed": clip.sensitivity.beta_refreshed,
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
    out["budgeted_change"] = _when(probed, probe.budgeted_change)
    out["rho"] = _when(jnp.logical_and(probed, promised > 0),
                       formulas.guard_ratio(probe.budgeted_change, 1.0,
                                            promised, 0.0))
    out["probe_count"] = probe.probe_count
    out["probed"] = probe.probed
    if probe.guard_state is not None:
      out["guard_trips"] = probe.guard_state.guard_trips
  rel = _one(state, _relative.RelativeRadiusState)
  if rel is not None:
    out["outliers"] = rel.outliers
    out["outlier_run"] = rel.outlier_run
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
    out["refused_count"] = wrapped.refused_count
    out["total_refused"] = wrapped.total_refused
    if wrapped.grad_state is not None:
      out["grad_outliers"] = wrapped.grad_state.outliers
      out["grad_outlier_run"] = wrapped.grad_state.outlier_run
    if wrapped.loss_state is not None:
      out["loss_outliers"] = wrapped.loss_state.outliers
      out["loss_outlier_run"] = wrapped.loss_state.outlier_run
  return out
