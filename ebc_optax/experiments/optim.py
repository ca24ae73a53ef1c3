"""The optimizer chain of a run: base optimizer, clipping arm, weight decay.

Two registries: :data:`BASES` (``optim.optimizer``) and :data:`CLIP_ARMS`
(``optim.clip``); a new base or arm is one entry, which the config's
validation, the CLI's choices and the train step read.

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


# The bases of ``optim.optimizer``: name -> factory of the LR-scaled base
# step, without weight decay (added after the clip). One entry adds a base.
BASES: dict[str, Callable[[config_lib.Config], optax.GradientTransformation]] = {
    "adam": lambda cfg: optax.adam(learning_rate(cfg), b1=cfg.optim.b1,
                                   b2=cfg.optim.b2),
    # Muon on matrices, Adam (same LR) on everything else, as optax does.
    "muon": lambda cfg: optax.contrib.muon(learning_rate(cfg),
                                           adam_b1=cfg.optim.b1,
                                           adam_b2=cfg.optim.b2),
    "sgd": lambda cfg: optax.sgd(learning_rate(cfg)),
    "prodigy": lambda cfg: optax.contrib.prodigy(
        learning_rate(cfg), betas=(cfg.optim.b1, cfg.optim.b2)),
    "schedule_free": lambda cfg: optax.contrib.schedule_free(
        _schedule_free_step(cfg), _schedule_free_lr(cfg), b1=cfg.optim.b1),
    "spam": lambda cfg: guards.spam(learning_rate(cfg), b1=cfg.optim.b1,
                                    b2=cfg.optim.b2),
    "stable_adamw": lambda cfg: guards.stable_adamw(
        learning_rate(cfg), b1=cfg.optim.b1, b2=cfg.optim.b2),
}


def base_optimizer(cfg: config_lib.Config) -> optax.GradientTransformation:
  """The base optimizer, without weight decay (added after the clip)."""
  return BASES[cfg.optim.optimizer](cfg)


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


Piece = Callable[[config_lib.Config, Any], optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class ClipArm:
  """One value of ``optim.clip``: how its chain is built, what its ``update``
  needs from the train step, and whether it fits the schedule-free base.

  ``build(cfg, logits_fn)`` returns the whole chain (base and decay
  included). A new arm is one entry of :data:`CLIP_ARMS`.
  """
  build: Callable[[config_lib.Config, Callable[[Any, Any], Any]],
                  optax.GradientTransformation]
  needs_loss: bool = False  # update(..., loss=<the batch's loss>)
  needs_activation_norms: bool = False  # update(..., activation_norms=...)
  schedule_free: bool = False  # may be built around optim.optimizer=schedule_free


def _decay(cfg: config_lib.Config) -> optax.GradientTransformation | None:
  return (optax.add_decayed_weights(-cfg.lr * cfg.optim.weight_decay)
          if cfg.optim.weight_decay else None)


def _around_base(before: Piece | None = None, after: Piece | None = None):
  """``[before] -> base -> [after] -> [decay]``; with the schedule-free base
  the decay belongs to its z step, as in optax's ``schedule_free_adamw``."""
  def build(cfg, logits_fn):
    del logits_fn
    stacked, decay = stacked_layers(cfg), _decay(cfg)
    parts = [before(cfg, stacked)] if before else []
    if cfg.optim.optimizer == "schedule_free" and decay is not None:
      parts.append(optax.contrib.schedule_free(
          optax.chain(_schedule_free_step(cfg), decay), _schedule_free_lr(cfg),
          b1=cfg.optim.b1))
      return optax.chain(*parts)
    parts.append(base_optimizer(cfg))
    parts += [after(cfg, stacked)] if after else []
    parts += [decay] if decay is not None else []
    return optax.chain(*parts)
  return build


def _ebc_arm(cfg: config_lib.Config, logits_fn) -> optax.GradientTransformation:
  """The front door: the batch judged before the base, decay after the clip."""
  decay = _decay(cfg)
  kwargs = dataclasses.replace(cfg.ebc, stacked=stacked_layers(cfg)).to_kwargs(
      loss_fn=next_token_loss)
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


def _skip_step_arm(cfg: config_lib.Config, logits_fn
                   ) -> optax.GradientTransformation:
  """Skip-step around the whole step, decay included."""
  del logits_fn
  inner = optax.chain(base_optimizer(cfg), _decay(cfg) or optax.identity())
  return guards.skip_step(inner, keep_skipped=cfg.optim.skip_keep_skipped,
                          keep_state=cfg.optim.skip_keep_state)


# The arms of ``optim.clip``; one entry adds an arm.
CLIP_ARMS: dict[str, ClipArm] = {
    "none": ClipArm(_around_base(), schedule_free=True),
    "global": ClipArm(_around_base(before=lambda cfg, _: guards.recording(
        optax.clip_by_global_norm(cfg.optim.global_clip_norm))),
                      schedule_free=True),
    "ebc": ClipArm(_ebc_arm, needs_loss=True, schedule_free=True),
    "energy": ClipArm(_around_base(
        before=lambda cfg, stacked: ebc_optax.energy_budget_clip(
            cfg.optim.energy_ratio, stacked=stacked)),
                      needs_activation_norms=True, schedule_free=True),
    "agc": ClipArm(_around_base(before=lambda cfg, _: guards.recording(
        optax.adaptive_grad_clip(cfg.optim.agc_clipping)))),
    "zclip": ClipArm(_around_base(before=lambda cfg, _: guards.zclip())),
    "skip_step": ClipArm(_skip_step_arm, needs_loss=True),
    "update_clip": ClipArm(_around_base(
        after=lambda cfg, _: guards.clip_update_by_historical_norm())),
}


def build_optimizer(
    cfg: config_lib.Config,
    logits_fn: Callable[[Any, Any], Any],
) -> optax.GradientTransformationExtraArgs:
  """The full chain for ``cfg`` (:data:`CLIP_ARMS`); ``update`` takes
  ``batch=inputs``, and ``loss=`` / ``activation_norms=`` where the arm
  needs them (:class:`ClipArm`)."""
  return CLIP_ARMS[cfg.optim.clip].build(cfg, logits_fn)
