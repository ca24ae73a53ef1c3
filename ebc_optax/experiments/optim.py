"""The optimizer chain of a run: base optimizer, clipping arm, weight decay.

Order, as in the seed study: ``[global clip | energy clip | AGC | ZClip] ->
base (LR-scaled) -> [EBC | update clip] -> [decoupled weight decay]``, or
``skip_step(base -> decay)``; with the schedule-free
base, EBC and the decay sit inside ``schedule_free`` on the step of its
``z`` sequence (see :func:`build_optimizer`). The EBC arm is
:func:`ebc_optax.wrap` (a non-finite gradient is rejected before the base
optimizer sees it, the decay is its ``after``); the spectral projection
acts on the parameters after ``optax.apply_updates`` (see
:mod:`ebc_optax.experiments.spectral`). EBC sees the learning-rate-scaled step
and nothing that comes after it. The energy clip, like the global clip, acts
on the raw gradients; it needs ``activation_norms`` from the forward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

import ebc_optax
from ebc_optax import _config
from ebc_optax.experiments import bursts
from ebc_optax.experiments import config as config_lib
from ebc_optax.experiments import guards


def learning_rate(cfg: config_lib.Config):
  """The run's LR: ``optim.lr × optim.lr_scale``, times
  ``train.burst_lr_factor`` during an ``lr`` burst (then a schedule)."""
  start, steps = cfg.train.burst_window
  return bursts.learning_rate(cfg.lr, cfg.train.burst, start=start,
                              steps=steps, factor=cfg.train.burst_lr_factor)


def _schedule_free_step(cfg: config_lib.Config) -> optax.GradientTransformation:
  """The base step inside ``schedule_free_adamw`` (its z-sequence's step),
  without its weight decay (added after EBC, as for the other bases)."""
  return optax.chain(
      optax.scale_by_rms(decay=cfg.optim.b2, eps=1e-8, eps_in_sqrt=False,
                         bias_correction=True),
      optax.scale_by_learning_rate(learning_rate(cfg)))


def _schedule_free_lr(cfg: config_lib.Config):
  """The LR ``schedule_free`` weights its average with. It calls a schedule
  with its ``step_count``, which starts at 1 where the base step's count
  starts at 0: shifted, so an LR burst hits both on the same steps."""
  lr = learning_rate(cfg)
  return (lambda count: lr(count - 1)) if callable(lr) else lr


def base_optimizer(cfg: config_lib.Config) -> optax.GradientTransformation:
  """The base optimizer, without weight decay (added after the clip)."""
  lr, o = learning_rate(cfg), cfg.optim
  if o.optimizer == "adam":
    return optax.adam(lr, b1=o.b1, b2=o.b2)
  if o.optimizer == "muon":
    # Muon on matrices, Adam (same LR) on everything else, as optax does.
    return optax.contrib.muon(lr, adam_b1=o.b1, adam_b2=o.b2)
  if o.optimizer == "prodigy":
    return optax.contrib.prodigy(lr, betas=(o.b1, o.b2))
  if o.optimizer == "schedule_free":
    return optax.contrib.schedule_free(_schedule_free_step(cfg),
                                       _schedule_free_lr(cfg), b1=o.b1)
  if o.optimizer == "spam":
    return guards.spam(lr, b1=o.b1, b2=o.b2)
  if o.optimizer == "stable_adamw":
    return guards.stable_adamw(lr, b1=o.b1, b2=o.b2)
  return optax.sgd(lr)


def eval_params(opt_state: Any, params: Any) -> Any:
  """Where to evaluate: ``params``, or for schedule-free the averaged iterate
  ``x`` (``optax.contrib.schedule_free_eval_params``)."""
  found = [s for s in jax.tree.leaves(
      opt_state, is_leaf=lambda x: isinstance(x, optax.contrib.ScheduleFreeState))
           if isinstance(s, optax.contrib.ScheduleFreeState)]
  if not found:
    return params
  return optax.contrib.schedule_free_eval_params(found[0], params)


def next_token_loss(logits: jax.Array, inputs: jax.Array) -> jax.Array:
  """EBC's ``loss_fn(logits, batch)`` for a char LM whose batch is the inputs.

  The trust-region controller compares actual and predicted loss changes on
  the probe rows of ``batch``; the harness hands EBC only the input tokens,
  so the loss is the next-token cross-entropy *within* them (positions
  ``0..T-2`` predict ``1..T-1``): the training loss without its last position.
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  return -jnp.mean(jnp.take_along_axis(logp, inputs[:, 1:, None], -1))


def stacked_layers(cfg: config_lib.Config) -> tuple[str, ...] | None:
  """EBC's ``stacked`` for the run: the GPT's ``blocks`` when they are scanned
  (``model.scan_layers``), else ``ebc.stacked``."""
  if cfg.model.scan_layers:
    return ("blocks",)
  return tuple(cfg.ebc.stacked) if cfg.ebc.stacked else None


def build_optimizer(
    cfg: config_lib.Config,
    logits_fn: Callable[[Any, Any], Any],
) -> optax.GradientTransformationExtraArgs:
  """The full chain for ``cfg``; ``update`` takes ``batch=inputs``, for
  ``optim.clip="energy"`` also ``activation_norms={label: norm}``, and for
  ``optim.clip="skip_step"`` and ``"ebc"`` also ``loss=<the batch's loss>``."""
  stacked = stacked_layers(cfg)
  decay = (optax.add_decayed_weights(-cfg.lr * cfg.optim.weight_decay)
           if cfg.optim.weight_decay else None)
  if cfg.optim.clip == "ebc":
    # The front door: gradient guarded before the base, decay outside the clip.
    kwargs = _config.transform_kwargs(
        dataclasses.replace(cfg.ebc, stacked=stacked), loss_fn=next_token_loss)
    if cfg.optim.optimizer == "schedule_free":
      # EBC clips the step of schedule-free's z sequence (its base step):
      # clipping the y-update outside would leave z with the unclipped step.
      inner = ebc_optax.wrap(_schedule_free_step(cfg), logits_fn, after=decay,
                             **kwargs)
      return optax.contrib.schedule_free(inner, _schedule_free_lr(cfg),
                                         b1=cfg.optim.b1)
    checks = {} if cfg.optim.ebc_grad_check else {"grad_norm_multiple": None,
                                                  "loss_multiple": None}
    return ebc_optax.wrap(base_optimizer(cfg), logits_fn, after=decay,
                          skip_refused=cfg.optim.ebc_skip_refused, **checks,
                          **kwargs)
  if cfg.optim.clip == "skip_step":  # the whole step, decay included
    inner = optax.chain(base_optimizer(cfg), decay or optax.identity())
    return guards.skip_step(inner, keep_skipped=cfg.optim.skip_keep_skipped,
                            keep_state=cfg.optim.skip_keep_state)
  parts = []
  if cfg.optim.clip == "global":
    parts.append(guards.recording(
        optax.clip_by_global_norm(cfg.optim.global_clip_norm)))
  if cfg.optim.clip == "agc":
    parts.append(guards.recording(
        optax.adaptive_grad_clip(cfg.optim.agc_clipping)))
  if cfg.optim.clip == "zclip":
    parts.append(guards.zclip())
  if cfg.optim.clip == "energy":
    parts.append(ebc_optax.energy_budget_clip(cfg.optim.energy_ratio,
                                              stacked=stacked))
  if cfg.optim.optimizer == "schedule_free" and decay is not None:
    # Decay belongs to the z step, as in optax's schedule_free_adamw.
    parts.append(optax.contrib.schedule_free(
        optax.chain(_schedule_free_step(cfg), decay), _schedule_free_lr(cfg),
        b1=cfg.optim.b1))
    return optax.chain(*parts)
  parts.append(base_optimizer(cfg))
  if cfg.optim.clip == "update_clip":
    parts.append(guards.clip_update_by_historical_norm())
  if decay is not None:
    parts.append(decay)
  return optax.chain(*parts)
