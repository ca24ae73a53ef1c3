"""A zoo of real models: EBC against its base optimizer on the field's layouts.

Every model here is built *by the library that owns the layout* — Hugging Face
Flax GPT-2 (tied head) and llama (untied head), an ``eqx.nn`` decoder, Flax
linen (auto-named, explicitly named, ``nn.scan``-stacked), Flax NNX
(``nnx.List``, ``nnx.vmap``/``nnx.scan``-stacked) and this repository's GPT —
from a random init, with no download, and tiny (width 32, 2 blocks, vocab 48,
sequence 32). Each builder returns a :class:`ZooModel`: the parameters as the
library holds them, a pure ``logits_fn(params, tokens[B, T]) -> [B, T, V]``
and the ``stacked=`` option EBC needs for it.

:func:`compare` trains two arms from the same init on *identical* batches of a
learnable Markov language (:func:`training_windows`): the base optimizer alone
and ``ebc_optax.wrap(base, logits_fn, stacked=...)``. Each arm is one jitted
step that also returns EBC's ``c``, ``S`` and ``rho`` (read with
:func:`ebc_optax.telemetry` inside the step), so the loop never waits on the
host. The learning rate and the base are arguments of the step (the extra
arguments ``learning_rate`` and ``optimizer_index`` of
:func:`switch_optimizer`), so every base and the burst run of a model are one
compiled program per arm, cached per model, seed and EBC options.

Example::

  from ebc_optax.experiments import zoo
  result = zoo.compare("linen_scan", "adam", steps=300)
  result["loss_ratio"], result["refused"], result["compiles_ebc"]
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

import ebc_optax
from ebc_optax.experiments import data as data_lib
from ebc_optax.experiments import guards
from ebc_optax.experiments import model as model_lib

VOCAB_SIZE = 48  # not the width: a head is told by its vocab-sized axis
SEQ_LEN = 32
D_MODEL = 32
NUM_HEADS = 2
NUM_BLOCKS = 2
MLP_RATIO = 2
BATCH_SIZE = 8
STREAM_TOKENS = 1 << 16
FINAL_WINDOW = 20  # steps averaged for the final loss
CUT_BELOW = 0.999  # a step with 0 < c < CUT_BELOW counts as cut

LogitsFn = Callable[[Any, jax.Array], jax.Array]


class ZooModel(NamedTuple):
  """A model of the zoo.

  Attributes:
    name: the key in :data:`MODELS`.
    params: the trainable parameters, as the owning library holds them.
    logits_fn: ``(params, tokens int32 [B, T]) -> logits [B, T, V]``, pure.
    stacked: the ``stacked=`` option of EBC (label prefixes of layers
      stacked on axis 0), or None for unrolled blocks.
  """
  name: str
  params: Any
  logits_fn: LogitsFn
  stacked: tuple[str, ...] | None


def _positions(tokens: jax.Array) -> jax.Array:
  b, t = tokens.shape
  return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


# --- Hugging Face Flax --------------------------------------------------------

def _hf_logits_fn(module: Any) -> LogitsFn:
  """``logits_fn`` of a Hugging Face Flax causal LM's linen module."""

  def logits_fn(params, tokens):
    return module.apply({"params": params}, tokens, jnp.ones_like(tokens),
                        _positions(tokens), deterministic=True).logits

  return logits_fn


def hf_gpt2(seed: int = 0) -> ZooModel:
  """``transformers.FlaxGPT2LMHeadModel`` (tied head, learned positions)."""
  import transformers
  config = transformers.GPT2Config(
      vocab_size=VOCAB_SIZE, n_positions=SEQ_LEN, n_embd=D_MODEL,
      n_layer=NUM_BLOCKS, n_head=NUM_HEADS, n_inner=MLP_RATIO * D_MODEL,
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
  model = transformers.FlaxGPT2LMHeadModel(config, seed=seed)
  return ZooModel("hf_gpt2", model.params, _hf_logits_fn(model.module), None)


def hf_llama(seed: int = 0) -> ZooModel:
  """``transformers.FlaxLlamaForCausalLM`` (untied head, RoPE, RMSNorm)."""
  import transformers
  config = transformers.LlamaConfig(
      vocab_size=VOCAB_SIZE, hidden_size=D_MODEL,
      intermediate_size=MLP_RATIO * D_MODEL, num_hidden_layers=NUM_BLOCKS,
      num_attention_heads=NUM_HEADS, num_key_value_heads=NUM_HEADS,
      max_position_embeddings=2 * SEQ_LEN, tie_word_embeddings=False)
  model = transformers.FlaxLlamaForCausalLM(config, seed=seed)
  return ZooModel("hf_llama", model.params, _hf_logits_fn(model.module), None)


# --- equinox ------------------------------------------------------------------

@functools.cache
def _equinox_classes() -> tuple[type, type]:
  """The equinox decoder's classes, defined on first use (equinox is
  optional)."""
  import equinox as eqx

  class EqxBlock(eqx.Module):
    """Pre-LN block on one sequence ``[T, d]``."""
    ln1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    ln2: eqx.nn.LayerNorm
    fc: eqx.nn.Linear
    proj: eqx.nn.Linear

    def __init__(self, key):
      k1, k2, k3 = jax.random.split(key, 3)
      self.ln1 = eqx.nn.LayerNorm(D_MODEL)
      self.attn = eqx.nn.MultiheadAttention(NUM_HEADS, D_MODEL, key=k1)
      self.ln2 = eqx.nn.LayerNorm(D_MODEL)
      self.fc = eqx.nn.Linear(D_MODEL, MLP_RATIO * D_MODEL, key=k2)
      self.proj = eqx.nn.Linear(MLP_RATIO * D_MODEL, D_MODEL, key=k3)

    def __call__(self, x):
      t = x.shape[0]
      h = jax.vmap(self.ln1)(x)
      x = x + self.attn(h, h, h, mask=jnp.tril(jnp.ones((t, t), bool)))
      h = jax.nn.gelu(jax.vmap(self.fc)(jax.vmap(self.ln2)(x)))
      return x + jax.vmap(self.proj)(h)

  class EqxDecoder(eqx.Module):
    """Token + position embeddings, a list of blocks, final LN, untied head."""
    embed: eqx.nn.Embedding
    pos_embed: eqx.nn.Embedding
    blocks: list
    ln_f: eqx.nn.LayerNorm
    lm_head: eqx.nn.Linear

    def __init__(self, key):
      keys = jax.random.split(key, NUM_BLOCKS + 3)
      self.embed = eqx.nn.Embedding(VOCAB_SIZE, D_MODEL, key=keys[0])
      self.pos_embed = eqx.nn.Embedding(SEQ_LEN, D_MODEL, key=keys[1])
      self.blocks = [EqxBlock(k) for k in keys[2:-1]]
      self.ln_f = eqx.nn.LayerNorm(D_MODEL)
      self.lm_head = eqx.nn.Linear(D_MODEL, VOCAB_SIZE, key=keys[-1])

    def __call__(self, tokens):  # one sequence [T]
      x = (jax.vmap(self.embed)(tokens)
           + jax.vmap(self.pos_embed)(jnp.arange(tokens.shape[0])))
      for block in self.blocks:
        x = block(x)
      return jax.vmap(self.lm_head)(jax.vmap(self.ln_f)(x))

  return EqxBlock, EqxDecoder


def equinox(seed: int = 0) -> ZooModel:
  """A pre-LN decoder of ``eqx.nn`` layers, blocks in a Python list."""
  import equinox as eqx
  _, decoder = _equinox_classes()
  model = decoder(jax.random.PRNGKey(seed))
  params, static = eqx.partition(model, eqx.is_array)

  def logits_fn(p, tokens):
    return jax.vmap(eqx.combine(p, static))(tokens)

  return ZooModel("equinox", params, logits_fn, None)


# --- Flax linen ---------------------------------------------------------------

class Block(nn.Module):
  """A linen pre-LN block (named ``Block`` so auto-naming gives ``Block_i``).

  Returns ``(x, None)`` when ``scanned``, the carry / output pair of
  ``nn.scan``.
  """
  scanned: bool = False

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    h = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(
        num_heads=NUM_HEADS, deterministic=True)(h, mask=mask)
    h = nn.gelu(nn.Dense(MLP_RATIO * D_MODEL)(nn.LayerNorm()(x)))
    x = x + nn.Dense(D_MODEL)(h)
    return (x, None) if self.scanned else x


class LinenDecoder(nn.Module):
  """A linen decoder; ``layout`` ``"auto"`` (no names), ``"named"`` or
  ``"scan"`` (named, blocks under an auto-named ``nn.scan``)."""
  layout: str = "auto"

  @nn.compact
  def __call__(self, tokens):
    named = self.layout != "auto"
    name = lambda n: n if named else None  # noqa: E731
    x = nn.Embed(VOCAB_SIZE, D_MODEL, name=name("embed"))(tokens)
    x = x + nn.Embed(SEQ_LEN, D_MODEL, name=name("pos_embed"))(
        jnp.arange(tokens.shape[1]))[None]
    if self.layout == "scan":
      stack = nn.scan(Block, variable_axes={"params": 0},
                      split_rngs={"params": True}, length=NUM_BLOCKS)
      x, _ = stack(scanned=True)(x)  # auto-named ScanBlock_0
    else:
      for i in range(NUM_BLOCKS):
        x = Block(name=name(f"block_{i}"))(x)
    x = nn.LayerNorm(name=name("ln_f"))(x)
    return nn.Dense(VOCAB_SIZE, name=name("lm_head"))(x)


def _linen_model(name: str, layout: str, seed: int,
                 stacked: tuple[str, ...] | None) -> ZooModel:
  module = LinenDecoder(layout=layout)
  tokens = jnp.zeros((1, SEQ_LEN), jnp.int32)
  params = module.init(jax.random.PRNGKey(seed), tokens)

  def logits_fn(p, tokens):
    return module.apply(p, tokens)

  return ZooModel(name, params, logits_fn, stacked)


def linen_auto(seed: int = 0) -> ZooModel:
  """linen, auto-named: ``Embed_0``, ``Embed_1``, ``Block_0``, ``Block_1``,
  ``LayerNorm_0``, ``Dense_0`` (the untied head) under ``params``."""
  return _linen_model("linen_auto", "auto", seed, None)


def linen_named(seed: int = 0) -> ZooModel:
  """linen, named: ``embed``, ``pos_embed``, ``block_i``, ``ln_f``,
  ``lm_head``."""
  return _linen_model("linen_named", "named", seed, None)


def linen_scan(seed: int = 0) -> ZooModel:
  """linen with the blocks under ``nn.scan`` (``params/ScanBlock_0``)."""
  return _linen_model("linen_scan", "scan", seed, ("params/ScanBlock_0",))


# --- Flax NNX -----------------------------------------------------------------

class NnxBlock(nnx.Module):
  """An NNX pre-LN block."""

  def __init__(self, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(D_MODEL, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(NUM_HEADS, D_MODEL, decode=False,
                                       rngs=rngs)
    self.ln2 = nnx.LayerNorm(D_MODEL, rngs=rngs)
    self.fc = nnx.Linear(D_MODEL, MLP_RATIO * D_MODEL, rngs=rngs)
    self.proj = nnx.Linear(MLP_RATIO * D_MODEL, D_MODEL, rngs=rngs)

  def __call__(self, x):
    mask = nnx.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.proj(jax.nn.gelu(self.fc(self.ln2(x))))


@nnx.split_rngs(splits=NUM_BLOCKS)
@nnx.vmap(in_axes=(0,), out_axes=0)
def _stacked_blocks(rngs: nnx.Rngs) -> NnxBlock:
  """``NUM_BLOCKS`` blocks as one module with a leading layer axis."""
  return NnxBlock(rngs)


@nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
def _run_stack(x: jax.Array, block: NnxBlock) -> jax.Array:
  return block(x)


class NnxDecoder(nnx.Module):
  """Embeddings, blocks (an ``nnx.List``, or one ``nnx.vmap``-made module run
  by ``nnx.scan`` when ``scan``), final LN and an untied head."""

  def __init__(self, scan: bool, rngs: nnx.Rngs):
    self.scan = scan
    self.embed = nnx.Embed(VOCAB_SIZE, D_MODEL, rngs=rngs)
    self.pos_embed = nnx.Embed(SEQ_LEN, D_MODEL, rngs=rngs)
    self.blocks = (_stacked_blocks(rngs) if scan else
                   nnx.List([NnxBlock(rngs) for _ in range(NUM_BLOCKS)]))
    self.ln_f = nnx.LayerNorm(D_MODEL, rngs=rngs)
    self.lm_head = nnx.Linear(D_MODEL, VOCAB_SIZE, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens) + self.pos_embed(jnp.arange(tokens.shape[1]))[None]
    if self.scan:
      x = _run_stack(x, self.blocks)
    else:
      for block in self.blocks:
        x = block(x)
    return self.lm_head(self.ln_f(x))


def _nnx_model(name: str, scan: bool, seed: int,
               stacked: tuple[str, ...] | None) -> ZooModel:
  graphdef, params, rest = nnx.split(NnxDecoder(scan, nnx.Rngs(seed)),
                                     nnx.Param, ...)

  def logits_fn(p, tokens):
    return nnx.merge(graphdef, p, rest)(tokens)

  return ZooModel(name, params, logits_fn, stacked)


def nnx_list(seed: int = 0) -> ZooModel:
  """NNX, blocks in ``nnx.List``; params ``nnx.state(model, nnx.Param)``."""
  return _nnx_model("nnx_list", False, seed, None)


def nnx_scan(seed: int = 0) -> ZooModel:
  """NNX, blocks made by ``nnx.vmap`` and run by ``nnx.scan`` (``blocks``)."""
  return _nnx_model("nnx_scan", True, seed, ("blocks",))


# --- this repository's GPT ----------------------------------------------------

def repo_gpt(seed: int = 0) -> ZooModel:
  """:func:`ebc_optax.experiments.model.init_gpt` (RoPE, ``nnx.List``)."""
  apply_fn, params = model_lib.init_gpt(
      jax.random.PRNGKey(seed), VOCAB_SIZE, num_blocks=NUM_BLOCKS,
      d_embed=D_MODEL, num_heads=NUM_HEADS, seq_len=SEQ_LEN,
      mlp_ratio=MLP_RATIO)
  return ZooModel("repo_gpt", params, apply_fn, None)


MODELS: dict[str, Callable[[int], ZooModel]] = {
    "hf_gpt2": hf_gpt2,
    "hf_llama": hf_llama,
    "equinox": equinox,
    "linen_auto": linen_auto,
    "linen_named": linen_named,
    "linen_scan": linen_scan,
    "nnx_list": nnx_list,
    "nnx_scan": nnx_scan,
    "repo_gpt": repo_gpt,
}


@functools.cache
def build(name: str, seed: int = 0) -> ZooModel:
  """The model ``name`` of :data:`MODELS`, built once per ``(name, seed)``."""
  if name not in MODELS:
    raise ValueError(f"model must be one of {sorted(MODELS)}; got {name!r}.")
  return MODELS[name](seed)


# --- data ---------------------------------------------------------------------

@functools.cache
def training_stream(seed: int = 0) -> np.ndarray:
  """A fixed int32 token stream of the ``VOCAB_SIZE``-state Markov language."""
  lang = data_lib.markov_language(seed=seed, vocab_size=VOCAB_SIZE)
  return data_lib.sample_markov(lang, STREAM_TOKENS,
                                np.random.default_rng(seed))


def training_windows(steps: int, seed: int = 0,
                     burst: tuple[int, int] | None = None) -> np.ndarray:
  """int32 ``[steps, B, T + 1]``: the windows of every step, fixed by seed.

  Step ``s`` draws its ``B`` window offsets from
  ``numpy.random.default_rng((seed, s))``, so every arm and every run of a
  seed sees the same batches. With ``burst=(start, length)`` the windows of
  steps ``[start, start + length)`` are uniformly random tokens instead
  (from the same per-step generator).

  Args:
    steps: the number of steps.
    seed: the data seed (language, stream and offsets).
    burst: ``(start, length)`` of a random-token burst, or None.

  Returns:
    The windows; inputs are ``[..., :-1]``, targets ``[..., 1:]``.
  """
  stream = training_stream(seed)
  starts = np.arange(SEQ_LEN + 1)
  out = np.empty((steps, BATCH_SIZE, SEQ_LEN + 1), np.int32)
  lo, hi = burst if burst is not None else (0, 0)
  for s in range(steps):
    rng = np.random.default_rng((seed, s))
    if lo <= s < lo + hi:
      out[s] = rng.integers(0, VOCAB_SIZE, out.shape[1:], dtype=np.int32)
    else:
      offsets = rng.integers(0, stream.size - SEQ_LEN - 1, BATCH_SIZE)
      out[s] = stream[offsets[:, None] + starts]
  return out


def next_token_loss(logits_fn: LogitsFn, params: Any,
                    windows: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy (nats) of ``windows`` int32 [B, T + 1]."""
  logits = logits_fn(params, windows[:, :-1]).astype(jnp.float32)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      logits, windows[:, 1:]))


# --- base optimizers ----------------------------------------------------------

def scale_by_fed_learning_rate() -> optax.GradientTransformationExtraArgs:
  """``u -> -learning_rate · u`` with ``learning_rate`` an extra argument.

  Feeding the rate per step (rather than a schedule inside the state) makes
  every schedule the same program.
  """

  def init(params):
    del params
    return optax.EmptyState()

  def update(updates, state, params=None, *, learning_rate=None, **extra_args):
    del params, extra_args
    if learning_rate is None:
      raise ValueError("scale_by_fed_learning_rate needs the extra argument "
                       "learning_rate.")
    return jax.tree.map(lambda u: (-learning_rate * u).astype(u.dtype),
                        updates), state

  return optax.GradientTransformationExtraArgs(init, update)


def switch_optimizer(optimizers: Sequence[optax.GradientTransformation]
                     ) -> optax.GradientTransformationExtraArgs:
  """``optimizers[optimizer_index]``, the index an extra argument: one program.

  The state holds every optimizer's state; ``jax.lax.switch`` runs the
  chosen one and passes the others' states through untouched, so a run with
  index ``i`` makes the computation of ``optimizers[i]`` alone (equal up to
  rounding: the program fuses differently). The zoo uses it so that all its
  bases are one compiled step per arm.

  Args:
    optimizers: the transformations (their updates must share dtypes).

  Returns:
    A transformation whose ``update`` needs ``optimizer_index`` (int32
    scalar); other extra arguments are passed on.
  """
  txs = tuple(optax.with_extra_args_support(t) for t in optimizers)

  def init(params):
    return tuple(t.init(params) for t in txs)

  def update(updates, state, params=None, *, optimizer_index=None,
             **extra_args):
    if optimizer_index is None:
      raise ValueError("switch_optimizer needs the extra argument "
                       "optimizer_index.")

    def branch(i):
      def run(_):
        u, s = txs[i].update(updates, state[i], params, **extra_args)
        # Same types in every branch: weakly typed scalars made strong.
        s = jax.tree.map(
            lambda new, old: jnp.asarray(new, jnp.result_type(old)), s,
            state[i])
        return u, state[:i] + (s,) + state[i + 1:]
      return run

    return jax.lax.switch(optimizer_index, [branch(i) for i in range(len(txs))],
                          None)

  return optax.GradientTransformationExtraArgs(init, update)


ADAM_LR = 2e-3
WARMUP_STEPS = 100


def _fed_adam() -> optax.GradientTransformationExtraArgs:
  return optax.chain(optax.scale_by_adam(), scale_by_fed_learning_rate())


# Base families: bases of one family differ only in the fed learning rate.
# prodigy sets its own step size (lr=1.0, its default) and ignores the fed one.
FAMILIES: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adam": _fed_adam,
    "prodigy": optax.contrib.prodigy,
}


class Base(NamedTuple):
  """A base optimizer of the zoo.

  Attributes:
    family: the key in :data:`FAMILIES` of its transformation.
    learning_rate: ``step -> rate`` (an optax schedule) fed to the step as
      the extra argument ``learning_rate``.
  """
  family: str
  learning_rate: optax.Schedule

  def optimizer(self) -> optax.GradientTransformation:
    """The base alone (a fresh transformation; needs ``learning_rate``)."""
    return FAMILIES[self.family]()


BASES: dict[str, Base] = {
    "adam": Base("adam", optax.constant_schedule(ADAM_LR)),
    "adam_warmup": Base("adam", optax.join_schedules(
        [optax.linear_schedule(0.0, ADAM_LR, WARMUP_STEPS),
         optax.constant_schedule(ADAM_LR)], [WARMUP_STEPS])),
    "prodigy": Base("prodigy", optax.constant_schedule(1.0)),
}


def all_bases() -> optax.GradientTransformationExtraArgs:
  """Every family of :data:`FAMILIES` behind one :func:`switch_optimizer`."""
  return switch_optimizer([make() for make in FAMILIES.values()])


def family_index(base_name: str) -> int:
  """The ``optimizer_index`` of base ``base_name`` in :func:`all_bases`."""
  if base_name not in BASES:
    raise ValueError(f"base must be one of {sorted(BASES)}; got {base_name!r}.")
  return list(FAMILIES).index(BASES[base_name].family)


# --- training -----------------------------------------------------------------

class StepRecord(NamedTuple):
  """What one jitted step returns besides params and state (float32 scalars;
  EBC's numbers are NaN on the base arm)."""
  loss: jax.Array
  c: jax.Array
  S: jax.Array
  rho: jax.Array
  skipped: jax.Array  # refusals so far: EBC's (c = 0), wrap's gradient and loss checks
  decision: jax.Array  # what the spike guard did this step (guards.decision)


class Arm(NamedTuple):
  """One arm: its optimizer (all bases), its jitted step, its trace count.

  ``step(params, state, windows, learning_rate, optimizer_index)`` ->
  ``(params, state, StepRecord)``; ``traces[0]`` counts its traces (a
  Python counter in the traced function), i.e. its compiled programs.
  """
  tx: optax.GradientTransformationExtraArgs
  step: Callable[..., Any]
  traces: list[int]


def make_arm(model: ZooModel, tx: optax.GradientTransformation,
             with_ebc: bool, with_loss: bool = False) -> Arm:
  """The jitted train step of ``tx`` on ``model`` (next-token loss; passed
  to ``tx.update`` as ``loss=`` when ``with_loss``, for a skip-step, and
  with EBC, for ``wrap``'s loss check)."""
  tx = optax.with_extra_args_support(tx)
  traces = [0]
  nan = jnp.full([], jnp.nan, jnp.float32)
  loss_fn = functools.partial(next_token_loss, model.logits_fn)

  def step(params, state, windows, learning_rate, optimizer_index):
    traces[0] += 1  # runs once per trace, not per call
    loss, grads = jax.value_and_grad(loss_fn)(params, windows)
    extra = {"loss": loss} if with_loss or with_ebc else {}
    updates, state = tx.update(grads, state, params, batch=windows[:, :-1],
                               learning_rate=learning_rate,
                               optimizer_index=optimizer_index, **extra)
    params = optax.apply_updates(params, updates)
    decision = guards.decision(state)
    if with_ebc:
      tel = ebc_optax.telemetry(state)
      skipped = (tel["total_refused"] + tel.get("grad_outliers", 0)
                 + tel.get("loss_outliers", 0))
      rec = StepRecord(loss, tel["c"], tel["S"], tel.get("rho", nan), skipped,
                       decision)
    else:
      rec = StepRecord(loss, nan, nan, nan, nan, decision)
    return params, state, jax.tree.map(lambda x: x.astype(jnp.float32), rec)

  return Arm(tx, jax.jit(step), traces)


def _options_key(options: Mapping[str, Any]) -> tuple[Any, ...] | None:
  key = tuple(sorted(options.items()))
  try:
    hash(key)
  except TypeError:
    return None
  return key


def _build_arms(model_name: str, seed: int,
                options: Mapping[str, Any]) -> tuple[Arm, Arm]:
  model = build(model_name, seed)
  ebc_tx = ebc_optax.wrap(all_bases(), model.logits_fn, stacked=model.stacked,
                          **options)
  return (make_arm(model, all_bases(), with_ebc=False),
          make_arm(model, ebc_tx, with_ebc=True))


@functools.cache
def _cached_arms(model_name: str, seed: int,
                 options: tuple[Any, ...]) -> tuple[Arm, Arm]:
  return _build_arms(model_name, seed, dict(options))


def arms(model_name: str, seed: int = 0,
         ebc_options: Mapping[str, Any] | None = None) -> tuple[Arm, Arm]:
  """The (base, EBC) arms of a model: one program each for every base and
  burst, cached per model, seed and (hashable) EBC options."""
  options = dict(ebc_options or {})
  key = _options_key(options)
  if key is None:
    return _build_arms(model_name, seed, options)
  return _cached_arms(model_name, seed, key)


def run_arm(arm: Arm, params: Any, windows: np.ndarray, base_name: str
            ) -> StepRecord:
  """Trains ``len(windows)`` steps of base ``base_name`` (with EBC or not).

  Returns:
    The per-step records, numpy ``[steps]``; nothing waits on the host
    before the last step.
  """
  steps = windows.shape[0]
  rates = np.broadcast_to(np.asarray(
      BASES[base_name].learning_rate(jnp.arange(steps)), np.float32), (steps,))
  index = np.int32(family_index(base_name))
  state = arm.tx.init(params)
  records = []
  for s in range(steps):
    params, state, rec = arm.step(params, state, windows[s], rates[s], index)
    records.append(rec)
  return StepRecord(*(np.asarray(x) for x in jax.device_get(
      jax.tree.map(lambda *xs: jnp.stack(xs), *records))))


def _nan_range(x: np.ndarray) -> tuple[float, float]:
  x = x[np.isfinite(x)]
  return (float(x.min()), float(x.max())) if x.size else (math.nan, math.nan)


def compare(model_name: str, base_name: str, steps: int = 300, seed: int = 0,
            burst: tuple[int, int] | None = None,
            ebc_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """Trains the base alone and EBC around it, from one init on one batch stream.

  Args:
    model_name: a key of :data:`MODELS`.
    base_name: a key of :data:`BASES`.
    steps: training steps per arm.
    seed: model init and data seed.
    burst: ``(start, length)``: the windows of those steps are uniformly
      random tokens, in both arms.
    ebc_options: keyword arguments of :func:`ebc_optax.wrap` besides
      ``stacked`` (the model's); None for EBC's defaults.

  Returns:
    A dict: ``model``, ``base``, ``steps``, ``seed``, ``burst``;
    ``base_final`` / ``ebc_final`` (mean train loss of the last
    ``FINAL_WINDOW`` steps outside the burst) and ``loss_ratio`` (EBC /
    base); ``base_loss``, ``ebc_loss``, ``c``, ``S``, ``rho`` (numpy
    ``[steps]``); ``refused`` (steps refused whole: ``c == 0`` with ``S >
    0``, or the batch refused by ``wrap``'s gradient-norm check, whose
    ``c`` and ``S`` are those of the step before), ``grad_refused`` (the
    latter alone), ``cut``
    (``0 < c < CUT_BELOW``), ``refused_steps`` (their indices); ``rho_min``
    / ``rho_max`` over probe steps (NaN ignored; NaN if none);
    ``refused_in_burst`` (None without a burst); ``compiles_base`` /
    ``compiles_ebc`` (traces of each arm's step so far: one program serves
    every base and burst of the model); ``wall_s``.
  """
  start = time.perf_counter()
  family_index(base_name)  # validates the name before any work
  model = build(model_name, seed)
  base_arm, ebc_arm = arms(model_name, seed, ebc_options)
  windows = training_windows(steps, seed, burst)
  base_rec = run_arm(base_arm, model.params, windows, base_name)
  ebc_rec = run_arm(ebc_arm, model.params, windows, base_name)
  clean = np.ones(steps, bool)
  if burst is not None:
    clean[burst[0]:burst[0] + burst[1]] = False
  last = np.flatnonzero(clean)[-FINAL_WINDOW:]
  base_final = float(base_rec.loss[last].mean())
  ebc_final = float(ebc_rec.loss[last].mean())
  c, s = ebc_rec.c, ebc_rec.S
  # A step refused by EBC (c = 0) or by wrap's gradient-norm check: the
  # count of either went up on it.
  refused = np.diff(ebc_rec.skipped, prepend=0.0) > 0
  grad_refused = refused & ~((c == 0) & (s > 0))
  rho_min, rho_max = _nan_range(ebc_rec.rho)
  in_burst = None
  if burst is not None:
    in_burst = int(refused[burst[0]:burst[0] + burst[1]].sum())
  return {
      "model": model_name, "base": base_name, "steps": steps, "seed": seed,
      "burst": burst,
      "base_final": base_final, "ebc_final": ebc_final,
      "loss_ratio": ebc_final / base_final,
      "base_loss": base_rec.loss, "ebc_loss": ebc_rec.loss,
      "c": c, "S": s, "rho": ebc_rec.rho,
      "refused": int(refused.sum()),
      "grad_refused": int(grad_refused.sum()),
      "cut": int(((c > 0) & (c < CUT_BELOW)).sum()),
      "refused_steps": np.flatnonzero(refused).tolist(),
      "rho_min": rho_min, "rho_max": rho_max,
      "refused_in_burst": in_burst,
      "compiles_base": base_arm.traces[0],
      "compiles_ebc": ebc_arm.traces[0],
      "wall_s": time.perf_counter() - start,
  }


# --- spike guards on the zoo ---------------------------------------------------

# The spike guards measured on zoo models (the harness's names, see
# ebc_optax.experiments.study_design.guard_arms), all around Adam.
GUARDS = ("adam", "ebc_default", "skipstep_kept", "skipstep_leftout", "zclip")
# Random-token bursts (start, length) of spike_compare: 10 steps, and 50
# (longer than half of the 32-batch window wrap's gradient check had first).
ZOO_BURSTS = {"random": (200, 10), "long50": (200, 50)}
SMOOTH = 10  # steps of the moving average the damage is read from


def guard_arm(model_name: str, guard: str) -> Arm:
  """The jitted step of ``guard`` around the zoo's bases (Adam fed its LR),
  one program for every seed: the parameters are its argument, and the
  model's structure (which the step closes over) does not depend on the
  seed."""
  if guard not in GUARDS:
    raise ValueError(f"guard must be one of {GUARDS}; got {guard!r}.")
  return _guard_arm(model_name, guard)


@functools.cache
def _guard_arm(model_name: str, guard: str) -> Arm:
  model = build(model_name)
  base = all_bases()
  if guard == "adam":
    return make_arm(model, base, with_ebc=False)
  if guard == "ebc_default":
    return make_arm(model, ebc_optax.wrap(base, model.logits_fn,
                                          stacked=model.stacked), with_ebc=True)
  if guard == "zclip":
    return make_arm(model, optax.chain(guards.zclip(), base), with_ebc=False)
  tx = guards.skip_step(base, keep_skipped=guard == "skipstep_kept")
  return make_arm(model, tx, with_ebc=False, with_loss=True)


def _smooth(x: np.ndarray) -> np.ndarray:
  return np.convolve(x, np.ones(SMOOTH) / SMOOTH, mode="valid")


def spike_compare(model_name: str, guards_: Sequence[str] = GUARDS,
                  bursts: Mapping[str, tuple[int, int]] | None = None,
                  seeds: Sequence[int] = (0, 1, 2), steps: int = 400,
                  base_name: str = "adam") -> list[dict[str, Any]]:
  """Every guard on ``model_name``, with and without each burst, per seed.

  The loss of step ``s`` is measured on its batch before the step updates
  the parameters: on a fresh batch of the clean language it is a held-out
  estimate. Damage is read from its :data:`SMOOTH`-step moving average after
  the burst's last step, paired with the same guard and seed without the
  burst: ``peak`` (largest excess), ``final`` (mean excess of the last
  :data:`FINAL_WINDOW` steps); ``skipped_in_burst`` is the share of burst
  steps the guard skipped or refused, ``clean_skipped`` its skipped steps
  on the clean run.

  Returns:
    One dict per (guard, burst kind, seed).
  """
  bursts = dict(ZOO_BURSTS if bursts is None else bursts)
  rows = []
  for seed in seeds:
    model = build(model_name, seed)
    clean_windows = training_windows(steps, seed)
    ref = {g: run_arm(guard_arm(model_name, g), model.params,
                      clean_windows, base_name) for g in guards_}
    for kind, (start, length) in bursts.items():
      windows = training_windows(steps, seed, (start, length))
      for g in guards_:
        rec = run_arm(guard_arm(model_name, g), model.params, windows,
                      base_name)
        end = start + length
        excess = _smooth(rec.loss[end:]) - _smooth(ref[g].loss[end:])
        rows.append({
            "model": model_name, "guard": g, "kind": kind, "seed": seed,
            "peak": float(np.max(excess)) if np.all(np.isfinite(excess)) else math.inf,
            "final": float(np.mean(rec.loss[-FINAL_WINDOW:])
                           - np.mean(ref[g].loss[-FINAL_WINDOW:])),
            "skipped_in_burst": float(np.mean(rec.decision[start:end] == 2)),
            "clean_skipped": int(np.sum(ref[g].decision == 2)),
        })
  return rows


def spike_table(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
  """Per (model, kind, guard): mean ± sd over seeds of the damage, and the
  peak over Adam's (mean of the paired per-seed ratios' numerators over
  the mean of Adam's peaks)."""
  cells: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
  for r in rows:
    cells.setdefault((r["model"], r["kind"], r["guard"]), []).append(r)
  out = []
  for (model, kind, guard), rs in cells.items():
    adam = [r["peak"] for r in cells.get((model, kind, "adam"), [])]
    peak = np.array([r["peak"] for r in rs])
    out.append({
        "model": model, "kind": kind, "guard": guard, "seeds": len(rs),
        "peak": float(peak.mean()),
        "peak_sd": float(peak.std(ddof=1)) if len(rs) > 1 else 0.0,
        "vs_adam": float(peak.mean() / np.mean(adam)) if adam and np.mean(adam) > 0
        else None,
        "final": float(np.mean([r["final"] for r in rs])),
        "final_sd": float(np.std([r["final"] for r in rs], ddof=1))
        if len(rs) > 1 else 0.0,
        "skipped_in_burst": float(np.mean([r["skipped_in_burst"] for r in rs])),
        "clean_skipped": int(sum(r["clean_skipped"] for r in rs)),
    })
  return out


def budgeted_layers(model_name: str, seed: int = 0) -> tuple[str, ...]:
  """``ebc_optax.layers.budget_layers`` of the model with its ``stacked`` option."""
  model = build(model_name, seed)
  return ebc_optax.layers.budget_layers(model.params, stacked=model.stacked)
