"""Every equation of the method, each a small pure function: arrays in, arrays out.

This module is the one home of EBC's math. The transformations
(:func:`~ebc_optax.advanced.budget_clip`, :func:`~ebc_optax.advanced.kl_probe`, the
controllers, ...) only wire these functions to the layers of a pytree and to
their states: they plan what to measure, measure it, call a formula and
record the result. No function here holds state, reads a configuration or
closes over one; each takes and returns arrays (float32 unless said).

Units: every logit-space size is *per token*, a sum over tokens divided by
their count (all-reduced over ``axis_name`` where a function takes one), so
no number depends on the batch size: ``τ = sqrt(4δ)`` on these per-token
RMS norms is the reference recipe's ``τ = sqrt(4·B·δ)`` on a batch of ``B``
tokens, divided by ``sqrt(B)``. ``S`` is the surrogate bound on the change of
the centered logits, ``τ`` the trust radius, ``c`` the scale of the step, ``δ``
the KL target (nats/token), ``T`` a measured change.

.. rubric:: Formula map

Each equation, the function of this module that computes it, and where the
package uses it (``_clip.budget_clip`` is ``ebc_optax._clip``'s function
``budget_clip``; "public API": exported for users, not called inside).

============================== ===================== =========================================
equation                       function              used in
============================== ===================== =========================================
``N = Π shape[:-1]``           token_count           ``formulas.per_token_change_norm``,
                                                     ``_sensitivity._measure_beta``
``center(x) = x − mean_v(x)``  center_per_token      ``formulas.logit_change_sq_sum``
``Σ_t ‖center(dz_t)‖²``        logit_change_sq_sum   ``formulas.change_sq_sum``
``Σ_t 2·Var_{p_t}(dz_t)``      fisher_sq_sum         ``formulas.change_sq_sum``
``q`` in the ``kl`` metric     change_sq_sum         ``_sensitivity._measure_beta``,
                                                     ``formulas.per_token_change_norm``
``sqrt(q / N)`` over replicas  per_token_change_norm ``_sensitivity.sensitivity_estimator``,
                                                     ``_probe._change_and_kl``
``sqrt(Σ‖center(dz)‖² / N)``   per_token_rms_norm    public API
``mean_t ½·Var_{p_t}(dz_t)``   fisher_kl             public API
``Σ_t KL(p(z_t)‖p(z'_t))``     softmax_kl_sum        ``formulas.per_token_kl``
``mean_t KL(p(z_t)‖p(z'_t))``  per_token_kl          ``_probe._change_and_kl``
``τ = sqrt(4δ)``               trust_radius          ``_clip.budget_clip``,
                                                     ``formulas.guarded_radius``
``τ = sqrt(4δ)·g``             guarded_radius        ``_clip.budget_clip``
``s_ℓ = β_ℓ ‖ΔW_ℓ‖``           layer_contributions   ``_clip.budget_clip``
``S = Σ_ℓ s_ℓ`` or ``√L·‖s‖₂`` budget_surrogate      ``_clip.budget_clip``
``c = min(1, τ / max(S, ε))``  clip_scale            ``_clip.budget_clip``,
                                                     ``formulas.probe_clip_scale``
``k = ‖J ΔW‖ / max(S_L1, ε)``  exact_calibration     ``_clip.budget_clip``
``S = k·S_L1``                 calibrated_surrogate  ``_clip.budget_clip``
``1 / max(‖ΔW‖, tiny)``        unit_scale            ``_sensitivity.sensitivity_estimator``
``ε = h·max(rms(W_ℓ), 0.01)``  fd_epsilon            ``_sensitivity._fd_steps``,
                                                     ``_sensitivity.directional_logit_change``
``(f(W+εU) − f(W−εU)) / 2ε``   central_difference    ``_sensitivity._central_difference``
``β_ℓ = sqrt(q / N)``          beta_estimate         ``_sensitivity._measure_beta``
Huber-clipped EMA of ``β_ℓ``   robust_ema            ``_sensitivity._record_beta``
``c``; if ``c = 0``: at ``τ``  probe_clip_scale      ``_probe.kl_probe``
``c·S`` (0 when ``<= ε``)      promised_change       ``_probe.kl_probe``
``ρ = T / (c·S)``              guard_ratio           ``_probe.kl_probe``,
                                                     ``_telemetry.telemetry``
``g = min(1, 1/ρ)``            guard_factor          ``formulas.next_guard_factor``
``g`` kept where ``ρ`` is NaN  next_guard_factor     ``_guard.guard_update``
``gᵀ dz + ½ dzᵀ ∇²L dz``       quadratic_loss_change ``_probe._measure_loss``
``e = clip(log δ* − log KL)``  pi_log_error          ``_controller.pi_controller``
``a = 0.5^(interval / h)``     half_life_decay       ``_controller.pi_controller``
PI step on ``log δ``           pi_step               ``_controller.pi_controller``
PI anti-windup (``c = 1``)     pi_anti_windup        ``_controller.pi_controller``
``K = S²/4``                   surrogate_kl          ``_relative.relative_radius``
Theil–Sen trend and spread     robust_trend          ``_relative.observe``
level entry ``min(k, log δ)``  level_entry           ``_relative.observe``
level: median of the window    window_level          ``_relative.observe``
``log δ = max(a, l) + margin`` relative_threshold    ``_relative.observe``
``δ = exp(log δ)``, or unset   threshold_delta       ``_relative.relative_radius``
``ρ_tr = actual / predicted``  trust_region_ratio    ``_trust_region.trust_region_radius``
ratio test on ``δ``            trust_region_step     ``_trust_region.trust_region_radius``
``‖a‖ = sqrt(mean_n ‖a_n‖²)``  activation_norm       public API, ``experiments.model``
``r = ‖g‖ / ‖a‖``              energy_ratio          ``_energy.energy_budget_clip``,
                                                     ``_energy.energy_ratios``
``s = min(1, r‖a‖ / ‖g‖)``     energy_scale          ``_energy.energy_budget_clip``
============================== ===================== =========================================
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import jax
import jax.numpy as jnp
import numpy as np

from ebc_optax import _validation

__all__ = (
    "AGGREGATES",
    "AxisName",
    "FD_RMS_FLOOR",
    "KL_METRICS",
    "LOG_UNSET",
    "MAD_TO_SIGMA",
    "MAX_LOG_GROWTH",
    "OVERSHOOTS",
    "UNSET_DELTA",
    "activation_norm",
    "beta_estimate",
    "budget_surrogate",
    "calibrated_surrogate",
    "center_per_token",
    "central_difference",
    "change_sq_sum",
    "clip_scale",
    "energy_ratio",
    "energy_scale",
    "exact_calibration",
    "fd_epsilon",
    "fisher_kl",
    "fisher_sq_sum",
    "guard_factor",
    "guard_ratio",
    "guarded_radius",
    "half_life_decay",
    "layer_contributions",
    "level_entry",
    "logit_change_sq_sum",
    "next_guard_factor",
    "per_token_change_norm",
    "per_token_kl",
    "per_token_rms_norm",
    "pi_anti_windup",
    "pi_log_error",
    "pi_step",
    "probe_clip_scale",
    "promised_change",
    "quadratic_loss_change",
    "relative_threshold",
    "robust_ema",
    "robust_trend",
    "softmax_kl_sum",
    "surrogate_kl",
    "threshold_delta",
    "token_count",
    "trust_radius",
    "trust_region_ratio",
    "trust_region_step",
    "unit_scale",
    "window_level",
)

#: A ``pmap`` / ``shard_map`` axis name (None: no all-reduce).
AxisName = Hashable | None
#: The metrics of a logit change: centered Euclidean (``KL ≤ S²/4``) or Fisher.
KL_METRICS = ("bound", "fisher")
#: How per-layer contributions add up to ``S``.
AGGREGATES = ("l1", "l2")
#: What a step with ``S > τ`` gets: cut back to the radius, or refused.
OVERSHOOTS = ("scale", "skip")
#: fd_epsilon's floor on rms(W_ℓ): keeps the step above float32 round-off.
FD_RMS_FLOOR = 1e-2
#: The relative radius's δ while its window fills: no clipping (τ ≈ 2e15).
UNSET_DELTA = 1e30
#: ``log UNSET_DELTA``.
LOG_UNSET = math.log(UNSET_DELTA)
#: The trend's slope is clamped to growth of at most ×1.5 per step in step
#: size (×2.25 in KL): faster than any start-up or warm-up (Prodigy's ×600 in
#: 40 steps is ×1.17), slower than a jump.
MAX_LOG_GROWTH = 2.0 * math.log(1.5)
#: 1.4826 · MAD estimates the standard deviation of Gaussian noise.
MAD_TO_SIGMA = 1.4826
# Smallest positive normal float32: the floor on ‖g‖ in budget / ‖g‖.
_TINY = float(np.finfo(np.float32).tiny)


# --- logit space: sizes of a change, KL, the radius ---------------------------

def _psum(x: jax.Array, axis_name: AxisName) -> jax.Array:
  return x if axis_name is None else jax.lax.psum(x, axis_name)


def token_count(logits: jax.Array) -> int:
  """Number of tokens ``N``: the product of all axes but the last (vocab) one.

  Example:
    >>> import jax.numpy as jnp
    >>> token_count(jnp.zeros((2, 3, 5)))
    6
  """
  n = 1
  for d in logits.shape[:-1]:
    n *= d
  return n


def center_per_token(x: jax.Array) -> jax.Array:
  """Removes the per-token mean over the vocab axis: ``x - mean(x, -1)``.

  Softmax is invariant to adding a constant to a token's logits, so this is the
  component of a logit change that can change the predictions.

  Example:
    >>> import jax.numpy as jnp
    >>> center_per_token(jnp.array([[1., 2., 3.]])).tolist()
    [[-1.0, 0.0, 1.0]]
  """
  return x - jnp.mean(x, axis=-1, keepdims=True)


def logit_change_sq_sum(dz: jax.Array, center: bool = True) -> jax.Array:
  """``Σ_t ‖center(dz_t)‖²`` in float32 (no per-token normalisation).

  Example:
    >>> import jax.numpy as jnp
    >>> float(logit_change_sq_sum(jnp.array([[1., 3.], [2., 2.]])))
    2.0
  """
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

  Example:
    >>> import jax.numpy as jnp
    >>> float(fisher_sq_sum(jnp.zeros((1, 2)), jnp.array([[1., -1.]])))  # 2·Var
    2.0
  """
  p = jax.nn.softmax(z.astype(jnp.float32), axis=-1)
  dz = dz.astype(jnp.float32)
  mean = jnp.sum(p * dz, axis=-1, keepdims=True)
  return 2.0 * jnp.sum(p * jnp.square(dz - mean))


def change_sq_sum(dz: jax.Array, z: jax.Array | None = None, *,
                  kl: str = "bound", center: bool = True) -> jax.Array:
  """Squared size of a logit change in the metric of the ``kl`` mode.

  ``kl="bound"``: ``Σ_t ‖center(dz_t)‖²`` (the reference recipe's metric; ``¼``
  of it bounds the KL). ``kl="fisher"``: :func:`fisher_sq_sum` at logits ``z``
  (``¼`` of it is the KL to second order). Either way a per-token RMS ``r`` of
  this size predicts a KL of ``r²/4`` nats/token, so ``τ = sqrt(4δ)`` serves
  both.

  Example:
    >>> import jax.numpy as jnp
    >>> dz = jnp.array([[1., -1.]])
    >>> z = jnp.zeros((1, 2))
    >>> float(change_sq_sum(dz)), float(change_sq_sum(dz, z, kl="fisher"))
    (2.0, 2.0)
  """
  if kl == "fisher":
    if z is None:
      raise ValueError("kl='fisher' needs the logits z at which p is taken.")
    return fisher_sq_sum(z, dz)
  return logit_change_sq_sum(dz, center)


def per_token_change_norm(dz: jax.Array, z: jax.Array | None = None, *,
                          kl: str = "bound", center: bool = True,
                          axis_name: AxisName = None) -> jax.Array:
  """Per-token RMS size of ``dz`` in the ``kl`` metric: ``sqrt(q / N)``, with
  ``q`` (:func:`change_sq_sum`) and ``N`` summed over the replicas of
  ``axis_name``.

  Example:
    >>> import jax.numpy as jnp
    >>> float(per_token_change_norm(jnp.array([[1., -1.], [3., 1.]])))  # sqrt(4/2)
    1.414...
  """
  sq = _psum(change_sq_sum(dz, z, kl=kl, center=center), axis_name)
  n = _psum(jnp.asarray(token_count(dz), jnp.float32), axis_name)
  return jnp.sqrt(sq / n)


def per_token_rms_norm(dz: jax.Array, center: bool = True,
                       axis_name: AxisName = None) -> jax.Array:
  """``sqrt(Σ_t ‖center(dz_t)‖² / N)`` over all tokens of all replicas.

  Example:
    >>> import jax.numpy as jnp
    >>> float(per_token_rms_norm(jnp.array([[1., -1.], [2., -2.]])))  # sqrt(10/2)
    2.236...
  """
  return per_token_change_norm(dz, center=center, axis_name=axis_name)


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
  """``Σ_t KL(softmax(z_t) ‖ softmax(z_new_t))`` in float32, exact.

  Example:
    >>> import jax.numpy as jnp
    >>> z_new = jnp.array([[0., 0.], [1., -1.]])
    >>> round(float(softmax_kl_sum(jnp.zeros((2, 2)), z_new)), 4)
    0.4338
  """
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


def guarded_radius(kl_target: jax.Array, radius_factor: jax.Array) -> jax.Array:
  """The radius a step is clipped to: ``τ = sqrt(4δ) · g``, with ``g`` the
  guard's factor (1 without the guard).

  Example:
    >>> float(guarded_radius(0.25, 0.5))
    0.5
  """
  return trust_radius(kl_target) * radius_factor


# --- the surrogate S and the scale c ------------------------------------------

def layer_contributions(beta: jax.Array, norms: jax.Array) -> jax.Array:
  """``s_ℓ = β_ℓ ‖ΔW_ℓ‖`` (float32), ``β_ℓ`` including the safety factor.

  Example:
    >>> layer_contributions([2., 3.], [0.5, 1.]).tolist()
    [1.0, 3.0]
  """
  return jnp.asarray(beta, jnp.float32) * jnp.asarray(norms, jnp.float32)


def budget_surrogate(contributions: jax.Array, aggregate: str = "l1") -> jax.Array:
  """The surrogate ``S`` bounding the linearised logit change ``‖Σ_ℓ J_ℓ ΔW_ℓ‖``.

  * ``"l1"``: ``S = Σ_ℓ s_ℓ`` (triangle inequality);
  * ``"l2"``: ``S = sqrt(L) · (Σ_ℓ s_ℓ²)^½``, which is ``≥ Σ_ℓ s_ℓ`` by
    Cauchy–Schwarz, so it is still a bound (without ``sqrt(L)`` it is not —
    the seed study's bug). It is never smaller than the L1 surrogate; it is
    offered for parity with the reference implementation.

  Example:
    >>> import jax.numpy as jnp
    >>> s = jnp.array([3., 4.])
    >>> float(budget_surrogate(s, "l1")), round(float(budget_surrogate(s, "l2")), 4)
    (7.0, 7.0711)
  """
  contributions = jnp.asarray(contributions, jnp.float32)
  if aggregate == "l1":
    return jnp.sum(contributions)
  if aggregate == "l2":
    num_layers = contributions.shape[0]
    return jnp.sqrt(jnp.float32(num_layers)) * jnp.sqrt(
        jnp.sum(jnp.square(contributions)))
  raise ValueError(f"aggregate must be one of {AGGREGATES}; got {aggregate!r}.")


def clip_scale(surrogate: jax.Array, radius: jax.Array,
               eps: float = 1e-12, overshoot: str = "scale") -> jax.Array:
  """``c = min(1, τ / max(S, ε))``; with ``overshoot="skip"`` a step beyond
  the radius is refused instead (``c = 0`` when ``S > τ``, else 1).

  Example:
    >>> float(clip_scale(4.0, 1.0)), float(clip_scale(0.5, 1.0))
    (0.25, 1.0)
    >>> float(clip_scale(4.0, 1.0, overshoot="skip"))
    0.0
  """
  surrogate = jnp.asarray(surrogate, jnp.float32)
  radius = jnp.asarray(radius, jnp.float32)
  if overshoot == "skip":
    return jnp.where(surrogate > radius, 0.0, 1.0).astype(jnp.float32)
  _validation.check_choice("overshoot", overshoot, OVERSHOOTS)
  return jnp.minimum(1.0, radius / jnp.maximum(surrogate, eps))


def exact_calibration(linear_change: jax.Array, l1_surrogate: jax.Array,
                      previous: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``k = ‖J ΔW‖ / max(S_L1, ε)`` of ``aggregate="exact"``: the factor on the
  L1 β-surrogate between measurements; ``previous`` when ``S_L1 <= ε`` (no
  denominator).

  Example:
    >>> float(exact_calibration(1.0, 4.0, 0.5))
    0.25
    >>> float(exact_calibration(1.0, 0.0, 0.5))  # no S_L1: the previous k
    0.5
  """
  return jnp.where(l1_surrogate > eps,
                   linear_change / jnp.maximum(l1_surrogate, eps), previous)


def calibrated_surrogate(calibration: jax.Array,
                         l1_surrogate: jax.Array) -> jax.Array:
  """``S = k · S_L1`` between ``‖J ΔW‖`` measurements (``aggregate="exact"``).

  Example:
    >>> float(calibrated_surrogate(0.25, 8.0))
    2.0
  """
  return calibration * l1_surrogate


# --- estimating β -------------------------------------------------------------

def unit_scale(norms: jax.Array) -> jax.Array:
  """``1 / max(‖ΔW‖, tiny)``: the factor that makes an update a unit direction
  (``tiny`` the smallest normal float32, so a zero update stays zero).

  Example:
    >>> import jax.numpy as jnp
    >>> float(unit_scale(jnp.float32(4.)))
    0.25
  """
  return 1.0 / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny)


def fd_epsilon(weight_sq_sum: jax.Array, size: int | jax.Array,
               fd_step: float) -> jax.Array:
  """Finite-difference step ``fd_step · max(rms(W_ℓ), 0.01)`` along a unit direction.

  ``rms(W_ℓ) = sqrt(Σ w² / size)`` is the typical entry of the layer, so the
  step does not grow with the layer's size: a unit direction spread over
  ``size`` entries moves each by about ``fd_step · rms / sqrt(size)``, far
  inside the linear regime at any width (a step ``∝ ‖W_ℓ‖`` grew with
  ``sqrt(size)`` and under-estimated β by ~50% at width 64). The floor keeps
  the step above float32 round-off for zero-initialised layers.

  Example:
    >>> round(float(fd_epsilon(400.0, 100, 1e-2)), 6)  # rms 2
    0.02
  """
  rms = jnp.sqrt(jnp.asarray(weight_sq_sum, jnp.float32)
                 / jnp.asarray(size, jnp.float32))
  return fd_step * jnp.maximum(rms, FD_RMS_FLOOR)


def central_difference(z_plus: jax.Array, z_minus: jax.Array,
                       eps: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(z, dz) = ((z₊ + z₋) / 2, (z₊ − z₋) / 2ε)`` from ``z± = f(W ± εU)``:
  the logits (exact to ``O(ε²)``) and their change along ``U``.

  Example:
    >>> [float(x) for x in central_difference(3.0, 1.0, 0.5)]
    [2.0, 2.0]
  """
  return 0.5 * (z_plus + z_minus), (z_plus - z_minus) / (2 * eps)


def beta_estimate(sq_sum: jax.Array, num_tokens: jax.Array) -> jax.Array:
  """One fresh measurement ``β_ℓ = sqrt(q / N)``: the per-token RMS of
  ``J_ℓ U_ℓ`` from its squared size ``q`` (:func:`change_sq_sum`, summed over
  replicas) and the token count ``N``.

  Example:
    >>> float(beta_estimate(18.0, 2.0))
    3.0
  """
  return jnp.sqrt(sq_sum / num_tokens)


def robust_ema(old: jax.Array, new: jax.Array, measured: jax.Array,
               decay: float, huber_ratio: float) -> jax.Array:
  """Huber-clipped EMA step for a positive scale estimate.

  A new estimate is first clipped to ``[old / huber_ratio, old · huber_ratio]``
  (Huber's bounded influence, in log space, so one outlying probe moves the
  average by a bounded factor) and then averaged:
  ``decay · old + (1 - decay) · clipped``. The first measurement of a layer,
  and every measurement when ``decay == 0`` (no memory to clip against), is
  taken as is.

  Example:
    >>> import jax.numpy as jnp
    >>> float(robust_ema(jnp.float32(1.), jnp.float32(100.), True, 0.5, 4.))
    2.5
  """
  old = jnp.asarray(old, jnp.float32)
  new = jnp.asarray(new, jnp.float32)
  use_history = jnp.logical_and(measured, decay > 0)
  clip_ok = jnp.logical_and(use_history, old > 0)
  clipped = jnp.where(clip_ok,
                      jnp.clip(new, old / huber_ratio, old * huber_ratio), new)
  return jnp.where(use_history, decay * old + (1.0 - decay) * clipped, clipped)


# --- the probe and the guard --------------------------------------------------

def probe_clip_scale(scale: jax.Array, surrogate: jax.Array,
                     radius: jax.Array, eps: float = 1e-12) -> jax.Array:
  """The scale the probe measures: ``c``, or for a refused step (``c = 0``)
  the step at the radius, ``min(1, τ / max(S, ε))`` — what ``"scale"`` would
  have applied — so ``ρ`` is defined on every probe with ``S > 0``.

  Example:
    >>> float(probe_clip_scale(0.5, 4.0, 1.0))
    0.5
    >>> float(probe_clip_scale(0.0, 4.0, 1.0))  # refused: probed at τ/S
    0.25
  """
  return jnp.where(scale > 0, scale,
                   clip_scale(surrogate, radius, eps, "scale"))


def promised_change(scale: jax.Array, surrogate: jax.Array,
                    eps: float = 1e-12) -> jax.Array:
  """``c·S``, what the surrogate promised for the clipped step (float32); 0
  when it promised nothing (``c·S <= eps``).

  Example:
    >>> float(promised_change(0.5, 4.0)), float(promised_change(0.0, 4.0))
    (2.0, 0.0)
  """
  promised = scale * surrogate
  return jnp.where(promised > eps, promised, 0.0).astype(jnp.float32)


def guard_ratio(applied_change: jax.Array, clip_scale: jax.Array,
                surrogate: jax.Array, eps: float = 1e-12) -> jax.Array:
  """``ρ = T / (c·S)`` (float32); NaN when ``c·S <= eps`` (no denominator).

  Example:
    >>> float(guard_ratio(3.0, 0.5, 4.0)), float(guard_ratio(3.0, 1.0, 0.0))
    (1.5, nan)
  """
  predicted = jnp.asarray(clip_scale, jnp.float32) * jnp.asarray(surrogate, jnp.float32)
  ratio = jnp.asarray(applied_change, jnp.float32) / jnp.maximum(predicted, eps)
  return jnp.where(predicted > eps, ratio, jnp.nan).astype(jnp.float32)


def guard_factor(ratio: jax.Array) -> jax.Array:
  """Shrink-only radius factor ``min(1, 1/ρ)``; 1 for an undefined (NaN) ``ρ``.

  Example:
    >>> float(guard_factor(2.0)), float(guard_factor(0.5)), float(guard_factor(float("nan")))
    (0.5, 1.0, 1.0)
  """
  ratio = jnp.asarray(ratio, jnp.float32)
  return jnp.where(ratio > 1.0, 1.0 / ratio, 1.0).astype(jnp.float32)


def next_guard_factor(ratio: jax.Array, factor: jax.Array) -> jax.Array:
  """The guard's factor after a probe: ``min(1, 1/ρ)`` renewed from this
  probe's ``ρ``, or the factor ``g`` it had when ``ρ`` is undefined (NaN).

  Example:
    >>> float(next_guard_factor(2.0, 0.75))
    0.5
    >>> float(next_guard_factor(float("nan"), 0.75))
    0.75
  """
  return jnp.where(jnp.isnan(ratio), factor, guard_factor(ratio))


def quadratic_loss_change(grad: jax.Array, hvp: jax.Array,
                          dz: jax.Array) -> jax.Array:
  """The local model's loss change ``∇_z Lᵀ dz + ½ dzᵀ ∇²_z L dz`` for a logit
  change ``dz = J u``, from the gradient and the Hessian-vector product
  ``∇²_z L dz`` of the loss in logit space.

  Example:
    >>> import jax.numpy as jnp
    >>> float(quadratic_loss_change(jnp.array([1., -1.]), jnp.array([2., 0.]),
    ...                             jnp.array([1., 1.])))
    1.0
  """
  return jnp.sum(grad * dz) + 0.5 * jnp.sum(dz * hvp)


# --- controllers of δ ---------------------------------------------------------

def pi_log_error(target_kl: jax.Array, applied_kl: jax.Array,
                 max_log_error: float) -> jax.Array:
  """``clip(log δ* − log max(KL, tiny), ±max_log_error)`` (float32).

  Example:
    >>> round(float(pi_log_error(0.1, 0.05, 5.0)), 4)
    0.6931
    >>> float(pi_log_error(0.1, 0.0, 2.0))  # no KL measured: the clip
    2.0
  """
  tiny = jnp.finfo(jnp.float32).tiny
  err = (jnp.log(jnp.asarray(target_kl, jnp.float32))
         - jnp.log(jnp.maximum(jnp.asarray(applied_kl, jnp.float32), tiny)))
  return jnp.clip(err, -max_log_error, max_log_error)


def half_life_decay(interval: int | jax.Array,
                    half_life: float | jax.Array) -> float | jax.Array:
  """Per-evaluation decay ``a = 0.5 ** (interval / half_life)`` of an EMA with
  a half-life of ``half_life`` steps, evaluated every ``interval`` steps.

  Example:
    >>> half_life_decay(250, 250.0), half_life_decay(500, 250.0)
    (0.5, 0.25)
  """
  return 0.5 ** (interval / half_life)


def pi_step(log_delta: jax.Array, error: jax.Array, error_ema: jax.Array,
            *, kp: float, ki: float, ema_decay: jax.Array,
            log_delta_min: float, log_delta_max: float
            ) -> tuple[jax.Array, jax.Array]:
  """One PI step in log space: returns ``(log δ_new, ema_new)``.

  ``ema_new = a·ema + (1 − a)·e``;
  ``log δ_new = clip(log δ + k_p e + k_i ema_new, log δ_min, log δ_max)``.

  Example:
    >>> import jax.numpy as jnp
    >>> ld, ema = pi_step(jnp.float32(0.), jnp.float32(1.), jnp.float32(0.),
    ...                   kp=0.1, ki=0.5, ema_decay=0.5, log_delta_min=-5.,
    ...                   log_delta_max=5.)
    >>> round(float(ld), 4), float(ema)
    (0.35, 0.5)
  """
  ema = ema_decay * error_ema + (1.0 - ema_decay) * error
  new = jnp.clip(log_delta + kp * error + ki * ema, log_delta_min, log_delta_max)
  return new, ema


def pi_anti_windup(delta: jax.Array, log_delta: jax.Array, error_ema: jax.Array,
                   new_error_ema: jax.Array, error: jax.Array,
                   scale: jax.Array, delta_min: float, delta_max: float
                   ) -> tuple[jax.Array, jax.Array]:
  """The PI step's anti-windup: returns ``(δ_new, ema_new)`` (float32).

  While the clip is inactive (``c >= 1``) a larger ``δ`` cannot change the
  step, so a positive error (``e > 0``, "grow") is not acted on: ``δ`` stays
  (clamped to ``[δ_min, δ_max]``) and so does the error EMA. Otherwise
  ``δ_new = exp(log δ_new)`` and the new EMA of :func:`pi_step`.

  Example:
    >>> d, e = pi_anti_windup(0.05, 0.0, 0.1, 0.2, 1.0, 1.0, 0.01, 0.3)
    >>> round(float(d), 4), round(float(e), 4)
    (0.05, 0.1)
    >>> d, e = pi_anti_windup(0.05, 0.0, 0.1, 0.2, 1.0, 0.5, 0.01, 0.3)
    >>> round(float(d), 4), round(float(e), 4)
    (1.0, 0.2)
  """
  frozen = jnp.logical_and(scale >= 1.0, error > 0)
  new_delta = jnp.where(frozen, jnp.clip(delta, delta_min, delta_max),
                        jnp.exp(log_delta)).astype(jnp.float32)
  ema = jnp.where(frozen, error_ema, new_error_ema).astype(jnp.float32)
  return new_delta, ema


def surrogate_kl(surrogate: jax.Array) -> jax.Array:
  """The predicted KL of the unclipped step, ``K = S²/4`` (nats/token): a
  bound with ``kl="bound"``, the quadratic KL with ``kl="fisher"``.

  Example:
    >>> float(surrogate_kl(2.0))
    1.0
  """
  return 0.25 * jnp.square(jnp.asarray(surrogate, jnp.float32))


def robust_trend(steps: jax.Array, values: jax.Array, at: jax.Array,
                 max_slope: float = MAX_LOG_GROWTH
                 ) -> tuple[jax.Array, jax.Array]:
  """Theil–Sen line through ``(steps, values)`` read at ``at``, and the
  robust spread of the points around it.

  The slope ``b`` is the median of the pairwise slopes. The value at ``at``
  is the median of ``values + b'·(at − steps)`` with ``b'`` the slope clamped
  to ``[0, max_slope]`` (a decay is not extrapolated); the spread is 1.4826 ×
  the median absolute deviation of the points from the unclamped line (a
  standard deviation for Gaussian noise; the fit's own shape is not noise).
  ``steps`` must be distinct.

  Example:
    >>> import jax.numpy as jnp
    >>> t = jnp.arange(6); y = 0.5 * t + jnp.array([0., 0, 0, 0, 0, 9.])
    >>> [round(float(v), 4) for v in robust_trend(t, y, jnp.int32(6))]
    [3.0, 0.0]
  """
  t = jnp.asarray(steps, jnp.float32) - jnp.asarray(at, jnp.float32)
  y = jnp.asarray(values, jnp.float32)
  i, j = jnp.triu_indices(t.shape[0], 1)
  slope = jnp.median((y[j] - y[i]) / (t[j] - t[i]))
  residual = y - slope * t
  spread = MAD_TO_SIGMA * jnp.median(jnp.abs(residual - jnp.median(residual)))
  value = jnp.median(y - jnp.clip(slope, 0.0, max_slope) * t)
  return value, spread


def level_entry(value: jax.Array, log_threshold: jax.Array,
                clamp_outliers: bool = True) -> jax.Array:
  """What a step adds to the level's window: ``min(k, log δ)`` — a refused
  step enters at the threshold it exceeded — or ``k`` itself with
  ``clamp_outliers=False``.

  Example:
    >>> float(level_entry(5.0, 2.0)), float(level_entry(5.0, 2.0, False))
    (2.0, 5.0)
  """
  return jnp.minimum(value, log_threshold) if clamp_outliers else value


def window_level(buffer: jax.Array, count: jax.Array) -> jax.Array:
  """The level: the median of the first ``count`` entries of the ring
  ``buffer`` (all of it once full; NaN while empty).

  Example:
    >>> import jax.numpy as jnp
    >>> float(window_level(jnp.array([3., 1., 2., 0.]), 3))
    2.0
  """
  filled = jnp.arange(buffer.shape[0]) < count
  return jnp.nanmedian(jnp.where(filled, buffer, jnp.nan))


def relative_threshold(trend: jax.Array, spread: jax.Array, level: jax.Array,
                       multiple: float, z: float) -> jax.Array:
  """``log δ = max(trend, level) + max(log multiple, z·spread)`` (float32).

  Example:
    >>> round(float(relative_threshold(1.0, 0.1, 0.5, 4.0, 4.0)), 4)
    2.3863
  """
  margin = jnp.maximum(jnp.log(jnp.float32(multiple)),
                       jnp.float32(z) * jnp.asarray(spread, jnp.float32))
  return (jnp.maximum(jnp.asarray(trend, jnp.float32),
                      jnp.asarray(level, jnp.float32)) + margin)


def threshold_delta(log_threshold: jax.Array) -> jax.Array:
  """``δ = exp(log δ)``, or :data:`UNSET_DELTA` (no clipping) while the
  threshold is unset (``log δ >= LOG_UNSET``).

  Example:
    >>> float(threshold_delta(0.0)), float(threshold_delta(LOG_UNSET)) > 1e29
    (1.0, True)
  """
  return jnp.where(log_threshold >= LOG_UNSET, UNSET_DELTA,
                   jnp.exp(log_threshold))


def trust_region_ratio(loss_change: jax.Array,
                       predicted_change: jax.Array) -> jax.Array:
  """``ρ_tr = actual / predicted``, or ``-10`` when the model predicted no
  decrease or either number is not finite; clipped to ``[-10, 10]``.

  Example:
    >>> float(trust_region_ratio(-0.5, -1.0))
    0.5
  """
  actual = jnp.asarray(loss_change, jnp.float32)
  pred = jnp.asarray(predicted_change, jnp.float32)
  ok = jnp.isfinite(actual) & jnp.isfinite(pred) & (pred < 0)
  ratio = actual / jnp.where(ok, pred, -1.0)
  return jnp.where(ok, jnp.clip(ratio, -10.0, 10.0), -10.0)


def trust_region_step(delta: jax.Array, ratio: jax.Array, loss_change: jax.Array,
                      clip_scale: jax.Array, *, shrink_below: float,
                      grow_above: float, shrink_factor: float,
                      grow_factor: float, delta_min: float, delta_max: float,
                      clip_active: float = 0.999
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The ratio test: returns ``(δ_new, shrunk, grown)``.

  Shrink (``δ·shrink_factor``) when ``ρ < shrink_below`` or the loss rose;
  grow (``δ·grow_factor``) when ``ρ > grow_above``, the loss fell and the clip
  was active (``c < clip_active``: an unclipped step says nothing about a
  larger radius); clamp to ``[delta_min, delta_max]``.

  The shrink is on ``δ``, not on the step taken (Nocedal & Wright's
  Algorithm 4.1 sets the radius to ``¼‖p_k‖``): with one noisy mini-batch per
  evaluation, shrinking to a fraction of an unclipped step collapsed ``δ`` on
  the tests' small problem (``test_adaptive_radius_ends_near_the_best_fixed_delta``
  failed by a wide margin) and did not visibly change the study's ×4 / ×8 runs.

  Example:
    >>> kw = dict(shrink_below=0.25, grow_above=0.75, shrink_factor=0.5,
    ...           grow_factor=1.5, delta_min=1e-4, delta_max=1.0)
    >>> d, shrunk, grown = trust_region_step(0.1, 0.9, -1.0, 0.5, **kw)
    >>> round(float(d), 4), bool(shrunk), bool(grown)
    (0.15, False, True)
  """
  actual = jnp.asarray(loss_change, jnp.float32)
  rose = ~(jnp.isfinite(actual) & (actual <= 0))
  shrunk = (ratio < shrink_below) | rose
  grown = (~shrunk) & (ratio > grow_above) & (clip_scale < clip_active)
  factor = jnp.where(shrunk, shrink_factor, jnp.where(grown, grow_factor, 1.0))
  new = jnp.clip(jnp.asarray(delta, jnp.float32) * factor, delta_min, delta_max)
  return new.astype(jnp.float32), shrunk, grown


# --- the energy budget (energy_budget_clip) -----------------------------------

def activation_norm(x: jax.Array) -> jax.Array:
  r"""Per-token RMS of the feature-wise L2 norm, in float32.

  .. math::
    \lVert a \rVert = \sqrt{\tfrac{1}{N} \textstyle\sum_{n} \lVert a_n \rVert_2^2}
    = \lVert a \rVert_F / \sqrt{N}

  over the ``N`` tokens (all leading axes) of ``x[..., d]``. It does not grow
  with batch size or sequence length, like the gradient of a mean loss, and
  it is the scale of the ``x`` in a linear layer's gradient ``δ xᵀ``, so
  ``‖∇W‖ / ‖a‖`` is the size of the backpropagated signal.

  Example:
    >>> import jax.numpy as jnp
    >>> float(activation_norm(jnp.array([[3.0, 4.0], [0.0, 0.0]])) ** 2)  # 25 / 2
    12.5
  """
  x = jnp.asarray(x, jnp.float32)
  if x.ndim == 0:
    return jnp.abs(x)
  per_token = jnp.sum(jnp.square(x), axis=-1)
  return jnp.sqrt(jnp.mean(per_token))


def _valid_activation(a: jax.Array) -> jax.Array:
  return jnp.isfinite(a) & (a > 0)


def energy_ratio(grad_norm: jax.Array, act_norm: jax.Array) -> jax.Array:
  """``‖g‖ / ‖a‖`` in float32; ``+inf`` when ``‖a‖`` is not finite and > 0.

  An activation norm that is zero, negative or non-finite gives no budget to
  measure against; reporting ``inf`` says "over any budget", which is what
  :func:`energy_scale` does with such a layer (it zeroes it).

  Example:
    >>> float(energy_ratio(2.0, 8.0)), float(energy_ratio(2.0, 0.0))
    (0.25, inf)
  """
  g = jnp.asarray(grad_norm, jnp.float32)
  a = jnp.asarray(act_norm, jnp.float32)
  valid = _valid_activation(a)
  return jnp.where(valid, g / jnp.where(valid, a, 1.0), jnp.inf)


def energy_scale(grad_norm: jax.Array, act_norm: jax.Array,
                 ratio: float | jax.Array) -> jax.Array:
  r"""The factor that puts a layer within its energy budget (float32).

  .. math::
    s = \min\!\big(1,\; r \lVert a \rVert / \lVert g \rVert\big)

  and ``s = 1`` when ``‖g‖ = 0``. The result is always finite and in
  ``[0, 1]``: when the budget cannot be honoured by a finite factor — ``‖a‖``
  zero, negative or non-finite (a broken forward pass), or ``‖g‖``
  non-finite — ``s = 0`` and the layer's update is zeroed.

  Example:
    >>> [float(energy_scale(g, 10.0, 0.1)) for g in (0.5, 2.0, 0.0)]
    [1.0, 0.5, 1.0]
    >>> float(energy_scale(1.0, float("inf"), 0.1))
    0.0
  """
  g = jnp.asarray(grad_norm, jnp.float32)
  a = jnp.asarray(act_norm, jnp.float32)
  budget = jnp.asarray(ratio, jnp.float32) * jnp.where(_valid_activation(a), a, 0.0)
  scale = jnp.minimum(1.0, budget / jnp.maximum(g, _TINY))
  ok = _valid_activation(a) & jnp.isfinite(g)
  return jnp.where(ok, scale, 0.0).astype(jnp.float32)
