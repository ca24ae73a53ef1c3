"""Flax NNX models for the experiments, with a pure functional interface.

Two models:

* :class:`GPT`: a causal character-level transformer (pre-LayerNorm blocks,
  causal multi-head self-attention, GELU MLP, residual connections) with rotary
  (``"rope"``) or learned (``"learned"``) positions.
* :class:`MLP`: a small classifier (Linear + GELU blocks and a linear head).

Attribute names are chosen so that EBC's default layer grouping
(:func:`ebc_optax.layers.default_layer_labels`) gives one budgeted layer per block
(``"blocks/0"``, ``"blocks/1"``, ...) and recognises the embedding / output
groups by name (``"tok_embed"``, ``"pos_embed"``, ``"lm_head"``, ``"head"``).

The optimiser and the EBC transform see the models through plain functions::

  apply_fn, params = init_gpt(jax.random.PRNGKey(0), vocab_size=65)
  logits = apply_fn(params, tokens)            # [B, T] int -> [B, T, V] float32

For energy-budget clipping the same forward pass also reports one activation
norm per layer group, recorded with ``Module.sow`` and collected with
``nnx.capture`` (no second forward pass)::

  fns = functional(GPT(65, rngs=nnx.Rngs(0)))
  logits, norms = fns.apply_with_activations(fns.params, tokens)
  # norms == {"tok_embed": ..., "blocks/0": ..., ..., "lm_head": ...}

The labels are those of :func:`ebc_optax.layers.default_layer_labels` of ``params``
and each value is :func:`ebc_optax.formulas.activation_norm` (per-token RMS of
the L2 norm, float32) of the group's activation: the *output* of an embedding,
the *input* (residual stream) of a block, the *input* of the output head.

``params`` is a nested ``dict`` of arrays (paths such as
``("blocks", 0, "attn", "qkv", "kernel")``) and ``apply_fn`` is a pure function
of it, so it works under ``jax.jit``, ``jax.grad`` and ``jax.jvp``.

Rotary embeddings are computed from the positions inside ``__call__``: there is
no cache and no state besides :class:`flax.nnx.Param`, so the forward pass is a
pure function of ``(params, tokens)`` and can be jitted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import ebc_optax

Params = dict[str, Any]
ApplyFn = Callable[[Params, jax.Array], jax.Array]
ActivationNorms = dict[str, jax.Array]
ApplyWithActivationsFn = Callable[[Params, jax.Array],
                                  tuple[jax.Array, ActivationNorms]]

# The name under which each layer group's activation norm is sown.
ACTIVATION_NORM = "activation_norm"

POSITIONS = ("rope", "learned")
PARAM_DTYPES = ("float32", "bfloat16")
ROPE_BASE = 10_000.0


# --- validation ----------------------------------------------------------------

def _positive_int(name: str, value: Any) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ValueError(f"{name} must be a positive int; got {value!r}.")
  return value


def _check_param_dtype(param_dtype: Any) -> jnp.dtype:
  try:
    dtype = jnp.dtype(param_dtype)
  except TypeError:
    dtype = None
  if dtype is None or dtype.name not in PARAM_DTYPES:
    raise ValueError(
        f"param_dtype must be one of {PARAM_DTYPES}; got {param_dtype!r}.")
  return dtype


# --- rotary embeddings -----------------------------------------------------------

def rope_angles(seq_len: int, head_dim: int,
                base: float = ROPE_BASE) -> tuple[jax.Array, jax.Array]:
  r"""Cosines and sines of the rotary angles, computed from the positions.

  .. math::
    \theta_{t,i} = t \cdot \mathrm{base}^{-2i/d_h}, \qquad
    i = 0, \dots, d_h/2 - 1 .

  Args:
    seq_len: number of positions ``T``.
    head_dim: per-head dimension ``d_h`` (even).
    base: the RoPE base frequency.

  Returns:
    ``(cos, sin)``, each float32 of shape ``[T, d_h/2]``.
  """
  inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * inv_freq[None, :]
  return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  r"""Rotates feature pairs ``(x_i, x_{i+d_h/2})`` by the rotary angles.

  .. math::
    (x_1, x_2) \mapsto (x_1 \cos\theta - x_2 \sin\theta,\;
                        x_2 \cos\theta + x_1 \sin\theta) .

  Args:
    x: ``[B, T, H, d_h]`` queries or keys.
    cos: ``[T, d_h/2]`` cosines from :func:`rope_angles`.
    sin: ``[T, d_h/2]`` sines from :func:`rope_angles`.

  Returns:
    The rotated ``x``, same shape and dtype (computed in float32).
  """
  x32 = x.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  cos, sin = cos[None, :, None, :], sin[None, :, None, :]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


# --- activation norms -------------------------------------------------------------

def record_activation_norm(module: nnx.Module, x: jax.Array) -> None:
  """Sows ``activation_norm(x)`` on ``module`` as an ``nnx.Intermediate``.

  ``module`` is the layer group the norm belongs to (a child may be passed by
  its parent), so the intermediate's path starts with the group's parameter
  path and :func:`activation_norms_by_label` can label it.
  """
  module.sow(nnx.Intermediate, ACTIVATION_NORM, ebc_optax.formulas.activation_norm(x),
             reduce_fn=lambda _, new: new, init_fn=lambda: None)


def activation_norms_by_label(intermediates: Any) -> ActivationNorms:
  """``{layer label: norm}`` from the captured intermediates of a forward pass.

  Args:
    intermediates: the ``nnx.Intermediate`` state from ``nnx.capture`` (or its
      pure dict), one scalar per layer group.

  Returns:
    A dict keyed by :func:`ebc_optax.layers.default_layer_labels` of the paths.

  Raises:
    ValueError: when two recorded norms fall in the same layer group.
  """
  if isinstance(intermediates, nnx.State):
    intermediates = nnx.to_pure_dict(intermediates)
  labels = jax.tree.leaves(ebc_optax.layers.default_layer_labels(intermediates))
  values = jax.tree.leaves(intermediates)
  out: ActivationNorms = {}
  for label, value in zip(labels, values):
    if label in out:
      raise ValueError(f"More than one activation norm recorded for layer "
                       f"{label!r}; record one per layer group.")
    out[label] = value
  return out


# --- GPT -------------------------------------------------------------------------

class CausalSelfAttention(nnx.Module):
  """Causal multi-head self-attention with a fused ``qkv`` projection."""

  def __init__(self, d_embed: int, num_heads: int, *, rope: bool,
               param_dtype: Any, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.head_dim = d_embed // num_heads
    self.rope = rope
    self.qkv = nnx.Linear(d_embed, 3 * d_embed, dtype=param_dtype,
                          param_dtype=param_dtype, rngs=rngs)
    self.proj = nnx.Linear(d_embed, d_embed, dtype=param_dtype,
                           param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
    shape = (b, t, self.num_heads, self.head_dim)
    q, k, v = q.reshape(shape), k.reshape(shape), v.reshape(shape)
    if self.rope:
      cos, sin = rope_angles(t, self.head_dim)
      q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
    scores = scores / math.sqrt(self.head_dim)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
    return self.proj(out)


class FeedForward(nnx.Module):
  """The transformer MLP: ``Linear -> GELU -> Linear``."""

  def __init__(self, d_embed: int, hidden: int, *, param_dtype: Any,
               rngs: nnx.Rngs):
    self.fc = nnx.Linear(d_embed, hidden, dtype=param_dtype,
                         param_dtype=param_dtype, rngs=rngs)
    self.proj = nnx.Linear(hidden, d_embed, dtype=param_dtype,
                           param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(jax.nn.gelu(self.fc(x)))


class Block(nnx.Module):
  """A pre-norm transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``."""

  def __init__(self, d_embed: int, num_heads: int, mlp_ratio: int, *,
               rope: bool, param_dtype: Any, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(d_embed, dtype=param_dtype, param_dtype=param_dtype,
                             rngs=rngs)
    self.attn = CausalSelfAttention(d_embed, num_heads, rope=rope,
                                    param_dtype=param_dtype, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d_embed, dtype=param_dtype, param_dtype=param_dtype,
                             rngs=rngs)
    self.mlp = FeedForward(d_embed, mlp_ratio * d_embed, param_dtype=param_dtype,
                           rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.attn(self.ln1(x))
    return x + self.mlp(self.ln2(x))


class LMHead(nnx.Module):
  """Final LayerNorm and output projection, one group so the norm is 'output'."""

  def __init__(self, d_embed: int, vocab_size: int, *, param_dtype: Any,
               rngs: nnx.Rngs):
    self.norm = nnx.LayerNorm(d_embed, dtype=param_dtype, param_dtype=param_dtype,
                              rngs=rngs)
    self.proj = nnx.Linear(d_embed, vocab_size, dtype=param_dtype,
                           param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.proj(self.norm(x))


class GPT(nnx.Module):
  r"""Causal character-level GPT with pre-LayerNorm blocks.

  .. math::
    h_0 = E[x] \,(+\, P[t]), \qquad
    h_{\ell+1} = h_\ell + \mathrm{MLP}(\mathrm{LN}(h_\ell'))
    \text{ with } h_\ell' = h_\ell + \mathrm{Attn}(\mathrm{LN}(h_\ell)), \qquad
    z = W_{\mathrm{out}}\,\mathrm{LN}(h_L) .

  Parameter groups (EBC default labels): ``tok_embed`` and ``pos_embed``
  (embedding), ``blocks/0`` ... ``blocks/{L-1}`` (budgeted) and ``lm_head``
  (final norm + output projection).

  With ``record_activations=True`` (under ``nnx.capture``), the call sows one
  activation norm per group: ``tok_embed`` ``‖E[x]‖``, ``pos_embed``
  ``‖P[t]‖``, ``blocks/ℓ`` ``‖h_ℓ‖`` (the block's input) and ``lm_head``
  ``‖h_L‖`` (the head's input), each :func:`ebc_optax.formulas.activation_norm`.

  Args:
    vocab_size: number of token ids ``V``.
    num_blocks: number of transformer blocks ``L``.
    d_embed: width of the residual stream (divisible by ``num_heads``).
    num_heads: attention heads; the head dim ``d_embed/num_heads`` must be even
      for ``positions="rope"``.
    seq_len: the longest sequence the model accepts (size of the learned
      position table).
    mlp_ratio: MLP hidden width as a multiple of ``d_embed``.
    positions: ``"rope"`` (rotary, computed on the fly, no state) or
      ``"learned"`` (a learned position embedding).
    param_dtype: ``jnp.float32`` or ``jnp.bfloat16``; parameters are stored
      and the forward pass is computed in it (softmax and RoPE in float32).
    scan_layers: store the blocks stacked — one ``blocks`` module whose
      parameters carry a leading layer axis — and run them with ``nnx.scan``
      (compile time flat in depth). The blocks are initialised exactly as the
      unrolled model's (same ``rngs`` draws, then stacked), so the same seed
      gives the same function. EBC budgets them per slice with
      ``stacked=("blocks",)``; the block activation norms are one ``[L]``
      vector under ``blocks``.
    rngs: the :class:`flax.nnx.Rngs` used for initialisation.

  Raises:
    ValueError: for an invalid argument (naming it and the accepted values).
  """

  def __init__(self, vocab_size: int, *, num_blocks: int = 3, d_embed: int = 128,
               num_heads: int = 4, seq_len: int = 256, mlp_ratio: int = 4,
               positions: str = "rope", param_dtype: Any = jnp.float32,
               scan_layers: bool = False, rngs: nnx.Rngs):
    for name, value in (("vocab_size", vocab_size), ("num_blocks", num_blocks),
                        ("d_embed", d_embed), ("num_heads", num_heads),
                        ("seq_len", seq_len), ("mlp_ratio", mlp_ratio)):
      _positive_int(name, value)
    if positions not in POSITIONS:
      raise ValueError(f"positions must be one of {POSITIONS}; got {positions!r}.")
    if d_embed % num_heads:
      raise ValueError(
          f"d_embed must be divisible by num_heads; got d_embed={d_embed}, "
          f"num_heads={num_heads}.")
    if positions == "rope" and (d_embed // num_heads) % 2:
      raise ValueError(
          "d_embed / num_heads (the head dim) must be even for positions='rope'; "
          f"got d_embed={d_embed}, num_heads={num_heads}.")
    dtype = _check_param_dtype(param_dtype)
    self.vocab_size = vocab_size
    self.seq_len = seq_len
    self.positions = positions
    self.tok_embed = nnx.Embed(vocab_size, d_embed, dtype=dtype,
                               param_dtype=dtype, rngs=rngs)
    if positions == "learned":
      self.pos_embed = nnx.Embed(seq_len, d_embed, dtype=dtype,
                                 param_dtype=dtype, rngs=rngs)
    blocks = [Block(d_embed, num_heads, mlp_ratio, rope=positions == "rope",
                    param_dtype=dtype, rngs=rngs)
              for _ in range(num_blocks)]
    self.scan_layers = bool(scan_layers)
    self.blocks = stack_modules(blocks) if scan_layers else nnx.List(blocks)
    self.lm_head = LMHead(d_embed, vocab_size, param_dtype=dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array, *,
               record_activations: bool = False) -> jax.Array:
    """``[B, T]`` int tokens (``T <= seq_len``) -> ``[B, T, V]`` float32 logits.

    ``record_activations`` sows the per-group activation norms (use it under
    ``nnx.capture``; see :func:`functional`).
    """
    if tokens.ndim != 2:
      raise ValueError(f"tokens must have shape [B, T]; got {tokens.shape}.")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integers; got dtype {tokens.dtype}.")
    t = tokens.shape[1]
    if t > self.seq_len:
      raise ValueError(
          f"sequence length {t} exceeds the model's seq_len={self.seq_len}.")
    h = self.tok_embed(tokens)
    if record_activations:
      record_activation_norm(self.tok_embed, h)
    if self.positions == "learned":
      pos = self.pos_embed(jnp.arange(t))[None]
      if record_activations:
        record_activation_norm(self.pos_embed, pos)
      h = h + pos
    if self.scan_layers:
      h, norms = _scan_blocks(self.blocks, h)
      if record_activations:  # one norm per slice, each a block's input
        self.blocks.sow(nnx.Intermediate, ACTIVATION_NORM, norms,
                        reduce_fn=lambda _, new: new, init_fn=lambda: None)
    else:
      for block in self.blocks:
        if record_activations:
          record_activation_norm(block, h)
        h = block(h)
    if record_activations:
      record_activation_norm(self.lm_head, h)
    return self.lm_head(h).astype(jnp.float32)


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
  """One module of the same graph whose parameters are the ``modules``'
  parameters stacked on a new leading axis (the layout of ``nnx.scan``)."""
  graphdef, _ = nnx.split(modules[0])
  states = [nnx.split(m)[1] for m in modules]
  return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))


@nnx.scan(in_axes=(0, nnx.Carry), out_axes=(nnx.Carry, 0))
def _scan_blocks(block: Block, h: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``h -> block(h)`` over the stacked blocks; also each block input's norm."""
  return block(h), ebc_optax.formulas.activation_norm(h)


# --- MLP classifier ----------------------------------------------------------------

class DenseBlock(nnx.Module):
  """``GELU(Linear(x))``."""

  def __init__(self, in_dim: int, out_dim: int, *, param_dtype: Any,
               rngs: nnx.Rngs):
    self.linear = nnx.Linear(in_dim, out_dim, dtype=param_dtype,
                             param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.gelu(self.linear(x))


class MLP(nnx.Module):
  r"""A small MLP classifier: GELU blocks and a linear head.

  .. math::
    h_0 = x, \qquad h_{i+1} = \mathrm{GELU}(W_i h_i + b_i), \qquad
    z = W_{\mathrm{head}} h_L + b_{\mathrm{head}} .

  Parameter groups (EBC default labels): ``blocks/0`` ... (budgeted) and
  ``head`` (output). ``record_activations=True`` sows the norm of each
  group's input (see :class:`GPT`).

  Args:
    in_dim: input features.
    num_classes: number of classes.
    hidden: widths of the hidden blocks (at least one).
    param_dtype: ``jnp.float32`` or ``jnp.bfloat16``.
    rngs: the :class:`flax.nnx.Rngs` used for initialisation.

  Raises:
    ValueError: for an invalid argument.
  """

  def __init__(self, in_dim: int, num_classes: int, *,
               hidden: Sequence[int] = (128, 128), param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    _positive_int("in_dim", in_dim)
    _positive_int("num_classes", num_classes)
    hidden = tuple(hidden)
    if not hidden:
      raise ValueError("hidden must name at least one hidden width; got ().")
    for width in hidden:
      _positive_int("hidden", width)
    dtype = _check_param_dtype(param_dtype)
    self.in_dim = in_dim
    dims = (in_dim,) + hidden
    self.blocks = nnx.List([
        DenseBlock(a, b, param_dtype=dtype, rngs=rngs)
        for a, b in zip(dims[:-1], dims[1:])])
    self.head = nnx.Linear(dims[-1], num_classes, dtype=dtype, param_dtype=dtype,
                           rngs=rngs)
    self.dtype = dtype

  def __call__(self, x: jax.Array, *,
               record_activations: bool = False) -> jax.Array:
    """``[B, in_dim]`` features -> ``[B, num_classes]`` float32 logits."""
    if x.ndim != 2 or x.shape[-1] != self.in_dim:
      raise ValueError(f"x must have shape [B, {self.in_dim}]; got {x.shape}.")
    h = x.astype(self.dtype)
    for block in self.blocks:
      if record_activations:
        record_activation_norm(block, h)
      h = block(h)
    if record_activations:
      record_activation_norm(self.head, h)
    return self.head(h).astype(jnp.float32)


# --- functional interface ----------------------------------------------------------

def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, Params]:
  """Splits a module into its static graph and a plain dict of its parameters.

  Args:
    model: an NNX module whose only state is :class:`flax.nnx.Param`.

  Returns:
    ``(graphdef, params)``; ``params`` is a nested ``dict`` whose leaves are
    arrays, e.g. ``params["blocks"][0]["attn"]["qkv"]["kernel"]``.

  Raises:
    ValueError: when the module holds state other than ``nnx.Param``.
  """
  graphdef, state, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise ValueError(
        "split_model expects a module whose only state is nnx.Param; got other "
        f"state {rest}.")
  return graphdef, nnx.to_pure_dict(state)


def _module_builder(graphdef: nnx.GraphDef, template_state: Any
                    ) -> Callable[[Params], nnx.Module]:
  """``params -> fresh module``: checks the structure, copies no arrays."""
  if not isinstance(template_state, nnx.State):
    template_state = nnx.split(nnx.merge(graphdef, template_state), nnx.Param)[1]
  expected = jax.tree.structure(nnx.to_pure_dict(template_state))
  state_def = jax.tree.structure(template_state)
  # Shape-only placeholders: the template's arrays are not kept alive.
  placeholders = [jax.ShapeDtypeStruct(x.shape, x.dtype)
                  for x in jax.tree.leaves(template_state)]

  def build(params: Params) -> nnx.Module:
    if jax.tree.structure(params) != expected:
      raise ValueError(
          "params must have the structure of the model's parameters; got "
          f"{jax.tree.structure(params)}, expected {expected}.")
    # Fresh Variables: a copy of the template's structure, then the values.
    state = jax.tree.unflatten(state_def, placeholders)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)

  return build


def make_apply_fn(graphdef: nnx.GraphDef, template_state: Any) -> ApplyFn:
  """A pure ``(params, inputs) -> logits`` function for an NNX module.

  Each call rebuilds a fresh module from ``params`` (a plain dict with the
  structure of ``template_state``) and calls it; nothing outside the call is
  mutated, so the function works under ``jax.jit``, ``jax.grad`` and
  ``jax.jvp`` (also with tangents on a subset of the leaves).

  Args:
    graphdef: the module's graph from :func:`split_model` / ``nnx.split``.
    template_state: the module's ``nnx.Param`` state, as an ``nnx.State`` or
      as the pure dict from :func:`split_model`; only its structure (and
      variable types) is used.

  Returns:
    ``apply_fn(params, inputs)``; ``params`` may have any float dtype.
  """
  build = _module_builder(graphdef, template_state)

  def apply_fn(params: Params, inputs: jax.Array) -> jax.Array:
    return build(params)(inputs)

  return apply_fn


def make_apply_with_activations(graphdef: nnx.GraphDef, template_state: Any
                                ) -> ApplyWithActivationsFn:
  """A pure ``(params, inputs) -> (logits, {label: activation norm})``.

  One forward pass: the module is called with ``record_activations=True``
  under ``nnx.capture(..., nnx.Intermediate)`` and the sown norms are keyed by
  :func:`activation_norms_by_label`, so the labels match
  ``ebc_optax.layers.default_layer_labels(params)``. The logits are those of
  :func:`make_apply_fn`. Works under ``jax.jit`` and ``jax.grad`` (return
  the norms as auxiliary output).

  Args:
    graphdef: as for :func:`make_apply_fn`; the module's ``__call__`` must
      accept ``record_activations`` (:class:`GPT`, :class:`MLP`).
    template_state: as for :func:`make_apply_fn`.

  Returns:
    ``apply_with_activations(params, inputs)``.
  """
  build = _module_builder(graphdef, template_state)

  def forward(module, inputs):
    return module(inputs, record_activations=True)

  def apply_with_activations(params: Params, inputs: jax.Array
                             ) -> tuple[jax.Array, ActivationNorms]:
    logits, intermediates = nnx.capture(forward, nnx.Intermediate)(
        build(params), inputs)
    return logits, activation_norms_by_label(intermediates)

  return apply_with_activations


class Functional(NamedTuple):
  """A module's pure functions and its initial parameters."""
  apply_fn: ApplyFn
  apply_with_activations: ApplyWithActivationsFn
  params: Params


def functional(model: nnx.Module) -> Functional:
  """The functional form of ``model`` (:func:`make_apply_fn`,
  :func:`make_apply_with_activations` and the pure-dict parameters)."""
  graphdef, params = split_model(model)
  template = nnx.split(model, nnx.Param)[1]
  return Functional(make_apply_fn(graphdef, template),
                    make_apply_with_activations(graphdef, template), params)


def _init(model: nnx.Module) -> tuple[ApplyFn, Params]:
  fns = functional(model)
  return fns.apply_fn, fns.params


def init_gpt(key: jax.Array, vocab_size: int, **kwargs: Any
             ) -> tuple[ApplyFn, Params]:
  """Initialises a :class:`GPT` and returns its functional form.

  Args:
    key: a PRNG key for the initialisation.
    vocab_size: number of token ids.
    **kwargs: keyword arguments of :class:`GPT` (``num_blocks``, ``d_embed``,
      ``num_heads``, ``seq_len``, ``mlp_ratio``, ``positions``,
      ``param_dtype``).

  Returns:
    ``(apply_fn, params)`` with ``apply_fn(params, tokens[B, T]) -> [B, T, V]``.
  """
  return _init(GPT(vocab_size, rngs=nnx.Rngs(key), **kwargs))


def init_mlp(key: jax.Array, in_dim: int, num_classes: int, **kwargs: Any
             ) -> tuple[ApplyFn, Params]:
  """Initialises an :class:`MLP` and returns its functional form.

  Args:
    key: a PRNG key for the initialisation.
    in_dim: input features.
    num_classes: number of classes.
    **kwargs: keyword arguments of :class:`MLP` (``hidden``, ``param_dtype``).

  Returns:
    ``(apply_fn, params)`` with ``apply_fn(params, x[B, in_dim]) -> [B, C]``.
  """
  return _init(MLP(in_dim, num_classes, rngs=nnx.Rngs(key), **kwargs))


def count_params(params: Any) -> int:
  """Total number of scalar parameters in a pytree of arrays.

  Args:
    params: a pytree of arrays.

  Returns:
    ``Σ size(leaf)`` as a Python int.
  """
  return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params)))
