"""The optimizer chain of a run: base optimizer, clipping arm, weight decay.

Order, as in the seed study: ``[global clip | energy clip] -> base
(LR-scaled) -> [EBC] -> [decoupled weight decay]``; the EBC arm is
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
from ebc_optax.experiments import config as config_lib


def base_optimizer(cfg: config_lib.Config) -> optax.GradientTransformation:
  lr = cfg.lr
  if cfg.optim.optimizer == "adam":
    return optax.adam(lr, b1=cfg.optim.b1, b2=cfg.optim.b2)
  if cfg.optim.optimizer == "muon":
    # Muon on matrices, Adam (same LR) on everything else, as optax does.
    return optax.contrib.muon(lr, adam_b1=cfg.optim.b1, adam_b2=cfg.optim.b2)
  return optax.sgd(lr)


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
  """The full chain for ``cfg``; ``update`` takes ``batch=inputs``, and for
  ``optim.clip="energy"`` also ``activation_norms={label: norm}``."""
  stacked = stacked_layers(cfg)
  decay = (optax.add_decayed_weights(-cfg.lr * cfg.optim.weight_decay)
           if cfg.optim.weight_decay else None)
  if cfg.optim.clip == "ebc":
    # The front door: gradient guarded before the base, decay outside the clip.
    kwargs = _config.transform_kwargs(
        dataclasses.replace(cfg.ebc, stacked=stacked), loss_fn=next_token_loss)
    return ebc_optax.wrap(base_optimizer(cfg), logits_fn, after=decay, **kwargs)
  parts = []
  if cfg.optim.clip == "global":
    parts.append(optax.clip_by_global_norm(cfg.optim.global_clip_norm))
  if cfg.optim.clip == "energy":
    parts.append(ebc_optax.energy_budget_clip(cfg.optim.energy_ratio,
                                              stacked=stacked))
  parts.append(base_optimizer(cfg))
  if decay is not None:
    parts.append(decay)
  return optax.chain(*parts)
