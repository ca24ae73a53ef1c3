"""Tests for the layer grouping in ``ebc_optax._layers``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ebc_optax
from ebc_optax import _layers
from conftest import tiny_params


def _a(n=2):
  return jnp.ones((n,))


# ---------------------------------------------------------------------------
# default_layer_labels
# ---------------------------------------------------------------------------


def test_default_labels_nested_dict_with_list_of_blocks():
  params = {
      "embed": _a(),
      "blocks": [{"attn": {"q": _a(), "k": _a()}, "mlp": {"w": _a()}},
                 {"attn": {"q": _a(), "k": _a()}, "mlp": {"w": _a()}}],
      "final_norm": {"scale": _a()},
      "lm_head": {"kernel": _a()},
  }
  labels = ebc_optax.layers.default_layer_labels(params)
  assert labels == {
      "embed": "embed",
      "blocks": [{"attn": {"q": "blocks/0", "k": "blocks/0"},
                  "mlp": {"w": "blocks/0"}},
                 {"attn": {"q": "blocks/1", "k": "blocks/1"},
                  "mlp": {"w": "blocks/1"}}],
      "final_norm": {"scale": "final_norm"},
      "lm_head": {"kernel": "lm_head"},
  }


def test_default_labels_tuple_of_blocks():
  params = {"layers": ({"w": _a(), "b": _a()}, {"w": _a(), "b": _a()},
                       {"w": _a(), "b": _a()}),
            "head": _a()}
  labels = ebc_optax.layers.default_layer_labels(params)
  assert labels == {"layers": ({"w": "layers/0", "b": "layers/0"},
                               {"w": "layers/1", "b": "layers/1"},
                               {"w": "layers/2", "b": "layers/2"}),
                    "head": "head"}


def test_default_labels_list_of_bare_arrays():
  params = {"blocks": [_a(), _a(), _a()], "embed": _a()}
  assert ebc_optax.layers.default_layer_labels(params) == {
      "blocks": ["blocks/0", "blocks/1", "blocks/2"], "embed": "embed"}


def test_default_labels_int_keyed_dicts_as_in_flax_nnx():
  params = {
      "embed": {"embedding": _a()},
      "blocks": {0: {"linear": {"kernel": _a(), "bias": _a()}},
                 1: {"linear": {"kernel": _a(), "bias": _a()}},
                 2: {"linear": {"kernel": _a(), "bias": _a()}}},
      "lm_head": {"kernel": _a()},
  }
  labels = ebc_optax.layers.default_layer_labels(params)
  for i in range(3):
    assert labels["blocks"][i] == {"linear": {"kernel": f"blocks/{i}",
                                              "bias": f"blocks/{i}"}}
  assert labels["embed"] == {"embedding": "embed"}
  assert labels["lm_head"] == {"kernel": "lm_head"}
  assert ebc_optax.layers.budget_layers(params) == ("blocks/0", "blocks/1", "blocks/2")


def test_default_labels_digit_string_keys():
  params = {"h": {"0": {"w": _a()}, "1": {"w": _a()}}, "wte": _a()}
  labels = ebc_optax.layers.default_layer_labels(params)
  assert labels == {"h": {"0": {"w": "h/0"}, "1": {"w": "h/1"}}, "wte": "wte"}
  assert ebc_optax.layers.budget_layers(params) == ("h/0", "h/1")


def test_default_labels_non_index_second_component_is_not_split():
  # Named sub-modules are one layer: only sequence indices split a group.
  params = {"encoder": {"attn": {"w": _a()}, "mlp": {"w": _a()}},
            "mixed": {"a1": _a(), "x": _a()}}
  assert ebc_optax.layers.default_layer_labels(params) == {
      "encoder": {"attn": {"w": "encoder"}, "mlp": {"w": "encoder"}},
      "mixed": {"a1": "mixed", "x": "mixed"}}


def test_default_labels_top_level_leaf_and_bare_array():
  assert ebc_optax.layers.default_layer_labels({"w": _a(), "b": _a()}) == {
      "w": "w", "b": "b"}
  assert ebc_optax.layers.default_layer_labels(_a()) == "params"


def test_default_labels_conftest_model():
  params = tiny_params(jax.random.PRNGKey(0), num_blocks=3)
  labels = ebc_optax.layers.default_layer_labels(params)
  assert jax.tree.structure(labels) == jax.tree.structure(params)
  assert labels["embed"] == "embed"
  assert labels["lm_head"] == "lm_head"
  assert [b["w"] for b in labels["blocks"]] == ["blocks/0", "blocks/1", "blocks/2"]
  assert [b["b"] for b in labels["blocks"]] == ["blocks/0", "blocks/1", "blocks/2"]


# ---------------------------------------------------------------------------
# is_embed_or_output
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,expected", [
    ("tok_embed", True), ("wte", True), ("wpe", True), ("pos_emb", True),
    ("lm_head", True), ("head", True), ("unembed", True), ("out_proj", True),
    ("readout", True), ("embed", True), ("embedding", True), ("tokEmbed", True),
    ("classifier", True), ("output", True), ("logits", True),
    ("lm_head/0", True), ("embed/3", True),
    ("blocks", False), ("dropout", False), ("layout", False), ("mlp", False),
    ("attn", False), ("final_norm", False), ("ln_f", False),
    ("blocks/0", False), ("blocks/11", False), ("h/0", False),
    ("layers", False), ("headless", False), ("outer", False),
    # The group's own name (last non-index component) counts, at any depth;
    # the wrappers above it do not.
    ("blocks/lm_head", True), ("embed/blocks", False),
    ("transformer/wte", True), ("transformer/h/3", False),
    ("model/embed_tokens", True), ("model/layers/0", False),
    ("tok_embeddings", True), ("emb", True), ("params/Embed_0", True),
    ("model/norm", False), ("output", True), ("params/ScanBlock_0/2", False),
])
def test_is_embed_or_output_table(name, expected):
  assert ebc_optax.layers.is_embed_or_output(name) is expected


# ---------------------------------------------------------------------------
# partition_layers / budget_layers
# ---------------------------------------------------------------------------


def test_partition_layers_order_and_indices_tiny_model():
  params = tiny_params(jax.random.PRNGKey(0), num_blocks=3)
  leaves_with_paths = jax.tree_util.tree_leaves_with_path(params)
  part = _layers.partition_layers(params)
  assert part.labels == ("blocks/0", "blocks/1", "blocks/2")
  assert part.excluded_labels == ("embed", "lm_head")
  assert part.num_leaves == len(leaves_with_paths) == 8
  # Independently recompute the leaf indices from the key paths.
  for label, idx in zip(part.labels, part.leaf_indices):
    block = int(label.split("/")[1])
    want = tuple(i for i, (path, _) in enumerate(leaves_with_paths)
                 if path[0].key == "blocks" and path[1].idx == block)
    assert idx == want
    assert len(idx) == 2  # w and b
  # Indices are a partition of the budgeted leaves: disjoint, in range.
  flat = [i for idx in part.leaf_indices for i in idx]
  assert len(flat) == len(set(flat)) == 6
  leaves = jax.tree.leaves(params)
  assert all(0 <= i < len(leaves) for i in flat)
  # The excluded leaves are the embedding and head.
  rest = sorted(set(range(len(leaves))) - set(flat))
  assert sorted(leaves[i].shape for i in rest) == sorted(
      [params["embed"].shape, params["lm_head"].shape])


def test_partition_layers_order_is_first_appearance_in_flatten_order():
  # Flatten order of dict keys is sorted: "a_blocks" < "m" < "z_blocks".
  params = {"z_blocks": [_a(), _a()], "m": _a(), "a_blocks": [_a(), _a()]}
  part = _layers.partition_layers(params)
  assert part.labels == ("a_blocks/0", "a_blocks/1", "m", "z_blocks/0",
                         "z_blocks/1")
  assert part.leaf_indices == ((0,), (1,), (2,), (3,), (4,))
  assert part.excluded_labels == ()
  assert part.num_leaves == 5


def test_partition_layers_include_embed_out():
  params = tiny_params(jax.random.PRNGKey(0), num_blocks=2)
  part = _layers.partition_layers(params, include_embed_out=True)
  assert part.labels == ("blocks/0", "blocks/1", "embed", "lm_head")
  assert part.excluded_labels == ()
  leaves = jax.tree.leaves(params)
  assert leaves[part.leaf_indices[2][0]].shape == params["embed"].shape
  assert leaves[part.leaf_indices[3][0]].shape == params["lm_head"].shape
  assert len(part.leaf_indices[2]) == len(part.leaf_indices[3]) == 1


def test_budget_layers_include_embed_out_flag():
  params = {"tok_embed": _a(), "blocks": [_a(), _a()], "ln_f": _a(),
            "lm_head": _a(), "wpe": _a()}
  assert ebc_optax.layers.budget_layers(params) == ("blocks/0", "blocks/1", "ln_f")
  assert ebc_optax.layers.budget_layers(params, include_embed_out=True) == (
      "blocks/0", "blocks/1", "lm_head", "ln_f", "tok_embed", "wpe")
  assert _layers.partition_layers(params).excluded_labels == (
      "lm_head", "tok_embed", "wpe")


def test_custom_layer_labels_function():
  params = tiny_params(jax.random.PRNGKey(0), num_blocks=3)

  def by_kind(p):
    # Group all weight matrices of the blocks together, all biases together;
    # the embedding gets a non-embed name so it is budgeted too.
    return {"embed": "input_table",
            "blocks": [{"w": "weights", "b": "biases"} for _ in p["blocks"]],
            "lm_head": "lm_head"}

  part = _layers.partition_layers(params, layer_labels=by_kind)
  leaves = jax.tree.leaves(params)
  # Flatten order: blocks/0/b, blocks/0/w, ..., embed, lm_head.
  assert part.labels == ("biases", "weights", "input_table")
  assert part.excluded_labels == ("lm_head",)
  assert [leaves[i].shape for i in part.leaf_indices[0]] == [(6,)] * 3
  assert [leaves[i].shape for i in part.leaf_indices[1]] == [(6, 6)] * 3
  assert part.leaf_indices[2] == (6,)
  assert ebc_optax.layers.budget_layers(params, by_kind) == part.labels
  assert ebc_optax.layers.budget_layers(params, by_kind, include_embed_out=True) == (
      "biases", "weights", "input_table", "lm_head")


def test_custom_labels_single_group_for_everything():
  params = tiny_params(jax.random.PRNGKey(0))
  part = _layers.partition_layers(
      params, layer_labels=lambda p: jax.tree.map(lambda _: "all", p))
  assert part.labels == ("all",)
  assert part.leaf_indices == (tuple(range(len(jax.tree.leaves(params)))),)


@pytest.mark.parametrize("bad_labels", [
    lambda p: {"embed": "embed", "blocks": "blocks", "lm_head": "lm_head"},
    lambda p: ["a", "b"],
    lambda p: {**jax.tree.map(lambda _: "x", p), "extra": "y"},
    lambda p: {"embed": "e", "lm_head": "h",
               "blocks": [{"w": "w", "b": "b"}]},  # one block too few
])
def test_wrong_label_structure_raises(bad_labels):
  params = tiny_params(jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="structure"):
    _layers.partition_layers(params, layer_labels=bad_labels)
  with pytest.raises(ValueError, match="structure"):
    ebc_optax.layers.budget_layers(params, bad_labels)


@pytest.mark.parametrize("bad_leaf", [3, 1.5, b"blocks", ("a",)])
def test_non_str_label_raises(bad_leaf):
  params = {"a": _a(), "b": _a()}
  labels = {"a": "a", "b": bad_leaf}
  if isinstance(bad_leaf, tuple):
    # A tuple is a pytree node: the structure differs instead.
    with pytest.raises(ValueError, match="structure"):
      _layers.partition_layers(params, layer_labels=lambda p: labels)
    return
  with pytest.raises(ValueError, match="str"):
    _layers.partition_layers(params, layer_labels=lambda p: labels)


def test_partition_accepts_shape_dtype_structs():
  params = tiny_params(jax.random.PRNGKey(0), num_blocks=2)
  abstract = jax.eval_shape(lambda: params)
  assert _layers.partition_layers(abstract) == _layers.partition_layers(params)


def test_select_leaves():
  leaves = [np.zeros(1), np.ones(2), np.ones(3)]
  got = _layers.select_leaves(leaves, (2, 0))
  assert got[0] is leaves[2] and got[1] is leaves[0]
