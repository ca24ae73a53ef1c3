"""Grouping parameters into the layers (blocks) that EBC budgets.

A *layer* is a set of parameter leaves whose update is treated as one block
``ΔW_ℓ`` of the surrogate ``S = Σ_ℓ β_ℓ ‖ΔW_ℓ‖``. The grouping is static: it is
computed from the structure of ``params`` at trace time, in tree-flatten order.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax

LayerLabelsFn = Callable[[Any], Any]

# Embedding / output-head groups are recognised by the *name* of the group (the
# first path component, or the label a user function returned). A label is split
# on non-alphanumeric characters and matched token by token, so ``dropout`` or
# ``layout`` do not match ``out`` by accident.
_EMBED_OUT_TOKENS = frozenset({
    "embed", "embeds", "embedding", "embeddings", "embedder",
    "wte", "wpe", "tok", "pos", "token", "position", "positional",
    "unembed", "unembedding", "lm", "head", "heads", "readout",
    "out", "output", "logits", "classifier",
})
_TOKEN_SPLIT = re.compile(
    r"[^0-9a-zA-Z]+|(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")


def is_embed_or_output(label: str) -> bool:
  """Whether a layer label names an embedding or output-head group.

  The label's first path component (``"blocks/0" -> "blocks"``) is split into
  lower-case tokens at non-alphanumeric characters and camel-case boundaries;
  it is an embedding/output group when any token is one of ``embed(ding)(s)``,
  ``wte``, ``wpe``, ``tok(en)``, ``pos(ition)(al)``, ``unembed(ding)``, ``lm``,
  ``head(s)``, ``readout``, ``out(put)``, ``logits`` or ``classifier``.

  Example:
    >>> [is_embed_or_output(s) for s in ("tok_embed", "lm_head", "blocks/0",
    ...                                  "dropout", "out_proj", "final_norm")]
    [True, True, False, False, True, False]
  """
  return bool(name_tokens(label.split("/", 1)[0]) & _EMBED_OUT_TOKENS)


def name_tokens(name: str) -> set[str]:
  """Lower-case tokens of a name, split at non-alphanumerics and camel case.

  Example:
    >>> sorted(name_tokens("LMHead_out"))
    ['head', 'lm', 'out']
  """
  return {t.lower() for t in _TOKEN_SPLIT.split(name) if t}


def key_name(entry: Any) -> str:
  """The name of one ``jax.tree_util`` key-path entry."""
  for attr in ("key", "name", "idx"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def _is_index(entry: Any) -> bool:
  """Path entries that index a sequence of blocks (list/tuple, or int keys)."""
  if isinstance(entry, jax.tree_util.SequenceKey):
    return True
  key = getattr(entry, "key", None)
  if isinstance(key, int):  # Flax NNX states store lists as int-keyed dicts.
    return True
  return isinstance(key, str) and key.isdigit()


def default_layer_labels(params: Any) -> Any:
  """Default grouping: one layer per top-level entry, one per block in a list.

  A leaf at path ``("blocks", 1, "attn", "kernel")`` is labelled ``"blocks/1"``;
  a leaf at ``("lm_head", "kernel")`` is labelled ``"lm_head"``. A top-level
  leaf is labelled by its own name. Sequences are recognised as list/tuple
  children or integer (or digit-string) dict keys, which is how Flax NNX stores
  ``nnx.List`` of blocks.

  Args:
    params: the parameter pytree.

  Returns:
    A pytree with the structure of ``params`` whose leaves are label strings.

  Example:
    >>> import jax.numpy as jnp
    >>> p = {"embed": jnp.ones(2), "blocks": [{"w": jnp.ones(2)}, {"w": jnp.ones(2)}]}
    >>> default_layer_labels(p)
    {'blocks': [{'w': 'blocks/0'}, {'w': 'blocks/1'}], 'embed': 'embed'}
  """

  def label(path, _):
    if not path:
      return "params"
    name = key_name(path[0])
    if len(path) > 1 and _is_index(path[1]):
      return f"{name}/{key_name(path[1])}"
    return name

  return jax.tree_util.tree_map_with_path(label, params)


class LayerPartition(NamedTuple):
  """Static description of the budgeted layers of a parameter tree.

  Attributes:
    labels: budgeted layer labels, in order of first appearance in the
      flattened params (this is the order of every per-layer array in the
      EBC state and telemetry).
    leaf_indices: for each budgeted layer, the indices of its leaves in
      ``jax.tree.leaves(params)``.
    excluded_labels: labels that exist but are left out of the budget
      (embedding/output groups when ``include_embed_out=False``). Their
      updates are still scaled by the common factor ``c``.
    num_leaves: number of leaves of ``params``.
  """
  labels: tuple[str, ...]
  leaf_indices: tuple[tuple[int, ...], ...]
  excluded_labels: tuple[str, ...]
  num_leaves: int


def partition_layers(
    params: Any,
    layer_labels: LayerLabelsFn | None = None,
    include_embed_out: bool = False,
) -> LayerPartition:
  """Groups the leaves of ``params`` into budgeted layers.

  Args:
    params: the parameter pytree (arrays or shape-dtype structs).
    layer_labels: optional ``params -> pytree of str`` with the structure of
      ``params``; defaults to :func:`default_layer_labels`.
    include_embed_out: keep embedding/output-head groups (see
      :func:`is_embed_or_output`) in the budget.

  Returns:
    A :class:`LayerPartition`.

  Raises:
    ValueError: when the labels do not match the structure of ``params`` or a
      label is not a string.
  """
  label_fn = default_layer_labels if layer_labels is None else layer_labels
  labels_tree = label_fn(params)
  param_leaves, param_def = jax.tree.flatten(params)
  label_leaves, label_def = jax.tree.flatten(labels_tree)
  if label_def != param_def:
    raise ValueError(
        "layer_labels(params) must return a pytree with the structure of "
        f"params; got labels structure {label_def} for params structure "
        f"{param_def}.")
  order: dict[str, list[int]] = {}
  for i, lab in enumerate(label_leaves):
    if not isinstance(lab, str):
      raise ValueError(
          f"layer_labels must give a str per leaf; leaf {i} got {lab!r}.")
    order.setdefault(lab, []).append(i)
  kept = [lab for lab in order if include_embed_out or not is_embed_or_output(lab)]
  excluded = tuple(lab for lab in order if lab not in kept)
  return LayerPartition(
      labels=tuple(kept),
      leaf_indices=tuple(tuple(order[lab]) for lab in kept),
      excluded_labels=excluded,
      num_leaves=len(param_leaves),
  )


def budget_layers(
    params: Any,
    layer_labels: LayerLabelsFn | None = None,
    include_embed_out: bool = False,
) -> tuple[str, ...]:
  """Labels of the budgeted layers, in the order of the per-layer telemetry.

  Example:
    >>> import jax.numpy as jnp
    >>> p = {"embed": jnp.ones(2), "blocks": [jnp.ones(2), jnp.ones(2)],
    ...      "lm_head": jnp.ones(2)}
    >>> budget_layers(p)
    ('blocks/0', 'blocks/1')
  """
  return partition_layers(params, layer_labels, include_embed_out).labels


def select_leaves(leaves: Sequence[Any], indices: Sequence[int]) -> list[Any]:
  return [leaves[i] for i in indices]
