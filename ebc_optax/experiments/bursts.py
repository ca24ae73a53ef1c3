"""Mid-training bursts a real pipeline produces: bad batches and LR spikes.

The spike suite (``ebc-optax spikes``) replaces ``train.burst_steps`` training
batches from ``train.burst_start`` on with one kind of corruption, or
multiplies the learning rate for those steps, and measures the damage on the
clean validation split. Kinds (:data:`BURST_KINDS`):

* ``repeat`` — a degenerate batch: every input and target is one token (drawn
  per step), as from a padding or de-duplication bug;
* ``random`` — uniformly random tokens, as from a corrupted shard or a
  tokenizer mismatch;
* ``markov`` — text of another distribution: a random sparse Markov
  language over the same vocabulary (:func:`~ebc_optax.experiments.data.
  markov_language`), as from a mislabelled data source;
* ``shuffle`` — clean inputs with their targets shuffled along the sequence,
  as from a misaligned label pipeline;
* ``lr`` — clean batches with the learning rate multiplied by
  ``train.burst_lr_factor`` (a schedule or config bug), applied as each base
  optimizer's own learning-rate schedule, so the base proposes the large step
  and everything after it (EBC, weight decay) sees it.

Everything is a pure function of ``(step, key)`` and jittable: the corrupted
batch is selected with ``jnp.where`` on a traced step, so the train step
compiles once.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ebc_optax.experiments import data as data_lib

BURST_KINDS = ("none", "repeat", "random", "markov", "shuffle", "lr")
DATA_KINDS = ("repeat", "random", "markov", "shuffle")
# The other distribution of the ``markov`` kind: a fixed language and stream.
MARKOV_SEED = 1234
MARKOV_SUPPORT = 4
MARKOV_TOKENS = 50_000


def in_burst(step: jax.Array | int, start: int, steps: int) -> jax.Array:
  """Whether ``step`` is one of the ``steps`` burst steps from ``start`` on."""
  step = jnp.asarray(step, jnp.int32)
  return jnp.logical_and(step >= start, step < start + steps)


def other_distribution(vocab_size: int, length: int = MARKOV_TOKENS) -> np.ndarray:
  """int32 ``[length]`` tokens of a Markov language over ``vocab_size`` ids."""
  lang = data_lib.markov_language(MARKOV_SEED, vocab_size, MARKOV_SUPPORT)
  return data_lib.sample_markov(lang, length,
                                np.random.default_rng(MARKOV_SEED))


def corrupt_batch(kind: str, inputs: jax.Array, targets: jax.Array,
                  key: jax.Array, vocab_size: int,
                  other_tokens: jax.Array | None = None
                  ) -> tuple[jax.Array, jax.Array]:
  """The ``kind`` corruption of one ``[B, T]`` batch (see the module doc).

  Args:
    kind: one of :data:`DATA_KINDS`.
    inputs, targets: int32 ``[B, T]`` clean batch.
    key: PRNG key of this step.
    vocab_size: number of token ids.
    other_tokens: int ``[N]`` token stream of the other distribution
      (``kind="markov"``).

  Returns:
    ``(inputs, targets)`` of the same shapes and dtype.
  """
  b, t = inputs.shape
  if kind == "repeat":
    token = jax.random.randint(key, (), 0, vocab_size, jnp.int32)
    full = jnp.full((b, t), token, jnp.int32)
    return full, full
  if kind == "random":
    window = jax.random.randint(key, (b, t + 1), 0, vocab_size, jnp.int32)
    return window[:, :-1], window[:, 1:]
  if kind == "markov":
    if other_tokens is None:
      raise ValueError("kind='markov' needs other_tokens (other_distribution).")
    return data_lib.sample_batch(other_tokens, key, 0, b, t)
  if kind == "shuffle":
    perm = jax.vmap(lambda k: jax.random.permutation(k, t))(
        jax.random.split(key, b))
    return inputs, jnp.take_along_axis(targets, perm, axis=1)
  raise ValueError(f"corrupt_batch: kind must be one of {DATA_KINDS}; got {kind!r}.")


def burst_batch(kind: str, step: jax.Array, inputs: jax.Array,
                targets: jax.Array, key: jax.Array, *, start: int, steps: int,
                vocab_size: int, other_tokens: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
  """The training batch of ``step``: corrupted inside the burst, else clean.

  ``kind`` ``"none"`` and ``"lr"`` leave every batch clean.
  """
  if kind not in DATA_KINDS:
    return inputs, targets
  bad_in, bad_tg = corrupt_batch(kind, inputs, targets,
                                 jax.random.fold_in(key, step), vocab_size,
                                 other_tokens)
  on = in_burst(step, start, steps)
  return jnp.where(on, bad_in, inputs), jnp.where(on, bad_tg, targets)


def learning_rate(lr: float, kind: str, *, start: int, steps: int,
                  factor: float) -> float | Callable[[jax.Array], jax.Array]:
  """The base optimizer's learning rate: ``lr``, or ``lr × factor`` during an
  ``lr`` burst (a schedule of the optimizer's own update count, which equals
  the training step while no update is skipped)."""
  if kind != "lr":
    return lr

  def schedule(count):
    return jnp.where(in_burst(count, start, steps), lr * factor, lr)
  return schedule
