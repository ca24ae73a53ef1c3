"""``ellipsotope_budget_clip``: the standard composition of the EBC pieces."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from ebc_optax import _clip
from ebc_optax import _controller
from ebc_optax import _layers
from ebc_optax import _probe
from ebc_optax import _relative
from ebc_optax import _rows
from ebc_optax import _safety
from ebc_optax import _sensitivity
from ebc_optax import _trust_region
from ebc_optax import _validation
from ebc_optax import formulas

CONTROLLERS = (None, "pi", "trust_region", "relative")
DEFAULT_TARGET_KL = 0.05  # δ* of the reference recipe


def ellipsotope_budget_clip(
    logits_fn: Callable[[Any, Any], jax.Array],
    target_kl: float | None = None,
    *,
    update_every: int = 20,
    probe_layers: int = 2,
    full_sweep_every: int | str | None = "auto",
    beta_ema: float = 0.9,
    safety: float = 1.05,
    aggregate: str = "l1",
    kl: str = "bound",
    exact_every: int = 1,
    center_logits: bool = True,
    include_embed_out: bool = False,
    sensitivity: str = "jvp",
    huber_ratio: float = 4.0,
    fd_step: float = 1e-2,
    probe_batch_size: _rows.ProbeBatchSize = 0.25,
    probe_batch_fn: _rows.ProbeBatchFn | None = None,
    controller: str | _controller.KLController | None = "relative",
    guard: bool | None = None,
    probe_every: int = 20,
    loss_fn: Callable[[jax.Array, Any], jax.Array] | None = None,
    layer_labels: _layers.LayerLabelsFn | None = None,
    stacked: _layers.Stacked = None,
    overshoot: str | None = None,
    axis_name: formulas.AxisName = None,
    eps: float = 1e-12,
) -> optax.GradientTransformationExtraArgs:
  r"""Ellipsotope-Budgeted Clipping: a trust region on the change of the logits.

  For the proposed update ``ΔW`` (e.g. from ``optax.adam``) grouped into
  layers ``ℓ``, with per-token sensitivities ``β_ℓ = ‖center(J_ℓ U_ℓ)‖/√N``
  along ``U_ℓ = ΔW_ℓ/‖ΔW_ℓ‖``:

  .. math::
    S = \sum_\ell \beta_\ell \lVert\Delta W_\ell\rVert, \qquad
    \tau = \sqrt{4\delta}, \qquad
    \Delta W \leftarrow \min\!\big(1, \tau/\max(S,\epsilon)\big)\,\Delta W .

  ``S`` bounds the per-token RMS of the linearised centered logit change, and
  ``KL ≲ ¼‖center(dz)‖²``, so the clipped step keeps the mean per-token KL at
  most ``δ`` (to second order). Per-token normalisation makes ``τ`` and ``S``
  independent of the batch size: the reference recipe's ``τ = sqrt(4Bδ)`` over
  ``B`` tokens is ours times ``√B`` (``c`` is identical).

  Two modes go beyond the reference recipe (same API): ``aggregate="exact"``
  replaces the triangle-inequality surrogate by the linearised change of the
  whole update, ``S = ‖J ΔW‖``, from one JVP; ``kl="fisher"`` measures changes
  in the softmax Fisher norm ``sqrt(2·Var_p(dz))`` instead of the centered
  Euclidean norm, so ``S²/4`` is the quadratic KL itself rather than a bound
  on it and ``δ`` becomes the predicted KL of the clipped step (KL scales
  with ``c²``). ``aggregate="exact", kl="fisher"`` sets ``c`` so that the
  step's quadratic KL on the probe rows equals ``δ``.

  Composition (data flows by wrapping, as in ``optax.inject_hyperparams``)::

    est = sensitivity_estimator(...)      # β: round-robin JVP/FD, Huber + EMA,
                                          # safety; owns the metric and probe rows
    skip_nonfinite(                       # zero step + count if anything is NaN/Inf
      kl_probe(                           # owns δ and g, passes them down each step;
        budget_clip(est),                 # β refresh, S, c = min(1, τ/S), scale
        est,                              # every probe_every steps: KL, T, ρ, then
        controller=relative_radius(),     # the next δ (every step)
        guard=...))                       # the next g = min(1, 1/ρ)

  Args:
    logits_fn: ``(params, batch) -> logits`` of shape ``[..., vocab]``; every
      leading axis counts as a token.
    target_kl: ``δ*`` in nats/token (> 0): the applied-KL target of the PI
      controller, the starting ``δ`` of the trust-region radius, or the fixed
      ``δ`` when ``controller=None``; None: the reference recipe's 0.05 for
      those. The default relative radius has no target, so a ``target_kl`` given
      with it is a ``ValueError`` (rather than a number silently unused).
    update_every: steps between round-robin ``β`` refreshes (>= 1).
    probe_layers: layers per refresh (>= 1).
    full_sweep_every: steps between full ``β`` sweeps (>= 0; 0/None: only the
      first update and never-measured layers); ``"auto"`` (the default):
      200 per 8 budgeted layers, ``200·⌈L/8⌉`` — the reference recipe's 200 up
      to 8 layers, and a sweep's share of the steps that does not grow with
      depth.
    beta_ema: ``β`` EMA decay in ``[0, 1)``.
    safety: multiplier on ``β`` (> 0).
    aggregate: ``"l1"`` (``Σ s_ℓ``), ``"l2"`` (``√L·‖s‖₂``) or ``"exact"``
      (``‖J ΔW‖`` from one JVP of the whole update; no β needed).
    kl: ``"bound"`` (centered Euclidean metric, ``KL ≤ S²/4``; the reference
      recipe's) or ``"fisher"`` (Fisher metric, ``KL ≈ S²/4``); applies to
      ``β``, ``S`` and the probe's ``T``.
    exact_every: steps between ``‖J ΔW‖`` measurements with
      ``aggregate="exact"`` (>= 1, static); in between, the L1 β-surrogate
      rescaled by the last ``‖J ΔW‖ / S_L1``.
    center_logits: center logit changes per token (``β``, ``S``, ``T``).
    include_embed_out: keep embedding/output-head groups in the budget.
    sensitivity: ``"jvp"`` or ``"fd"``.
    huber_ratio: a fresh ``β`` estimate is clipped to within this factor of
      its EMA (>= 1).
    fd_step: relative finite-difference step (> 0).
    probe_batch_size: rows of ``batch`` used for ``β``, ``‖J ΔW‖`` and the
      probe: a float ``f`` in ``(0, 1]`` takes every ``round(1/f)``-th row
      (default every 4th, the reference recipe's "tiny probe batch"), an int
      ``n`` every ``R // n``-th row (the first ``n``), None all rows. Only
      leaves whose leading size is the logits' leading size ``R`` are sliced;
      the same strided rule holds per replica under ``pmap`` / ``shard_map`` and
      on the global batch under ``jax.jit`` (see ``ebc_optax._rows``).
    probe_batch_fn: ``batch -> probe batch``, replacing that rule (for
      batches with a leaf that has ``R`` leading entries but no rows).
    controller: ``"relative"`` (the default, :func:`relative_radius`: δ a
      multiple of the median predicted KL, before clipping, of the last
      steps, so ordinary steps pass and outliers are cut; ``target_kl``
      unused), ``"pi"`` (:func:`pi_controller` with the reference recipe's
      gains: steers the applied KL to ``target_kl``; the reference recipe,
      :data:`SEEDS_RECIPE`), ``"trust_region"`` (:func:`trust_region_radius`:
      δ adapted by the ratio of actual to predicted loss decrease; needs
      ``loss_fn``), a :class:`KLController`, or None (fixed ``δ``).
      Why the relative radius is the default: the
      :doc:`Controllers </guides/controllers>` guide.
    guard: shrink-only guard on the applied change: ``τ`` times ``min(1,
      1/ρ)`` of the latest probe. None (the default): on with an absolute
      ``δ`` (``"pi"``, ``"trust_region"``, a fixed ``δ``), off with the
      relative radius, whose threshold is a multiple of the surrogate's own
      trend: a bias of the surrogate (a stale ``β``) cancels there, and an
      absolute correction would only hold ordinary steps below the radius.
      The probe still measures ``ρ``.
    probe_every: steps between applied-KL probes (>= 0; 0 disables them, and
      with them the controller and the guard).
    loss_fn: ``(logits, batch) -> scalar mean loss`` on the probe rows, for
      controllers that need it (``"trust_region"``).
    layer_labels: ``params -> pytree of str`` overriding
      :func:`default_layer_labels`.
    stacked: label prefixes of layers stacked on a leading axis (scanned
      models: ``"blocks"`` for ``nnx.scan``, ``"params/ScanBlock_0"`` for
      linen ``nn.scan``, ``"model/layers"``); slice ``i`` of every leaf under
      prefix ``p`` is budgeted as its own layer ``"p/i"``. Check the result
      with ``budget_layers(params, stacked=...)``.
    overshoot: a step with ``S > τ`` is cut back to the radius (``"scale"``,
      ``c = τ/S``) or refused (``"skip"``, ``c = 0``; the base optimizer's
      state still takes the gradient). ``"skip"`` needs a radius that
      ordinary steps fit — ``controller="relative"`` (or another controller
      with ``every_step``) — and is a ``ValueError`` with any other: a fixed
      or target-steered δ that every step exceeds would refuse every step.
      None (the default): ``"skip"`` with such a controller, ``"scale"``
      with any other (the reference recipe's clip); the
      :doc:`Controllers </guides/controllers>` guide has the measurements
      behind the choice.
    axis_name: ``pmap``/``shard_map`` axis name; the JVP norms, the probe's
      KL and ``T`` are all-reduced so every replica applies the same ``c``.
      Not needed under ``jax.jit`` with a sharded batch.
    eps: floor on ``S`` and ``c·S``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``. ``update(updates, state,
    params, batch=batch)`` requires ``params`` and ``batch``; read its
    numbers with :func:`telemetry`.

  Example:
    >>> import jax, jax.numpy as jnp, optax, ebc_optax
    >>> def logits_fn(p, x):
    ...   return jnp.tanh(x @ p["hidden"]) @ p["readout_w"]
    >>> params = {"hidden": jnp.eye(3), "readout_w": jnp.ones((3, 5))}
    >>> tx = optax.chain(optax.adam(1e-1),
    ...                  ebc_optax.ellipsotope_budget_clip(logits_fn))
    >>> state = tx.init(params)
    >>> x = jnp.arange(6.).reshape(2, 3)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params, batch=x)
    >>> stats = ebc_optax.telemetry(state)
    >>> bool(stats["c"] <= 1.0), stats["beta"].shape
    (True, (1,))

  References:
    The method: ``Ellipsotope-Budgeted Clipping`` (this project's seed
    documents); the softmax Fisher bound ``KL ≤ ¼‖center(dz)‖²``.
  """
  _validation.check_choice(
      "controller", controller if not isinstance(
          controller, _controller.KLController) else "pi", CONTROLLERS)
  if controller == "pi":
    controller = _controller.pi_controller()
  elif controller == "trust_region":
    controller = _trust_region.trust_region_radius()
  elif controller == "relative":
    controller = _relative.relative_radius()
  relative = controller is not None and controller.every_step
  if target_kl is not None:
    _validation.check_number("target_kl", target_kl, lo=0, lo_open=True)
  if target_kl is not None and relative:
    raise ValueError(
        f"target_kl={target_kl!r} is unused by the relative radius "
        "(controller='relative', the default), which sets δ from the recent "
        "steps: pass controller='pi' to steer the applied KL to target_kl "
        "(the reference recipe, ebc_optax.SEEDS_RECIPE), controller=None for a "
        "fixed δ = target_kl, or leave target_kl out.")
  if target_kl is None:
    target_kl = DEFAULT_TARGET_KL
  if guard is None:
    guard = not relative
  _validation.check_choice("overshoot", overshoot,
                           (None,) + formulas.OVERSHOOTS)
  if overshoot is None:
    overshoot = "skip" if relative else "scale"
  if overshoot == "skip" and not relative:
    raise ValueError(
        "overshoot='skip' refuses every step with S > τ, so it needs a radius "
        "that ordinary steps fit: use controller='relative' (or a "
        "KLController with every_step=True); with a fixed or target-steered δ "
        "use overshoot='scale'.")
  estimator = _sensitivity.sensitivity_estimator(
      logits_fn, sensitivity=sensitivity, update_every=update_every,
      probe_layers=probe_layers, full_sweep_every=full_sweep_every,
      beta_ema=beta_ema, huber_ratio=huber_ratio, safety=safety,
      center_logits=center_logits, fd_step=fd_step, kl=kl,
      axis_name=axis_name, probe_batch_size=probe_batch_size,
      probe_batch_fn=probe_batch_fn)
  clip = _clip.budget_clip(
      estimator, target_kl=target_kl, aggregate=aggregate,
      exact_every=exact_every,
      layer_labels=layer_labels, include_embed_out=include_embed_out,
      stacked=stacked, overshoot=overshoot, eps=eps)
  def budgeted_leaves(params):
    part = _layers.partition_layers(params, layer_labels, include_embed_out,
                                    stacked)
    return tuple(slot is not None for slot in part.leaf_layers)

  probed = _probe.kl_probe(
      clip, estimator, target_kl=target_kl, controller=controller,
      guard=guard, probe_every=probe_every, loss_fn=loss_fn,
      budgeted_leaves=budgeted_leaves, eps=eps)
  # budget_clip's state holds update_norm and c: a finite state certifies c·u.
  return _safety.skip_nonfinite(probed, check_updates=False)
