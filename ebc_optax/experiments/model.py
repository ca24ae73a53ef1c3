"""Flax NNX models for the experiments, with a pure functional interface.

Two models:

* :class:`GPT`: a causal character-level transformer (pre-LayerNorm blocks,
  causal multi-head self-attention, GELU MLP, residual connections) with rotary
  (``"rope"``) or learned (``"learned"``) positions.
* :class:`MLP`: a small classifier (Linear + GELU blocks and a linear head).

Attribute names are chosen so that EBC's default layer grouping
(:func:`ebc_optax.default_layer_labels`) gives one budgeted layer per block
(``"blocks/0"``, ``"blocks/1"``, ...) and recognises the embedding / output
groups by name (``"tok_embed"``, ``"pos_embed"``, ``"lm_head"``, ``"head"``).

The optimiser and the EBC transform see the models through plain functions::

  apply_fn, params = init_gpt(jax.random.PRNGKey(0), vocab_size=65)
  logits = apply_fn(params, tokens)            # [B, T] int -> [B, T, V] float32

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
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Params = dict[str, Any]
ApplyFn = Callable[[Params, jax.Array], jax.Array]

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
    rngs: the :class:`flax.nnx.Rngs` used for initialisation.

  Raises:
    ValueError: for an invalid argument (naming it and the accepted values).
  """

  def __init__(self, vocab_size: int, *, num_blocks: int = 3, d_embed: int = 128,
               num_heads: int = 4, seq_len: int = 256, mlp_ratio: int = 4,
               positions: str = "rope", param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
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
    self.blocks = nnx.List([
        Block(d_embed, num_heads, mlp_ratio, rope=positions == "rope",
              param_dtype=dtype, rngs=rngs)
        for _ in range(num_blocks)])
    self.lm_head = LMHead(d_embed, vocab_size, param_dtype=dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """``[B, T]`` int tokens (``T <= seq_len``) -> ``[B, T, V]`` float32 logits."""
    if tokens.ndim != 2:
      raise ValueError(f"tokens must have shape [B, T]; got {tokens.shape}.")
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be integers; got dtype {tokens.dtype}.")
    t = tokens.shape[1]
    if t > self.seq_len:
      raise ValueError(
          f"sequence length {t} exceeds the model's seq_len={self.seq_len}.")
    h = self.tok_embed(tokens)
    if self.positions == "learned":
      h = h + self.pos_embed(jnp.arange(t))[None]
    for block in self.blocks:
      h = block(h)
    return self.lm_head(h).astype(jnp.float32)


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
  ``head`` (output).

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

  def __call__(self, x: jax.Array) -> jax.Array:
    """``[B, in_dim]`` features -> ``[B, num_classes]`` float32 logits."""
    if x.ndim != 2 or x.shape[-1] != self.in_dim:
      raise ValueError(f"x must have shape [B, {self.in_dim}]; got {x.shape}.")
    h = x.astype(self.dtype)
    for block in self.blocks:
      h = block(h)
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
  if not isinstance(template_state, nnx.State):
    template_state = nnx.split(nnx.merge(graphdef, template_state), nnx.Param)[1]
  expected = jax.tree.structure(nnx.to_pure_dict(template_state))
  state_def = jax.tree.structure(template_state)
  # Shape-only placeholders: the template's arrays are not kept alive.
  placeholders = [jax.ShapeDtypeStruct(x.shape, x.dtype)
                  for x in jax.tree.leaves(template_state)]

  def apply_fn(params: Params, inputs: jax.Array) -> jax.Array:
    if jax.tree.structure(params) != expected:
      raise ValueError(
          "params must have the structure of the model's parameters; got "
          f"{jax.tree.structure(params)}, expected {expected}.")
    # Fresh Variables: a copy of the template's structure, then the values.
    state = jax.tree.unflatten(state_def, placeholders)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)(inputs)

  return apply_fn


def _init(model: nnx.Module) -> tuple[ApplyFn, Params]:
  graphdef, params = split_model(model)
  return make_apply_fn(graphdef, nnx.split(model, nnx.Param)[1]), params


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
