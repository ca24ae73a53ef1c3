"""The optimizer chain of a run: base optimizer, clipping arm, weight decay.

Order, as in the seed study: ``[global clip] -> base (LR-scaled) -> [EBC] ->
[decoupled weight decay]``; the spectral projection acts on the parameters
after ``optax.apply_updates`` (see :mod:`ebc_optax.experiments.spectral`).
EBC sees the learning-rate-scaled step and nothing that comes after it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax

import ebc_optax
from ebc_optax.experiments import config as config_lib


def base_optimizer(cfg: config_lib.Config) -> optax.GradientTransformation:
  lr = cfg.lr
  if cfg.optim.optimizer == "adam":
    return optax.adam(lr, b1=cfg.optim.b1, b2=cfg.optim.b2)
  if cfg.optim.optimizer == "muon":
    # Muon on matrices, Adam (same LR) on everything else, as optax does.
    return optax.contrib.muon(lr, adam_b1=cfg.optim.b1, adam_b2=cfg.optim.b2)
  return optax.sgd(lr)


def build_optimizer(
    cfg: config_lib.Config,
    logits_fn: Callable[[Any, Any], Any],
) -> optax.GradientTransformationExtraArgs:
  """The full chain for ``cfg``; ``update`` takes ``batch=inputs``."""
  parts = []
  if cfg.optim.clip == "global":
    parts.append(optax.clip_by_global_norm(cfg.optim.global_clip_norm))
  parts.append(base_optimizer(cfg))
  if cfg.optim.clip == "ebc":
    parts.append(ebc_optax.from_config(cfg.ebc, logits_fn))
  if cfg.optim.weight_decay:
    parts.append(optax.add_decayed_weights(-cfg.lr * cfg.optim.weight_decay))
  return optax.chain(*parts)
