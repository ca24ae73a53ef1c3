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
  and everything after it (EBC, weight decay) sees it;

and the kinds made to break median and z-score detectors, whose length is
their own (:data:`KIND_STEPS`; ``train.burst_steps`` sets the others'):

* ``long20``, ``long50`` — random-token batches for 20 and 50 steps (longer
  than half of EBC's 32-step window: a median detector's majority turns);
* ``recurring`` — one random-token batch every :data:`RECURRING_EVERY`
  steps, ten of them (the window spans 451 steps): isolated outliers that
  keep coming, so a z-score's σ grows if it keeps them;
* ``quarter`` — a quarter of each batch's rows replaced by random tokens for
  100 steps: a shifted distribution, not an outlier batch.

Everything is a pure function of ``(step, key)`` and jittable: the corrupted
batch is selected with ``jnp.where`` on a traced step, so the train step
compiles once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ebc_optax.experiments import data as data_lib

BURST_KINDS = ("none", "repeat", "random", "markov", "shuffle", "lr", "long20",
               "long50", "recurring", "quarter")
DATA_KINDS = ("repeat", "random", "markov", "shuffle", "long20", "long50",
              "recurring", "quarter")
RECURRING_EVERY = 50
# Kinds whose length is their own (steps from the first bad batch to the last).
KIND_STEPS = {"long20": 20, "long50": 50,
              "recurring": 9 * RECURRING_EVERY + 1, "quarter": 100}
# The other distribution of the ``markov`` kind: a fixed language and stream.
MARKOV_SEED = 1234
MARKOV_SUPPORT = 4
MARKOV_TOKENS = 50_000


def burst_length(kind: str, steps: int) -> int:
  """Steps from the first corrupted step to the last: the kind's own
  (:data:`KIND_STEPS`) or ``steps`` (``train.burst_steps``)."""
  return KIND_STEPS.get(kind, steps)


def in_burst(step: jax.Array | int, start: int, steps: int) -> jax.Array:
  """Whether ``step`` is one of the ``steps`` burst steps from ``start`` on."""
  step = jnp.asarray(step, jnp.int32)
  return jnp.logical_and(step >= start, step < start + steps)


def is_bad(kind: str, step: jax.Array | int, start: int, steps: int
           ) -> jax.Array:
  """Whether ``step``'s batch (or LR) is corrupted: every step of the window
  but for ``recurring``, whose bad batches are :data:`RECURRING_EVERY` apart.
  ``steps`` is the window's length (:func:`burst_length`)."""
  on = in_burst(step, start, steps)
  if kind == "recurring":
    step = jnp.asarray(step, jnp.int32)
    return jnp.logical_and(on, (step - start) % RECURRING_EVERY == 0)
  return on


def bad_steps(kind: str, start: int, steps: int) -> list[int]:
  """The corrupted steps of a burst (none for ``"none"``)."""
  if kind == "none":
    return []
  return [s for s in range(start, start + steps) if bool(is_bad(kind, s, start, steps))]


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
    kind: one of :data:`DATA_KINDS` (the long and recurring kinds are
      random tokens; ``quarter`` replaces the first ``B // 4`` rows).
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
  if kind in ("random", "long20", "long50", "recurring"):
    window = jax.random.randint(key, (b, t + 1), 0, vocab_size, jnp.int32)
    return window[:, :-1], window[:, 1:]
  if kind == "quarter":
    rows = max(1, b // 4)
    window = jax.random.randint(key, (rows, t + 1), 0, vocab_size, jnp.int32)
    return (inputs.at[:rows].set(window[:, :-1]),
            targets.at[:rows].set(window[:, 1:]))
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
  """The training batch of ``step``: corrupted on the burst's bad steps
  (:func:`is_bad`; ``steps`` is the window's length), else clean.

  ``kind`` ``"none"`` and ``"lr"`` leave every batch clean.
  """
  if kind not in DATA_KINDS:
    return inputs, targets
  bad_in, bad_tg = corrupt_batch(kind, inputs, targets,
                                 jax.random.fold_in(key, step), vocab_size,
                                 other_tokens)
  on = is_bad(kind, step, start, steps)
  return jnp.where(on, bad_in, inputs), jnp.where(on, bad_tg, targets)


def eval_points(kind: str, start: int, steps: int, offsets: Sequence[int],
                total: int) -> tuple[int, ...]:
  """The clean evaluations that measure a ``kind`` burst from ``start`` in a
  run of ``total`` steps: the step before it, inside it (after each bad
  batch for ``recurring``, every 25 steps for the others) and ``offsets``
  steps after its last bad step. ``steps``: ``train.burst_steps``."""
  n = burst_length(kind, steps)
  end = start + n - 1
  inside = (bad_steps(kind, start, n) if kind == "recurring"
            else range(start + 24, end, 25))
  points = {start - 1, *inside, *(end + k for k in offsets)}
  return tuple(sorted(p for p in points if 0 <= p < total))


def all_eval_points(start: int, steps: int, offsets: Sequence[int],
                    total: int) -> tuple[int, ...]:
  """The union of :func:`eval_points` over every kind: where a run without
  a burst is evaluated, so that it is the reference of each kind."""
  return tuple(sorted({p for kind in BURST_KINDS[1:]
                       for p in eval_points(kind, start, steps, offsets, total)}))


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
