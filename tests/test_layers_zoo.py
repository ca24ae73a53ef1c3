"""The layers EBC budgets on models built by the libraries people use.

Each model is tiny (width 8, vocab 32, 2 blocks, random init, no download)
and built with the library itself: Flax linen (auto-named, explicitly named,
nested under a parent module, wrapped beside a step counter, ``nn.scan``),
Flax NNX (``nnx.List`` and ``nnx.vmap``-stacked blocks), equinox (``eqx.nn``
layers, blocks in a list) and Hugging Face Flax GPT-2 and Llama from configs.
For each, ``budget_layers`` gives one layer per block (plus the final norm),
with the embeddings and the head left out, and the init of an EBC transform
warns exactly when a stack of layers is budgeted as one layer. The hand-built
trees at the end check each grouping rule on its own.
"""

import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import ebc_optax
from ebc_optax import _layers

V, D, BLOCKS = 32, 8, 2  # the MLP is 4·D = V wide: blocks look vocab-sized too


def _tokens():
  return jnp.zeros((1, 4), jnp.int32)


def init_warnings(params, **kwargs):
  """The warnings an EBC transform gives at init (check_budget, warn=True)."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    ebc_optax.ellipsotope_budget_clip(lambda p, x: x, **kwargs).init(params)
  return [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def assert_no_warning(params, **kwargs):
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    ebc_optax.ellipsotope_budget_clip(lambda p, x: x, **kwargs).init(params)


# --- Flax linen -------------------------------------------------------------------


class Block(nn.Module):
  """A pre-norm block with auto-named submodules (``Dense_0``, ``Dense_1``...),
  in the ``(carry, x) -> (carry, y)`` form ``nn.scan`` takes."""

  @nn.compact
  def __call__(self, x, _=None):
    x = x + nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(x))
    return x + nn.Dense(D)(nn.gelu(nn.Dense(4 * D)(nn.LayerNorm()(x)))), None


class LinenDecoder(nn.Module):
  """Auto-named: ``Embed_0``, ``Block_0``, ``Block_1``, ``LayerNorm_0`` and the
  untied head ``Dense_0``, whose name says nothing."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(V, D)(tokens)
    for _ in range(BLOCKS):
      x, _ = Block()(x)
    return nn.Dense(V)(nn.LayerNorm()(x))


class LinenParent(nn.Module):
  """The decoder nested under a parent module, beside a ``proj`` Dense."""

  @nn.compact
  def __call__(self, tokens, features):
    return LinenDecoder(name="decoder")(tokens), nn.Dense(D, name="proj")(features)


class LinenNamed(nn.Module):
  """Explicit names: ``embed``, ``blocks_0``, ``blocks_1``, ``ln_f``, ``lm_head``."""

  def setup(self):
    self.embed = nn.Embed(V, D)
    self.blocks = [Block() for _ in range(BLOCKS)]
    self.ln_f = nn.LayerNorm()
    self.lm_head = nn.Dense(V)

  def __call__(self, tokens):
    x = self.embed(tokens)
    for block in self.blocks:
      x, _ = block(x)
    return self.lm_head(self.ln_f(x))


class LinenScanned(nn.Module):
  """``nn.scan(Block)``: one ``ScanBlock_0`` whose leaves lead with the layer axis."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(V, D)(tokens)
    x, _ = nn.scan(Block, variable_axes={"params": 0},
                   split_rngs={"params": True}, length=BLOCKS)()(x, None)
    return nn.Dense(V)(nn.LayerNorm()(x))


def linen_auto():
  return LinenDecoder().init(jax.random.PRNGKey(0), _tokens())


def test_linen_auto_named_head_is_left_out_by_its_vocab_size():
  params = linen_auto()
  assert set(params["params"]) == {"Embed_0", "Block_0", "Block_1",
                                   "LayerNorm_0", "Dense_0"}
  assert ebc_optax.layers.budget_layers(params) == (
      "params/Block_0", "params/Block_1", "params/LayerNorm_0")
  part = _layers.partition_layers(params)
  assert part.excluded_labels == ("params/Dense_0", "params/Embed_0")
  assert part.vocab_sizes == (V,)
  assert_no_warning(params)


def test_linen_decoder_nested_under_a_parent_module():
  params = LinenParent().init(jax.random.PRNGKey(0), _tokens(), jnp.ones((1, 3)))
  assert set(params["params"]) == {"decoder", "proj"}
  assert ebc_optax.layers.budget_layers(params) == (
      "params/decoder/Block_0", "params/decoder/Block_1",
      "params/decoder/LayerNorm_0", "params/proj")
  assert _layers.partition_layers(params).excluded_labels == (
      "params/decoder/Dense_0", "params/decoder/Embed_0")
  assert_no_warning(params)


def test_linen_variables_beside_a_step_counter():
  params = {"model": linen_auto(), "step": jnp.int32(0)}
  assert ebc_optax.layers.budget_layers(params) == (
      "model/params/Block_0", "model/params/Block_1", "model/params/LayerNorm_0")
  part = _layers.partition_layers(params)
  assert part.leaf_layers[-1] is None  # the counter, last in flatten order
  assert "step" not in part.groups and "step" not in part.excluded_labels
  assert_no_warning(params)


def test_linen_explicit_names():
  params = LinenNamed().init(jax.random.PRNGKey(0), _tokens())
  assert ebc_optax.layers.budget_layers(params) == (
      "params/blocks_0", "params/blocks_1", "params/ln_f")
  assert_no_warning(params)


def test_linen_scan_warns_without_stacked_and_is_per_slice_with_it():
  params = LinenScanned().init(jax.random.PRNGKey(0), _tokens())
  assert "ScanBlock_0" in params["params"]
  assert ebc_optax.layers.budget_layers(params) == ("params/LayerNorm_0",
                                             "params/ScanBlock_0")
  messages = init_warnings(params)
  assert len(messages) == 1
  assert "'params/ScanBlock_0'" in messages[0]
  assert f"size {BLOCKS}" in messages[0]
  assert "stacked=('params/ScanBlock_0',)" in messages[0]
  stacked = ("params/ScanBlock_0",)
  assert ebc_optax.layers.budget_layers(params, stacked=stacked) == (
      "params/LayerNorm_0", "params/ScanBlock_0/0", "params/ScanBlock_0/1")
  assert_no_warning(params, stacked=stacked)


# --- Flax NNX ---------------------------------------------------------------------


class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.ln = nnx.LayerNorm(D, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(2, D, decode=False, rngs=rngs)
    self.fc = nnx.Linear(D, 4 * D, rngs=rngs)
    self.out = nnx.Linear(4 * D, D, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)  # keeps RNG state: integer leaves


class NNXDecoder(nnx.Module):
  def __init__(self, rngs, scan=False):
    self.embed = nnx.Embed(V, D, rngs=rngs)
    if scan:
      @nnx.split_rngs(splits=BLOCKS)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def stack(rngs):
        return NNXBlock(rngs)
      self.blocks = stack(rngs)
    else:
      self.blocks = nnx.List([NNXBlock(rngs) for _ in range(BLOCKS)])
    self.ln_f = nnx.LayerNorm(D, rngs=rngs)
    self.lm_head = nnx.Linear(D, V, rngs=rngs)


def nnx_params(scan, everything=False):
  model = NNXDecoder(nnx.Rngs(0), scan=scan)
  state = nnx.state(model) if everything else nnx.state(model, nnx.Param)
  return nnx.to_pure_dict(state)


@pytest.mark.parametrize("everything", [False, True])
def test_nnx_list_blocks(everything):
  params = nnx_params(scan=False, everything=everything)
  assert ebc_optax.layers.budget_layers(params) == ("blocks/0", "blocks/1", "ln_f")
  assert_no_warning(params)


def test_nnx_rng_state_is_outside_the_budget():
  params = nnx_params(scan=False, everything=True)
  part = _layers.partition_layers(params)
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  rng = [i for i, (p, _) in enumerate(flat) if "rngs" in _layers.path_str(p)]
  assert len(rng) == 2 * BLOCKS  # a count and a key per block
  assert all(part.leaf_layers[i] is None for i in rng)
  assert all(part.leaf_layers[i] is not None for i, (p, x) in enumerate(flat)
             if "blocks" in _layers.path_str(p) and i not in rng)


@pytest.mark.parametrize("everything", [False, True])
def test_nnx_vmap_stack_warns_without_stacked(everything):
  params = nnx_params(scan=True, everything=everything)
  assert ebc_optax.layers.budget_layers(params) == ("blocks", "ln_f")
  messages = init_warnings(params)
  assert len(messages) == 1 and "stacked=('blocks',)" in messages[0]
  assert ebc_optax.layers.budget_layers(params, stacked=("blocks",)) == (
      "blocks/0", "blocks/1", "ln_f")
  assert_no_warning(params, stacked=("blocks",))


# --- equinox ------------------------------------------------------------------------


class EqxBlock(eqx.Module):
  ln1: eqx.nn.LayerNorm
  attn: eqx.nn.MultiheadAttention
  ln2: eqx.nn.LayerNorm
  mlp: eqx.nn.MLP

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.ln1 = eqx.nn.LayerNorm(D)
    self.attn = eqx.nn.MultiheadAttention(2, D, key=k1)
    self.ln2 = eqx.nn.LayerNorm(D)
    self.mlp = eqx.nn.MLP(D, D, 4 * D, depth=1, key=k2)


class EqxDecoder(eqx.Module):
  """The head is an ``eqx.nn.Linear`` named ``linear``: weight ``[V, D]``."""
  embedding: eqx.nn.Embedding
  blocks: list
  norm: eqx.nn.LayerNorm
  linear: eqx.nn.Linear

  def __init__(self, key):
    keys = jax.random.split(key, BLOCKS + 2)
    self.embedding = eqx.nn.Embedding(V, D, key=keys[0])
    self.blocks = [EqxBlock(k) for k in keys[1:-1]]
    self.norm = eqx.nn.LayerNorm(D)
    self.linear = eqx.nn.Linear(D, V, key=keys[-1])


def test_equinox_decoder():
  params = eqx.filter(EqxDecoder(jax.random.PRNGKey(0)), eqx.is_array)
  assert ebc_optax.layers.budget_layers(params) == ("blocks/0", "blocks/1", "norm")
  assert _layers.partition_layers(params).excluded_labels == (
      "embedding", "linear")
  assert_no_warning(params)


# --- Hugging Face Flax ----------------------------------------------------------------


def test_hugging_face_gpt2():
  transformers = pytest.importorskip("transformers")
  model = transformers.FlaxGPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=V, n_positions=16, n_embd=D, n_layer=BLOCKS, n_head=2), seed=0)
  params = model.params
  assert ebc_optax.layers.budget_layers(params) == (
      "transformer/h/0", "transformer/h/1", "transformer/ln_f")
  assert _layers.partition_layers(params).excluded_labels == (
      "transformer/wpe", "transformer/wte")
  assert_no_warning(params)


def test_hugging_face_llama():
  transformers = pytest.importorskip("transformers")
  model = transformers.FlaxLlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=V, hidden_size=D, intermediate_size=4 * D,
      num_hidden_layers=BLOCKS, num_attention_heads=2, num_key_value_heads=2,
      max_position_embeddings=16, tie_word_embeddings=False), seed=0)
  params = model.params
  assert ebc_optax.layers.budget_layers(params) == (
      "model/layers/0", "model/layers/1", "model/norm")
  assert _layers.partition_layers(params).excluded_labels == (
      "lm_head", "model/embed_tokens")
  assert_no_warning(params)


# --- each rule on a hand-built tree -----------------------------------------------------


def _a(*shape):
  return jnp.ones(shape)


def _block(width=D):
  return {"Dense_0": {"kernel": _a(D, width), "bias": _a(width)},
          "Dense_1": {"kernel": _a(width, D), "bias": _a(D)},
          "LayerNorm_0": {"scale": _a(D)}}


def _linen_tree(head=None):
  return {"Embed_0": {"embedding": _a(V, D)},
          "Block_0": _block(), "Block_1": _block(),
          "LayerNorm_0": {"scale": _a(D), "bias": _a(D)},
          "Dense_0": head or {"kernel": _a(D, V), "bias": _a(V)}}


# Rule 1: a group on its own whose leaves are vocab-sized is a head/embedding.

def test_vocab_sized_group_on_its_own_is_left_out():
  params = {"params": _linen_tree()}
  part = _layers.partition_layers(params)
  assert part.labels == ("params/Block_0", "params/Block_1", "params/LayerNorm_0")
  assert part.excluded_labels == ("params/Dense_0", "params/Embed_0")
  assert ebc_optax.layers.budget_layers(params, include_embed_out=True) == (
      "params/Block_0", "params/Block_1", "params/Dense_0", "params/Embed_0",
      "params/LayerNorm_0")


@pytest.mark.parametrize("head", [
    {"kernel": _a(D, V)},               # linen / NNX kernel [d, V]
    {"weight": _a(V, D), "bias": _a(V)},  # equinox weight [V, d]
])
def test_head_layouts_on_either_axis(head):
  params = {"params": _linen_tree(head)}
  assert "params/Dense_0" in _layers.partition_layers(params).excluded_labels


def test_blocks_are_never_left_out_by_shape():
  # Every leaf of these blocks has V on an axis: still blocks.
  blocks = [{"w": _a(D, V), "b": _a(V)} for _ in range(2)]
  params = {"embed": _a(V, D), "blocks": blocks,
            "h_0": {"mlp": {"w": _a(V, D)}}, "h_1": {"mlp": {"w": _a(V, D)}}}
  assert ebc_optax.layers.budget_layers(params) == ("blocks/0", "blocks/1", "h_0", "h_1")


def test_numbered_bare_layers_are_not_blocks():
  # An MLP language model without blocks: Dense_1 is its head.
  params = {"params": {"Embed_0": {"embedding": _a(V, D)},
                       "Dense_0": {"kernel": _a(D, 3 * D), "bias": _a(3 * D)},
                       "Dense_1": {"kernel": _a(3 * D, V), "bias": _a(V)}}}
  part = _layers.partition_layers(params)
  assert part.labels == ("params/Dense_0",)
  assert part.excluded_labels == ("params/Dense_1", "params/Embed_0")


def test_stacked_group_is_never_left_out_by_shape():
  params = {"embed": _a(V, D), "blocks": {"w": _a(3, D, V), "b": _a(3, V)}}
  assert ebc_optax.layers.budget_layers(params, stacked="blocks") == (
      "blocks/0", "blocks/1", "blocks/2")


def test_vocab_size_comes_from_token_tables_only():
  # A positional table's length and a head's width are not the vocab size.
  params = {"wpe": {"embedding": _a(16, D)}, "lm_head": {"kernel": _a(D, V)},
            "blocks": [_a(D), _a(D)], "Dense_0": {"kernel": _a(D, 16)},
            "LayerNorm_0": {"scale": _a(D)}}
  part = _layers.partition_layers(params)
  assert part.vocab_sizes == ()
  assert part.labels == ("Dense_0", "LayerNorm_0", "blocks/0", "blocks/1")


def test_square_embedding_gives_no_vocab_size():
  params = {"embed": _a(D, D), "blocks": [_a(D), _a(D)], "norm": _a(D)}
  assert ebc_optax.layers.budget_layers(params) == ("blocks/0", "blocks/1", "norm")


def test_explicit_vocab_size():
  # No table to read V from (the embedding is tied inside a group of its own
  # name): vocab_size says it.
  params = {"table": _a(V, D), "blocks": [_a(D), _a(D)],
            "proj": {"kernel": _a(D, V), "bias": _a(V)}}
  assert ebc_optax.layers.budget_layers(params) == ("blocks/0", "blocks/1", "proj",
                                             "table")
  assert ebc_optax.layers.budget_layers(params, vocab_size=V) == ("blocks/0", "blocks/1")
  # An explicit size replaces the inferred one.
  linen = {"params": _linen_tree()}
  assert "params/Dense_0" in ebc_optax.layers.budget_layers(linen, vocab_size=V + 1)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "32", True])
def test_bad_vocab_size_is_an_error(bad):
  with pytest.raises(ValueError, match="vocab_size"):
    ebc_optax.layers.budget_layers({"w": _a(2)}, vocab_size=bad)


def test_no_layer_left_names_the_vocab_rule():
  params = {"tok_embed": _a(V, D), "Dense_0": {"kernel": _a(D, V)}}
  part = _layers.partition_layers(params)
  with pytest.raises(ValueError, match=r"no layer to budget.*vocab size \[32\]"):
    _layers.check_budget(part, "test")


def test_custom_labels_without_a_token_table_name_keep_their_groups():
  params = {"embed": _a(V, D), "blocks": [_a(D), _a(D)], "lm_head": _a(D, V)}
  labels = {"embed": "input_table", "blocks": ["b0", "b1"], "lm_head": "out"}
  assert ebc_optax.layers.budget_layers(params, lambda p: labels) == (
      "b0", "b1", "input_table")


# Rule 2: numbered siblings are a sequence of blocks at any depth.

def test_numbered_siblings_nested_under_a_parent():
  params = {"params": {"decoder": _linen_tree(), "proj": {"kernel": _a(3, D)}}}
  labels = ebc_optax.layers.default_layer_labels(params)["params"]
  assert labels["decoder"]["Block_1"]["Dense_1"]["kernel"] == "params/decoder/Block_1"
  assert labels["decoder"]["Embed_0"]["embedding"] == "params/decoder/Embed_0"
  assert labels["proj"]["kernel"] == "params/proj"
  assert ebc_optax.layers.budget_layers(params) == (
      "params/decoder/Block_0", "params/decoder/Block_1",
      "params/decoder/LayerNorm_0", "params/proj")


def test_numbered_siblings_beside_a_counter():
  params = {"model": {"params": _linen_tree()}, "step": jnp.int32(3)}
  assert ebc_optax.layers.budget_layers(params) == (
      "model/params/Block_0", "model/params/Block_1",
      "model/params/LayerNorm_0")


def test_only_the_first_sequence_on_a_path_splits():
  # Dense_0 / Dense_1 inside a block are a numbered pair too, but the block
  # is already an element: it stays one layer.
  params = {"Block_0": _block(), "Block_1": _block()}
  assert ebc_optax.layers.budget_layers(params) == ("Block_0", "Block_1")
  # Numbered layers of bare leaves at depth are one module's layers, not
  # blocks; numbered modules of modules are blocks.
  params = {"encoder": {"Dense_0": {"w": _a(D)}, "Dense_1": {"w": _a(D)}},
            "x": _a(D)}
  assert ebc_optax.layers.budget_layers(params) == ("encoder", "x")
  params = {"encoder": {"Layer_0": {"Dense_0": {"w": _a(D)}},
                        "Layer_1": {"Dense_0": {"w": _a(D)}}}, "x": _a(D)}
  assert ebc_optax.layers.budget_layers(params) == ("encoder/Layer_0",
                                             "encoder/Layer_1", "x")


def test_numbered_modules_inside_a_stack_are_not_blocks():
  # nn.scan over a block with two attention modules: MHA_0 and MHA_1 are
  # numbered modules of modules, but inside a stack.
  attn = {"query": {"kernel": _a(2, D, D)}, "out": {"kernel": _a(2, D, D)}}
  params = {"params": {"Embed_0": {"embedding": _a(V, D)},
                       "ScanBlock_0": {"MHA_0": attn, "MHA_1": attn,
                                       "Dense_0": {"kernel": _a(2, D, D)}}}}
  assert ebc_optax.layers.budget_layers(params) == ("params/ScanBlock_0",)
  assert _layers.partition_layers(params).suspected_stacks == (
      ("params/ScanBlock_0", 2),)
  assert ebc_optax.layers.budget_layers(params, stacked="params/ScanBlock_0") == (
      "params/ScanBlock_0/0", "params/ScanBlock_0/1")


@pytest.mark.parametrize("names", [
    ("Block_0",),                # one: a module of its own
    ("Block_1", "Block_2"),      # not from 0
    ("Block_0", "Block_2"),      # a gap
    ("Block_0", "Block_01"),     # not a plain number
])
def test_not_a_numbered_sequence(names):
  params = {"model": {n: {"mlp": {"w": _a(D)}} for n in names}, "ln": _a(D)}
  assert ebc_optax.layers.budget_layers(params) == ("ln", "model")
  params["model"] = {f"Block_{i}": {"mlp": {"w": _a(D)}} for i in range(2)}
  assert ebc_optax.layers.budget_layers(params) == ("ln", "model/Block_0",
                                             "model/Block_1")


def test_numbered_siblings_function():
  assert _layers.numbered_siblings(["a_0", "a_1", "a_2", "b_0", "c_1"]) == {
      "a_0", "a_1", "a_2"}
  assert _layers.sequence_elements(["x/h_0", "x/h_1", "y/h_0", "z/3"]) == {
      "x/h_0", "x/h_1", "z/3"}


# Rule 3: integer, boolean and key leaves are never layers.

def test_integer_leaves_are_outside_the_budget():
  params = {"embed": _a(V, D), "blocks": [{"w": _a(D, D), "n": jnp.int32(0)},
                                          {"w": _a(D, D), "n": jnp.int32(0)}],
            "count": jnp.zeros([], jnp.uint32), "flag": jnp.array(True),
            "key": jax.random.key(0), "ln_f": _a(D)}
  part = _layers.partition_layers(params)
  assert part.labels == ("blocks/0", "blocks/1", "ln_f")
  assert part.groups == ("blocks/0", "blocks/1", "embed", "ln_f")
  paths = dict(zip(part.leaf_paths, part.leaf_layers))
  for p in ("blocks/0/n", "blocks/1/n", "count", "flag", "key", "embed"):
    assert paths[p] is None, p
  assert paths["blocks/1/w"] == (1, 0)
  assert_no_warning(params)


def test_integer_leaves_do_not_count_as_groups_for_the_one_layer_warning():
  params = {"model": {"embed": _a(V, D), "w": _a(D, D), "b": _a(D)},
            "step": jnp.int32(0), "rng_count": jnp.uint32(0)}
  assert ebc_optax.layers.budget_layers(params) == ("model",)
  assert_no_warning(params)


def test_integer_leaves_inside_a_declared_stack_are_skipped():
  params = {"embed": _a(V, D),
            "blocks": {"w": _a(3, D, D), "count": jnp.zeros([3], jnp.uint32),
                       "seen": jnp.int32(0)}}
  part = _layers.partition_layers(params, stacked="blocks")
  assert part.labels == ("blocks/0", "blocks/1", "blocks/2")
  assert [s for s in part.leaf_layers if s is not None] == [(0, 3)]


def test_integer_leaves_are_not_scaled():
  part = _layers.partition_layers({"w": _a(2), "step": jnp.int32(5)})
  slots = dict(zip(part.leaf_paths, part.leaf_layers))
  assert slots == {"step": None, "w": (0, 0)}
  assert _layers.for_leaf(jnp.full([1], 0.5), slots["step"], 0) == 1.0
  assert _layers.for_leaf(jnp.full([1], 0.5), slots["w"], 1) == 0.5


# Rule 4: a group budgeted as one layer that looks stacked warns.

@pytest.mark.parametrize("params,group", [
    ({"embed": _a(V, D), "blocks": {"attn": {"w": _a(4, D, D)},
                                    "mlp": {"w": _a(4, D, 4 * D)}},
      "ln_f": _a(D)}, "blocks"),
    ({"embed": _a(V, D), "model": {"blocks": {"w": _a(4, D, D), "b": _a(4, D)},
                                   "ln_f": _a(4, D)}}, "model"),
    ({"params": {"Embed_0": {"embedding": _a(V, D)},
                 "ScanBlock_0": {"Dense_0": {"kernel": _a(4, D, D),
                                             "bias": _a(4, D)}}}},
     "params/ScanBlock_0"),
])
def test_undeclared_stack_warns_naming_group_size_and_fix(params, group):
  part = _layers.partition_layers(params)
  assert part.suspected_stacks == ((group, 4),)
  messages = init_warnings(params)
  assert len(messages) == 1
  assert f"{group!r}" in messages[0] and "size 4" in messages[0]
  assert f"stacked=({group!r},)" in messages[0]
  assert_no_warning(params, stacked=(group,))


@pytest.mark.parametrize("params", [
    # 1-D leaves (a bias, a norm scale): an unstacked layer of width 8.
    {"embed": _a(V, D), "mlp": {"w": _a(D, 4 * D), "b": _a(D)}, "ln": _a(D)},
    # One leaf: the general one-layer warning's business, not this one.
    {"embed": _a(V, D), "blocks": {"w": _a(4, D, D)}, "ln": _a(D)},
    # Elements of a sequence are blocks, whatever their shapes.
    {"embed": _a(V, D), "blocks": [{"w": _a(D, D), "u": _a(D, 3)}] * 2},
    # Leading sizes that differ.
    {"embed": _a(V, D), "mlp": {"w": _a(D, 3 * D), "u": _a(3 * D, D)},
     "ln": _a(D)},
])
def test_no_stack_warning(params):
  assert _layers.partition_layers(params).suspected_stacks == ()
  assert_no_warning(params)


def test_check_budget_with_warn_false_is_silent():
  params = {"embed": _a(V, D), "blocks": {"w": _a(4, D, D), "b": _a(4, D)},
            "ln_f": _a(D)}
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _layers.check_budget(_layers.partition_layers(params), "test", warn=False)
  with pytest.warns(UserWarning, match=r"stacked=\('blocks',\)"):
    _layers.check_budget(_layers.partition_layers(params), "test")
