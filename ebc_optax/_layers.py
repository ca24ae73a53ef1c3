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
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

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
  ``out(put)``, ``logits`` or ``classifier``.

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


def _label_cuts(paths: Sequence[tuple[Any, ...]],
                stacked: tuple[str, ...]) -> list[int]:
  """Per leaf, how many leading path entries make its group label."""
  names = [tuple(key_name(e) for e in p) for p in paths]
  first_index = [next((k for k, e in enumerate(p) if _is_index(e)), len(p))
                 for p in paths]
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
    if all(_is_index(paths[m][depth]) for m in members):
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
  * the first sequence on a path — a list or tuple, or a dict with integer
    or digit-string keys (how Flax NNX stores ``nnx.List`` and Hugging Face
    Flax stores ``h/0``) — is split, one layer per element;
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
  """
  stacked = check_stacked(stacked)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [tuple(p) for p, _ in flat]
  cuts = _label_cuts(paths, stacked)
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
      a leaf outside the budget.
    excluded_labels: groups that exist but are left out of the budget
      (embedding/output groups when ``include_embed_out=False``). Their
      updates are still scaled by the common factor ``c``.
    num_leaves: number of leaves of ``params``.
    leaf_paths: the ``"a/b/0"`` path of every leaf (for messages).
    groups: every group label, budgeted or not (a stacked group once).
  """
  labels: tuple[str, ...]
  leaf_layers: tuple[LeafLayers, ...]
  excluded_labels: tuple[str, ...]
  num_leaves: int
  leaf_paths: tuple[str, ...] = ()
  groups: tuple[str, ...] = ()

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


def partition_layers(
    params: Any,
    layer_labels: LayerLabelsFn | None = None,
    include_embed_out: bool = False,
    stacked: Stacked = None,
) -> LayerPartition:
  """Groups the leaves of ``params`` into budgeted layers.

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

  Returns:
    A :class:`LayerPartition`.

  Raises:
    ValueError: when the labels do not match the structure of ``params``, a
      label is not a string, a ``stacked`` prefix matches no leaf, or the
      leaves of a stacked group disagree on their leading size.
  """
  stacked = check_stacked(stacked)
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
  shapes = [getattr(x, "shape", ()) for _, x in flat]
  order: dict[str, list[int]] = {}
  for i, lab in enumerate(label_leaves):
    if not isinstance(lab, str):
      raise ValueError(
          f"layer_labels must give a str per leaf; leaf {paths[i]!r} got {lab!r}.")
    order.setdefault(_stacked_of(lab, stacked) or lab, []).append(i)
  missing = [p for p in stacked if p not in order]
  if missing:
    raise ValueError(
        f"stacked={missing} names no group of the parameters; the groups are "
        f"{list(order)}. Write the prefix as budget_layers / "
        "default_layer_labels write labels, e.g. 'params/ScanBlock_0'.")
  labels: list[str] = []
  slots: list[LeafLayers] = [None] * len(label_leaves)
  excluded: list[str] = []
  for group, indices in order.items():
    if not include_embed_out and is_embed_or_output(group):
      excluded.append(group)
      continue
    n = _stack_size(group, indices, shapes, paths) if group in stacked else 0
    for i in indices:
      slots[i] = (len(labels), n)
    labels.extend([f"{group}/{k}" for k in range(n)] if n else [group])
  return LayerPartition(
      labels=tuple(labels), leaf_layers=tuple(slots),
      excluded_labels=tuple(excluded), num_leaves=len(label_leaves),
      leaf_paths=paths, groups=tuple(order))


def budget_layers(
    params: Any,
    layer_labels: LayerLabelsFn | None = None,
    include_embed_out: bool = False,
    stacked: Stacked = None,
) -> tuple[str, ...]:
  """Labels of the budgeted layers, in the order of the per-layer telemetry.

  Call it once on a new model to check what EBC will budget.

  Example:
    >>> import jax.numpy as jnp
    >>> p = {"embed": jnp.ones(2), "blocks": [jnp.ones(2), jnp.ones(2)],
    ...      "lm_head": jnp.ones(2)}
    >>> budget_layers(p)
    ('blocks/0', 'blocks/1')
    >>> scanned = {"embed": jnp.ones(2), "blocks": {"w": jnp.ones((3, 2, 2))}}
    >>> budget_layers(scanned, stacked=("blocks",))
    ('blocks/0', 'blocks/1', 'blocks/2')
  """
  return partition_layers(params, layer_labels, include_embed_out,
                          stacked).labels


def check_budget(partition: LayerPartition, who: str, warn: bool = True) -> None:
  """Raises when nothing is budgeted; warns (``warn``) when everything is one
  layer — not an element of a sequence or stack — although the tree has
  several groups (the mark of an undeclared stack or an unusual layout)."""
  hint = ("Pass layer_labels=(params -> pytree of str) to name the blocks, "
          "stacked=('<prefix>',) for layers stacked on a leading axis "
          "(nn.scan / nnx.scan), or include_embed_out=True; check the result "
          "with ebc_optax.budget_layers(params, ...).")
  if not partition.labels:
    raise ValueError(
        f"{who}: no layer to budget. The parameter groups found are "
        f"{list(partition.groups)}, all embedding/output groups "
        f"(left out: {list(partition.excluded_labels)}). {hint}")
  # One element of a sequence (a one-block model) is a deliberate layout.
  if (warn and len(partition.labels) == 1 and len(partition.groups) > 1
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


def for_leaf(values: jax.Array, slot: tuple[int, int], ndim: int) -> jax.Array:
  """A layer's entry of ``values [L]`` shaped to multiply one leaf.

  A whole leaf gets the scalar ``values[layer]``; a stacked leaf the slice
  ``values[first:first+n]`` shaped ``[n, 1, ..., 1]``.
  """
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
