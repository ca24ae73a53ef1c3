"""Generating text from a checkpointed run."""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from ebc_optax.experiments import config as config_lib
from ebc_optax.experiments import data as data_lib
from ebc_optax.experiments import train as train_lib


def load_run(run_dir: str | pathlib.Path):
  """``(cfg, vocab, apply_fn, params)`` from a run directory's last checkpoint."""
  run_dir = pathlib.Path(run_dir)
  if not (run_dir / "config.json").exists():
    raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json).")
  cfg = config_lib.from_dict(json.loads((run_dir / "config.json").read_text()))
  vocab = data_lib.load_vocab(run_dir / "vocab.json")
  ckpt = train_lib.latest_checkpoint(run_dir)
  if ckpt is None:
    raise FileNotFoundError(f"No finished checkpoint under {run_dir}/checkpoints.")
  dataset = data_lib.CharDataset(
      train=np.zeros(cfg.model.seq_len + 2, np.int32),
      val=np.zeros(cfg.model.seq_len + 2, np.int32), vocab=tuple(vocab),
      name=cfg.data.dataset, entropy_floor=None)
  run = train_lib.build_run(cfg, dataset)
  params, _, _, _ = train_lib.restore_checkpoint(
      ckpt, run.params, run.tx.init(run.params))
  return cfg, tuple(vocab), run.apply_fn, params


def generate(apply_fn, params, prompt_ids, length: int, seq_len: int,
             key: jax.Array, temperature: float = 1.0) -> np.ndarray:
  """Samples ``length`` tokens after ``prompt_ids`` with a sliding window.

  The window is a fixed ``[1, seq_len]`` buffer (left-padded), so the jitted
  step compiles once.
  """
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0; got {temperature}.")
  prompt = list(prompt_ids) or [0]

  @jax.jit
  def next_token(params, window, n_valid, key):
    logits = apply_fn(params, window[None])[0, n_valid - 1]
    return jax.random.categorical(key, logits / temperature)

  out = list(prompt)
  for i in range(length):
    ctx = out[-seq_len:]
    window = np.zeros(seq_len, np.int32)
    window[:len(ctx)] = ctx
    tok = next_token(params, jnp.asarray(window), len(ctx),
                     jax.random.fold_in(key, i))
    out.append(int(tok))
  return np.asarray(out[len(prompt):], np.int32)


def sample_text(run_dir, prompt: str, length: int, seed: int = 0,
                temperature: float = 1.0) -> str:
  cfg, vocab, apply_fn, params = load_run(run_dir)
  unknown = sorted(set(prompt) - set(vocab))
  if unknown:
    raise ValueError(f"prompt has characters outside the vocabulary: {unknown}.")
  ids = data_lib.encode(prompt, vocab)
  gen = generate(apply_fn, params, ids, length, cfg.model.seq_len,
                 jax.random.PRNGKey(seed), temperature)
  return prompt + data_lib.decode(gen, vocab)
