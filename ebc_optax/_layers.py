"""Grouping parameters into the layers (blocks) that EBC budgets.

A *layer* is a set of parameter leaves — or, for layers stacked on a leading
axis (``nn.scan``, ``nnx.scan``, ``lax.scan`` models), one slice of a set of
leaves — whose update is treated as one block ``ΔW_ℓ`` of the surrogate
``S = Σ_ℓ β_ℓ ‖ΔW_ℓ‖``. The grouping is static: it is computed from the
structure (and leading sizes) of ``params`` at trace time, in tree-flatten
order.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

LayerLabelsFn = Callable[[Any], Any]
Stacked = Sequence[str] | str | None

# Embedding / output-head groups are recognised by the *name* of the group: the
# last component of its label that is not a sequence index (``transformer/wte``
# -> ``wte``, ``blocks/3`` -> ``blocks``). The name is split on non-alphanumeric
# characters and camel case and matched token by token, so ``dropout`` or
# ``layout`` do not match ``out`` by accident.
_EMBED_OUT_TOKENS = frozenset({
    "embed", "embeds", "embedding", "embeddings", "embedder", "emb",
    "wte", "wpe", "tok", "pos", "token", "position", "positional",
    "unembed", "unembedding", "lm", "head", "heads", "readout",
    "out", "output", "logits", "classifier",
})
_TOKEN_SPLIT = re.compile(
    r"[^0-9a-zA-Z]+|(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])")
# Top-level keys that hold variable collections (Flax linen ``variables``):
# their children are the model's groups.
_COLLECTION_KEYS = frozenset({"params"})
# A group whose name has one of these tokens, and none of the next set, holds
# a token embedding table ``[V, d]``: its first axis is the vocab size. Tables
# of positions and token types carry embed tokens too, but their first axis is
# a length or a type count; an output head's first axis is the width.
_TOKEN_TABLE_TOKENS = frozenset({
    "embed", "embeds", "embedding", "embeddings", "embedder", "emb", "wte",
    "tok", "token"})
_NOT_TOKEN_TABLE_TOKENS = frozenset({
    "wpe", "pos", "position", "positional", "type", "types", "segment",
    "unembed", "unembedding", "lm", "head", "heads", "readout", "out",
    "output", "logits", "classifier"})
# Flax linen names unnamed submodules ``ClassName_i`` and list attributes of
# ``setup`` ``attr_i``: siblings ``Block_0 ... Block_{n-1}`` are a sequence.
_NUMBERED = re.compile(r"(.+)_(0|[1-9][0-9]*)")


def group_name(label: str) -> str:
  """The last component of ``label`` that is not a sequence index.

  Example:
    >>> [group_name(s) for s in ("transformer/h/0", "model/embed_tokens", "3")]
    ['h', 'embed_tokens', '3']
  """
  parts = label.split("/")
  named = [p for p in parts if not p.isdigit()]
  return named[-1] if named else parts[-1]


def is_embed_or_output(label: str) -> bool:
  """Whether a layer label names an embedding or output-head group.

  The group's own name (:func:`group_name`: the last label component that is
  not an index, so ``"transformer/wte"`` -> ``"wte"``; the wrappers above it do
  not count) is split into lower-case tokens at non-alphanumeric characters and
  camel-case boundaries; it is an embedding/output group when any token is one
  of ``emb``, ``embed(ding)(s)``, ``wte``, ``wpe``, ``tok(en)``,
  ``pos(ition)(al)``, ``unembed(ding)``, ``lm``, ``head(s)``, ``readout``,
  ``out(put)``, ``logits`` or ``classifier``. :func:`partition_layers` also
  leaves out groups whose name says nothing but whose shapes are vocab-sized
  (the auto-named linen head ``Dense_0``).

  Example:
    >>> [is_embed_or_output(s) for s in ("tok_embed", "lm_head", "blocks/0",
    ...     "dropout", "out_proj", "final_norm", "model/embed_tokens")]
    [True, True, False, False, True, False, True]
  """
  return bool(name_tokens(group_name(label)) & _EMBED_OUT_TOKENS)


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


def numbered_siblings(names: Iterable[str]) -> frozenset[str]:
  """The sibling names that number a sequence ``Name_0`` ... ``Name_{n-1}``.

  Flax linen names unnamed submodules ``ClassName_i`` and the elements of a
  list attribute ``attr_i``, so siblings ``Block_0, Block_1`` are a sequence
  of blocks: at least two with one stem, numbered from 0 without a gap. A
  lone ``Dense_0`` or ``LayerNorm_0`` is a module of its own.

  Example:
    >>> sorted(numbered_siblings(["Embed_0", "Block_0", "Block_1", "Dense_0",
    ...                           "h_1", "h_2", "blocks_0", "blocks_01"]))
    ['Block_0', 'Block_1']
  """
  numbers: dict[str, set[int]] = {}
  for name in set(names):
    match = _NUMBERED.fullmatch(name)
    if match:
      numbers.setdefault(match[1], set()).add(int(match[2]))
  return frozenset(
      f"{stem}_{i}" for stem, found in numbers.items()
      if len(found) >= 2 and found == set(range(len(found))) for i in found)


def path_str(path: Sequence[Any]) -> str:
  """``"a/b/0"`` for a ``jax.tree_util`` key path."""
  return "/".join(key_name(e) for e in path)


def check_stacked(stacked: Stacked) -> tuple[str, ...]:
  if stacked is None:
    return ()
  if isinstance(stacked, str):
    stacked = (stacked,)
  out = tuple(stacked)
  for p in out:
    if not isinstance(p, str) or not p.strip("/"):
      raise ValueError(
          "stacked must be a sequence of label prefixes such as 'blocks' or "
          f"'params/ScanBlock_0'; got {stacked!r}.")
  return tuple(p.strip("/") for p in out)


def _numbered_blocks(names: Sequence[tuple[str, ...]],
                     shapes: Sequence[tuple[int, ...] | None]
                     ) -> dict[tuple[str, ...], frozenset[str]]:
  """Per parent path, the children that are numbered blocks.

  :func:`numbered_siblings` that are modules of modules (``Block_0`` holds
  ``Dense_0``; the ``Dense_0, Dense_1`` or ``LayerNorm_0, LayerNorm_1``
  layers inside one block are leaves' modules, not blocks), under a parent
  that is not itself a stack (an ``nn.scan`` module's submodules are
  numbered too). ``shapes[m]`` is None for a leaf that is not a float.
  """
  below: dict[tuple[str, ...], list[int]] = {}
  for m, n in enumerate(names):
    for depth in range(len(n)):
      below.setdefault(n[:depth], []).append(m)
  out = {}
  for parent, members in below.items():
    depth = len(parent)
    composite = {names[m][depth] for m in members if len(names[m]) > depth + 2}
    floats = [shapes[m] for m in members if shapes[m] is not None]
    out[parent] = (frozenset() if leading_stack_size(floats)
                   else numbered_siblings(composite))
  return out


def _label_cuts(paths: Sequence[tuple[Any, ...]], stacked: tuple[str, ...],
                shapes: Sequence[tuple[int, ...] | None]) -> list[int]:
  """Per leaf, how many leading path entries make its group label."""
  names = [tuple(key_name(e) for e in p) for p in paths]
  numbered = _numbered_blocks(names, shapes)

  def is_index(m, depth):
    return (_is_index(paths[m][depth])
            or names[m][depth] in numbered[names[m][:depth]])

  first_index = [next((k for k in range(len(p)) if is_index(m, k)), len(p))
                 for m, p in enumerate(paths)]
  stacked_paths = [tuple(s.split("/")) for s in stacked]
  cuts = [0] * len(paths)

  def splits_below(members, depth):
    return any(first_index[m] >= depth for m in members
               if first_index[m] < len(names[m])) or any(
                   len(s) > depth and names[m][:len(s)] == s
                   for m in members for s in stacked_paths)

  def cut(members, depth):
    for m in members:
      cuts[m] = depth

  def assign(members, depth, must_split):
    if len(names[members[0]]) == depth or (
        depth and names[members[0]][:depth] in stacked_paths):
      return cut(members, depth)  # a leaf, or a declared stack of layers
    children: dict[str, list[int]] = {}
    for m in members:
      children.setdefault(names[m][depth], []).append(m)
    if all(is_index(m, depth) for m in members):
      for child in children.values():
        cut(child, depth + 1)  # a sequence of blocks: one layer per element
    elif must_split and len(children) == 1:
      assign(members, depth + 1, True)  # a single-entry wrapper
    elif must_split and depth and all(len(names[m]) == depth + 1
                                      for m in members):
      cut(members, depth)  # a wrapped layer of bare leaves ({"params": {w, b}})
    elif must_split or splits_below(members, depth):
      for name, child in children.items():
        assign(child, depth + 1, depth == 0 and name in _COLLECTION_KEYS)
    else:
      cut(members, depth)

  if paths:
    assign(list(range(len(paths))), 0, True)
  return cuts


def default_layer_labels(params: Any, stacked: Stacked = None) -> Any:
  """Default grouping: finds the blocks of a parameter tree at any depth.

  The label of a leaf is the path of its group, written ``"a/b/0"``:

  * a leading collection key (``params``) and single-entry wrappers
    (``transformer``, ``model``) are descended through;
  * the first sequence on a path — a list or tuple, a dict with integer
    or digit-string keys (how Flax NNX stores ``nnx.List`` and Hugging Face
    Flax stores ``h/0``), or numbered siblings ``Block_0, Block_1, ...`` (how
    Flax linen names unnamed submodules; see :func:`numbered_siblings`) that
    hold modules of their own, outside a stack — is split, one layer per
    element, at any depth;
  * every other entry at the top level, or beside a sequence, is one group
    (``transformer/wte``, ``model/norm``, ``lm_head``); a group with no
    sequence below it is not split further.

  A prefix in ``stacked`` (a path written the same way) is one group whose
  leaves hold one layer per slice of their leading axis (see
  :func:`partition_layers`).

  Args:
    params: the parameter pytree.
    stacked: label prefixes of layers stacked on axis 0.

  Returns:
    A pytree with the structure of ``params`` whose leaves are label strings.

  Example:
    >>> import jax.numpy as jnp
    >>> p = {"transformer": {"wte": jnp.ones(2),
    ...                      "h": {"0": {"w": jnp.ones(2)}, "1": {"w": jnp.ones(2)}}},
    ...      "lm_head": jnp.ones(2)}
    >>> default_layer_labels(p)["transformer"]
    {'h': {'0': {'w': 'transformer/h/0'}, '1': {'w': 'transformer/h/1'}}, 'wte': 'transformer/wte'}
    >>> linen = {"params": {"decoder": {"Embed_0": jnp.ones(2),
    ...     "Block_0": {"Dense_0": jnp.ones(2)}, "Block_1": {"Dense_0": jnp.ones(2)}}}}
    >>> sorted(set(jax.tree.leaves(default_layer_labels(linen))))
    ['params/decoder/Block_0', 'params/decoder/Block_1', 'params/decoder/Embed_0']
  """
  stacked = check_stacked(stacked)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [tuple(p) for p, _ in flat]
  shapes = [tuple(getattr(x, "shape", ())) if is_inexact(x) else None
            for _, x in flat]
  cuts = _label_cuts(paths, stacked, shapes)
  labels = [path_str(p[:k]) if k else (path_str(p) or "params")
            for p, k in zip(paths, cuts)]
  return jax.tree.unflatten(treedef, labels)


# A leaf's place in the layers: (first layer, number of stacked slices), the
# second 0 for a leaf that belongs to one layer whole; None for a leaf outside
# the budget.
LeafLayers = tuple[int, int] | None


class LayerPartition(NamedTuple):
  """Static description of the budgeted layers of a parameter tree.

  Attributes:
    labels: budgeted layer labels, in order of first appearance in the
      flattened params (this is the order of every per-layer array in the
      EBC state and telemetry); a stacked group ``g`` of ``n`` slices gives
      ``g/0`` ... ``g/{n-1}``.
    leaf_layers: per leaf of ``jax.tree.leaves(params)``, ``(layer, 0)`` for
      a leaf that belongs whole to layer ``layer``, ``(first, n)`` for a
      stacked leaf whose slice ``i`` belongs to layer ``first + i``, None for
      a leaf outside the budget (embedding/output groups left out, and every
      integer, boolean or PRNG-key leaf).
    excluded_labels: groups that exist but are left out of the budget
      (embedding/output groups when ``include_embed_out=False``). Their
      updates are still scaled by the common factor ``c``.
    num_leaves: number of leaves of ``params``.
    leaf_paths: the ``"a/b/0"`` path of every leaf (for messages).
    groups: every group label with a floating-point leaf, budgeted or not (a
      stacked group once).
    suspected_stacks: ``(label, n)`` for each group budgeted as one layer
      whose leaves look like ``n`` layers stacked on axis 0 (see
      :func:`leading_stack_size`); :func:`check_budget` warns about them.
    vocab_sizes: the vocab sizes that marked groups as embedding/output
      groups by shape (see :func:`token_table_sizes`).
  """
  labels: tuple[str, ...]
  leaf_layers: tuple[LeafLayers, ...]
  excluded_labels: tuple[str, ...]
  num_leaves: int
  leaf_paths: tuple[str, ...] = ()
  groups: tuple[str, ...] = ()
  suspected_stacks: tuple[tuple[str, int], ...] = ()
  vocab_sizes: tuple[int, ...] = ()

  @property
  def leaf_indices(self) -> tuple[tuple[int, ...], ...]:
    """For each budgeted layer, the indices of the leaves it touches."""
    out: list[list[int]] = [[] for _ in self.labels]
    for i, slot in enumerate(self.leaf_layers):
      if slot is not None:
        for layer in range(slot[0], slot[0] + max(slot[1], 1)):
          out[layer].append(i)
    return tuple(tuple(x) for x in out)

  @property
  def budgeted_leaves(self) -> tuple[int, ...]:
    """Indices of the leaves inside the budget."""
    return tuple(i for i, s in enumerate(self.leaf_layers) if s is not None)


def is_inexact(leaf: Any) -> bool:
  """Whether a leaf holds floating-point (or complex) values.

  Only those can be layers: integer, boolean and PRNG-key leaves (step
  counters, RNG counts and keys) have no gradient and are never budgeted.

  Example:
    >>> import jax.numpy as jnp
    >>> [is_inexact(x) for x in (jnp.ones(2), jnp.int32(0), 1.5, True)]
    [True, False, True, False]
  """
  dtype = getattr(leaf, "dtype", None)
  try:
    dtype = np.result_type(leaf) if dtype is None else dtype
  except TypeError:  # not an array (a string, an object)
    return False
  return bool(jnp.issubdtype(dtype, jnp.inexact))


def token_table_sizes(
    group_shapes: Mapping[str, Sequence[tuple[int, ...]]]) -> frozenset[int]:
  """Vocab sizes read off the token embedding tables ``[V, d]`` of a model.

  A group whose own name (:func:`group_name`) has a token of a token
  embedding (``embed``, ``embedding(s)``, ``emb``, ``wte``, ``tok(en)``) and
  none of a table of positions or token types (``wpe``, ``pos(ition)``,
  ``type``) or of an output head (``lm``, ``head``, ``out``, ...) gives the
  first axis ``V`` of each of its 2-D leaves: ``Embed_0/embedding``,
  ``wte/embedding``, ``embed_tokens/embedding``, equinox
  ``embedding/weight``. A square table gives nothing: with ``V == d`` every
  width-``d`` leaf would look vocab-sized.

  Example:
    >>> token_table_sizes({"params/Embed_0": [(32, 8)], "transformer/wpe": [(16, 8)],
    ...                    "lm_head": [(8, 32)], "blocks/0": [(8, 32)]})
    frozenset({32})
  """
  sizes = set()
  for group, shapes in group_shapes.items():
    tokens = name_tokens(group_name(group))
    if tokens & _TOKEN_TABLE_TOKENS and not tokens & _NOT_TOKEN_TABLE_TOKENS:
      sizes.update(s[0] for s in shapes if len(s) == 2 and s[0] != s[1])
  return frozenset(sizes)


def is_vocab_sized(shapes: Sequence[tuple[int, ...]],
                   vocab_sizes: Collection[int]) -> bool:
  """Whether every leaf has a vocab size on its first or last axis.

  That is the shape of an embedding table ``[V, d]`` and of an output head:
  a linen/NNX kernel ``[d, V]`` with its bias ``[V]``, or an equinox weight
  ``[V, d]``.

  Example:
    >>> is_vocab_sized([(8, 32), (32,)], {32}), is_vocab_sized([(8,)], {32})
    (True, False)
  """
  return bool(shapes) and all(
      len(s) > 0 and (s[0] in vocab_sizes or s[-1] in vocab_sizes)
      for s in shapes)


def sequence_elements(groups: Iterable[str],
                      modules: Collection[str] | None = None) -> frozenset[str]:
  """The group labels that are elements of a sequence of blocks.

  An element's last label component is an index (``blocks/3``,
  ``transformer/h/0``) or one of :func:`numbered_siblings` among the labels
  with the same parent (``params/Block_0`` beside ``params/Block_1``) that
  are in ``modules`` (the groups holding modules of their own; None: all).

  Example:
    >>> sorted(sequence_elements(["blocks/0", "params/Block_0", "params/Block_1",
    ...                           "params/Dense_0", "ln_f"]))
    ['blocks/0', 'params/Block_0', 'params/Block_1']
    >>> sorted(sequence_elements(["Dense_0", "Dense_1"], modules=()))
    []
  """
  by_parent: dict[str, list[str]] = {}
  out = set()
  for group in groups:
    parent, _, name = group.rpartition("/")
    if modules is None or group in modules:
      by_parent.setdefault(parent, []).append(name)
    if name.isdigit():
      out.add(group)
  for parent, names in by_parent.items():
    out.update(f"{parent}/{n}" if parent else n for n in numbered_siblings(names))
  return frozenset(out)


def leading_stack_size(shapes: Sequence[tuple[int, ...]]) -> int:
  """``n`` when leaves look like ``n`` layers stacked on axis 0, else 0.

  The mark of an ``nn.scan`` / ``nnx.scan`` / ``jax.vmap`` stack: at least
  two leaves, every one at least 2-D, all with the same leading size
  ``n > 1``. A 1-D leaf (a bias, a norm scale) is what an unstacked layer
  has, so a group with one is not a stack.

  Example:
    >>> leading_stack_size([(4, 8, 8), (4, 8)]), leading_stack_size([(8, 8), (8,)])
    (4, 0)
  """
  leading = {s[0] for s in shapes if len(s) >= 2}
  if len(shapes) < 2 or any(len(s) < 2 for s in shapes) or len(leading) != 1:
    return 0
  n = leading.pop()
  return n if n > 1 else 0


def _stacked_of(label: str, stacked: tuple[str, ...]) -> str | None:
  for p in stacked:
    if label == p or label.startswith(p + "/"):
      return p
  return None


def _stack_size(group: str, indices: Sequence[int], shapes: Sequence[Any],
                paths: Sequence[str]) -> int:
  sizes = {paths[i]: (tuple(shapes[i])[0] if len(shapes[i]) else None)
           for i in indices}
  if len(set(sizes.values())) != 1 or None in sizes.values():
    raise ValueError(
        f"stacked={group!r}: every leaf under it must carry one slice per layer "
        "on axis 0, so all leading sizes must agree; got "
        + ", ".join(f"{p}: {s if s is not None else 'a scalar'}"
                    for p, s in sizes.items())
        + ". Leave the odd leaves out of the prefix (a deeper stacked prefix "
          "or layer_labels).")
  return next(iter(sizes.values()))


def _check_vocab_size(vocab_size: int | None) -> None:
  if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(
      vocab_size, (int, np.integer)) or vocab_size < 1):
    raise ValueError(
        f"vocab_size must be a positive int or None; got {vocab_size!r}.")


def partition_layers(
    params: Any,
    layer_labels: LayerLabelsFn | None = None,
    include_embed_out: bool = False,
    stacked: Stacked = None,
    *,
    vocab_size: int | None = None,
) -> LayerPartition:
  """Groups the leaves of ``params`` into budgeted layers.

  Only floating-point leaves are layers (:func:`is_inexact`); integer,
  boolean and PRNG-key leaves are outside the budget. Unless
  ``include_embed_out``, a group is left out as an embedding/output group
  when its name says so (:func:`is_embed_or_output`), or when it stands on
  its own — it is neither an element of a sequence of blocks
  (:func:`sequence_elements`) nor a ``stacked`` group — and every leaf has
  the vocab size on its first or last axis (:func:`is_vocab_sized`): the
  auto-named linen head ``params/Dense_0`` (kernel ``[d, V]``, bias
  ``[V]``). Blocks are never left out by shape: an MLP may be ``V`` wide.

  Args:
    params: the parameter pytree (arrays or shape-dtype structs).
    layer_labels: optional ``params -> pytree of str`` with the structure of
      ``params``; defaults to :func:`default_layer_labels` (given
      ``stacked``).
    include_embed_out: keep embedding/output-head groups (see
      :func:`is_embed_or_output`) in the budget.
    stacked: label prefixes (``"blocks"``, ``"params/ScanBlock_0"``,
      ``"model/layers"``) whose leaves carry one layer per slice of axis 0:
      every leaf labelled ``p`` or ``p/...`` belongs to the group ``p``, and
      slice ``i`` of all of them is layer ``"p/i"``.
    vocab_size: the vocab size ``V`` that marks embedding/output groups by
      shape; None reads it off the token embedding tables found by name
      (:func:`token_table_sizes`), and finds none when there is no such
      table.

  Returns:
    A :class:`LayerPartition`.

  Raises:
    ValueError: when the labels do not match the structure of ``params``, a
      label is not a string, a ``stacked`` prefix matches no leaf, the leaves
      of a stacked group disagree on their leading size, or ``vocab_size`` is
      not a positive int.

  Example:
    >>> import jax.numpy as jnp
    >>> p = {"params": {"Embed_0": {"embedding": jnp.ones((32, 8))},
    ...                 "Block_0": {"kernel": jnp.ones((8, 8))},
    ...                 "Block_1": {"kernel": jnp.ones((8, 8))},
    ...                 "Dense_0": {"kernel": jnp.ones((8, 32)), "bias": jnp.ones(32)}},
    ...      "step": jnp.zeros([], jnp.int32)}
    >>> part = partition_layers(p)
    >>> part.labels, part.excluded_labels, part.leaf_layers[-1]
    (('params/Block_0', 'params/Block_1'), ('params/Dense_0', 'params/Embed_0'), None)
  """
  stacked = check_stacked(stacked)
  _check_vocab_size(vocab_size)
  labels_tree = (default_layer_labels(params, stacked) if layer_labels is None
                 else layer_labels(params))
  flat, param_def = jax.tree_util.tree_flatten_with_path(params)
  label_leaves, label_def = jax.tree.flatten(labels_tree)
  if label_def != param_def:
    raise ValueError(
        "layer_labels(params) must return a pytree with the structure of "
        f"params; got labels structure {label_def} for params structure "
        f"{param_def}.")
  paths = tuple(path_str(p) for p, _ in flat)
  shapes = [tuple(getattr(x, "shape", ())) for _, x in flat]
  order: dict[str, list[int]] = {}
  for i, lab in enumerate(label_leaves):
    if not isinstance(lab, str):
      raise ValueError(
          f"layer_labels must give a str per leaf; leaf {paths[i]!r} got {lab!r}.")
    if is_inexact(flat[i][1]):
      order.setdefault(_stacked_of(lab, stacked) or lab, []).append(i)
  missing = [p for p in stacked if p not in order]
  if missing:
    raise ValueError(
        f"stacked={missing} names no group of the parameters; the groups are "
        f"{list(order)}. Write the prefix as budget_layers / "
        "default_layer_labels write labels, e.g. 'params/ScanBlock_0'.")
  group_shapes = {g: [shapes[i] for i in idx] for g, idx in order.items()}
  vocab = (token_table_sizes(group_shapes) if vocab_size is None
           else frozenset({int(vocab_size)}))
  modules = {g for g, idx in order.items() if any(
      paths[i].startswith(g + "/") and paths[i].count("/") > g.count("/") + 1
      for i in idx)}
  elements = sequence_elements(order, modules)
  labels: list[str] = []
  slots: list[LeafLayers] = [None] * len(label_leaves)
  excluded: list[str] = []
  suspects: list[tuple[str, int]] = []
  for group, indices in order.items():
    alone = group not in stacked and group not in elements
    if not include_embed_out and (is_embed_or_output(group) or (
        alone and is_vocab_sized(group_shapes[group], vocab))):
      excluded.append(group)
      continue
    n = _stack_size(group, indices, shapes, paths) if group in stacked else 0
    if alone and leading_stack_size(group_shapes[group]):
      suspects.append((group, leading_stack_size(group_shapes[group])))
    for i in indices:
      slots[i] = (len(labels), n)
    labels.extend([f"{group}/{k}" for k in range(n)] if n else [group])
  return LayerPartition(
      labels=tuple(labels), leaf_layers=tuple(slots),
      excluded_labels=tuple(excluded), num_leaves=len(label_leaves),
      leaf_paths=paths, groups=tuple(order), suspected_stacks=tuple(suspects),
      vocab_sizes=tuple(sorted(vocab)))


def budget_layers(
    params: Any,
    layer_labels: LayerLabelsFn | None = None,
    include_embed_out: bool = False,
    stacked: Stacked = None,
    *,
    vocab_size: int | None = None,
) -> tuple[str, ...]:
  """Labels of the budgeted layers, in the order of the per-layer telemetry.

  Call it once on a new model to check what EBC will budget. The arguments
  are those of :func:`partition_layers`.

  Example:
    >>> import jax.numpy as jnp
    >>> p = {"embed": jnp.ones(2), "blocks": [jnp.ones(2), jnp.ones(2)],
    ...      "lm_head": jnp.ones(2)}
    >>> budget_layers(p)
    ('blocks/0', 'blocks/1')
    >>> scanned = {"embed": jnp.ones(2), "blocks": {"w": jnp.ones((3, 2, 2))}}
    >>> budget_layers(scanned, stacked=("blocks",))
    ('blocks/0', 'blocks/1', 'blocks/2')
    >>> head = {"blocks": [jnp.ones(2), jnp.ones(2)], "proj": jnp.ones((2, 5))}
    >>> budget_layers(head), budget_layers(head, vocab_size=5)
    (('blocks/0', 'blocks/1', 'proj'), ('blocks/0', 'blocks/1'))
  """
  return partition_layers(params, layer_labels, include_embed_out, stacked,
                          vocab_size=vocab_size).labels


def check_budget(partition: LayerPartition, who: str, warn: bool = True) -> None:
  """Raises when nothing is budgeted; warns (``warn``) about undeclared stacks.

  It warns when a group budgeted as one layer looks like layers stacked on
  axis 0 (``partition.suspected_stacks``: an ``nn.scan`` / ``nnx.scan``
  stack without ``stacked=``), and otherwise when everything is one layer —
  not an element of a sequence or stack — although the tree has several
  groups (the mark of an unusual layout).
  """
  hint = ("Pass layer_labels=(params -> pytree of str) to name the blocks, "
          "stacked=('<prefix>',) for layers stacked on a leading axis "
          "(nn.scan / nnx.scan), or include_embed_out=True; check the result "
          "with ebc_optax.layers.budget_layers(params, ...).")
  if not partition.labels:
    by_shape = (f" Groups standing alone whose every leaf has the vocab size "
                f"{list(partition.vocab_sizes)} on its first or last axis count "
                "as embedding/output groups." if partition.vocab_sizes else "")
    raise ValueError(
        f"{who}: no layer to budget. The parameter groups found are "
        f"{list(partition.groups)}, all embedding/output groups "
        f"(left out: {list(partition.excluded_labels)}).{by_shape} {hint}")
  if not warn:
    return
  for group, n in partition.suspected_stacks:
    warnings.warn(
        f"{who}: the group {group!r} is budgeted as one layer, but all its "
        f"leaves share a leading axis of size {n}: the mark of {n} layers "
        f"stacked by nn.scan / nnx.scan. If they are, pass stacked=({group!r},) "
        "to budget one layer per slice; otherwise name the layers with "
        "layer_labels. Check the result with ebc_optax.layers.budget_layers(params, "
        "...).", stacklevel=3)
  suspects = {group for group, _ in partition.suspected_stacks}
  # One element of a sequence (a one-block model) is a deliberate layout.
  if (len(partition.labels) == 1 and len(partition.groups) > 1
      and partition.labels[0] not in suspects
      and not partition.labels[0].rsplit("/", 1)[-1].isdigit()):
    warnings.warn(
        f"{who}: every budgeted parameter is in one layer "
        f"{partition.labels[0]!r} (groups found: {list(partition.groups)}), so "
        f"the budget has no per-layer structure. {hint}", stacklevel=3)


# --- per-layer arithmetic on leaves ------------------------------------------

def per_layer_sum(leaf_values: Sequence[jax.Array | None],
                  partition: LayerPartition) -> jax.Array:
  """``[L]`` float32 sums of per-leaf values over each layer's leaves.

  ``leaf_values[i]`` is a scalar for a whole leaf and an ``[n]`` vector (one
  value per slice) for a stacked leaf; it is ignored for leaves outside the
  budget.
  """
  num_layers = len(partition.labels)
  whole: list[list[jax.Array]] = [[] for _ in range(num_layers)]
  stacks: dict[int, list[jax.Array]] = {}
  sizes: dict[int, int] = {}
  for v, slot in zip(leaf_values, partition.leaf_layers):
    if slot is None:
      continue
    first, n = slot
    if n:
      stacks.setdefault(first, []).append(jnp.asarray(v, jnp.float32))
      sizes[first] = n
    else:
      whole[first].append(jnp.asarray(v, jnp.float32))
  pieces, run, layer = [], [], 0
  zero = jnp.zeros([], jnp.float32)
  while layer < num_layers:
    if layer in stacks:
      if run:
        pieces.append(jnp.stack(run))
        run = []
      pieces.append(sum(stacks[layer][1:], stacks[layer][0]))
      layer += sizes[layer]
    else:
      run.append(sum(whole[layer], zero))
      layer += 1
  if run:
    pieces.append(jnp.stack(run))
  if not pieces:
    return jnp.zeros([0], jnp.float32)
  return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces)


def leaf_sq_norms(leaves: Sequence[jax.Array],
                  partition: LayerPartition) -> list[jax.Array | None]:
  """Per budgeted leaf, ``Σ x²`` (float32): a scalar, or ``[n]`` per slice."""
  out: list[jax.Array | None] = []
  for x, slot in zip(leaves, partition.leaf_layers):
    if slot is None:
      out.append(None)
      continue
    sq = jnp.square(x.astype(jnp.float32))
    out.append(jnp.sum(sq) if not slot[1] else
               jnp.sum(sq, axis=tuple(range(1, sq.ndim))))
  return out


def layer_sizes(leaves: Sequence[Any], partition: LayerPartition) -> jax.Array:
  """``[L]`` float32 number of entries of each budgeted layer (slice)."""
  return per_layer_sum(
      [None if slot is None else
       (float(x.size) if not slot[1] else jnp.full([slot[1]], x.size / slot[1]))
       for x, slot in zip(leaves, partition.leaf_layers)], partition)


def layer_norms(leaves: Sequence[jax.Array],
                partition: LayerPartition) -> jax.Array:
  """``[L]`` float32 Frobenius norms of each budgeted layer (slice)."""
  return jnp.sqrt(per_layer_sum(leaf_sq_norms(leaves, partition), partition))


def for_leaf(values: jax.Array, slot: LeafLayers, ndim: int) -> jax.Array:
  """A layer's entry of ``values [L]`` shaped to multiply one leaf.

  A whole leaf gets the scalar ``values[layer]``; a stacked leaf the slice
  ``values[first:first+n]`` shaped ``[n, 1, ..., 1]``; a leaf outside the
  budget (an integer counter) 1.
  """
  if slot is None:
    return jnp.ones([], values.dtype)
  first, n = slot
  if not n:
    return values[first]
  return values[first:first + n].reshape((n,) + (1,) * (ndim - 1))


def scale_leaves(leaves: Sequence[jax.Array], partition: LayerPartition,
                 values: jax.Array) -> list[jax.Array]:
  """Each budgeted leaf times its layer's (slice's) entry of ``values [L]``
  (float32 product, cast back); leaves outside the budget are returned as is."""
  return [x if slot is None else
          (x.astype(jnp.float32) * for_leaf(values, slot, x.ndim)).astype(x.dtype)
          for x, slot in zip(leaves, partition.leaf_layers)]


def select_leaves(leaves: Sequence[Any], indices: Sequence[int]) -> list[Any]:
  return [leaves[i] for i in indices]


def check_state_layers(part: LayerPartition, state_layers: int,
                       what: str = "params") -> None:
  """Raises unless the tree gives the ``state_layers`` layers a state was
  initialised for (``init`` and ``update`` saw trees of one structure)."""
  num_layers = len(part.labels)
  if state_layers != num_layers:
    raise ValueError(
        f"The {what} give {num_layers} budgeted layers {part.labels} but the "
        f"state was initialised for {state_layers}; init and update must see "
        f"{what} of the same structure.")

