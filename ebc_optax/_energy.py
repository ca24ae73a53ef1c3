"""Energy-budget clipping: ``‖∇L_ℓ‖ ≤ ratio · ‖a_ℓ‖`` per layer.

The rule of the ``ebc-clip`` proposal (gradient energy at most 10% of signal
energy), as an optax transformation. Each layer's gradient is scaled down on
its own so that its norm is at most ``ratio`` times the norm of that layer's
activation. Activation norms are not something an optimizer can see: the
forward pass measures them and hands them to ``update`` as the keyword
argument ``activation_norms`` (a ``{label: scalar}`` mapping). Layers are the
groups of :func:`~ebc_optax.layers.default_layer_labels` (or a user ``layer_labels``
function), embedding and output groups included.

The math lives in three small pure functions of :mod:`ebc_optax.formulas`
(:func:`~ebc_optax.formulas.activation_norm`,
:func:`~ebc_optax.formulas.energy_ratio`,
:func:`~ebc_optax.formulas.energy_scale`); :func:`energy_budget_clip` and the
monitor :func:`energy_ratios` only wire them to the layers of a pytree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ebc_optax import _layers
from ebc_optax import _sensitivity
from ebc_optax import _validation
from ebc_optax import formulas

class EnergyBudgetClipState(NamedTuple):
  """State of :func:`energy_budget_clip`.

  Per-layer arrays follow the order of
  ``budget_layers(params, layer_labels, include_embed_out=True)``.

  Attributes:
    energy_scale: ``[L]`` float32, the factor applied to each layer at the
      last step (1 for layers without an activation entry, 0 for zeroed ones).
    energy_ratio: ``[L]`` float32, ``‖g_ℓ‖ / ‖a_ℓ‖`` of the incoming gradient
      at the last step (see :func:`energy_ratio`; 0 for layers without an
      activation entry).
    energy_layer_clips: ``[L]`` int32, per layer, steps with a factor < 1.
    energy_clipped_steps: int32, steps where at least one layer had a factor
      < 1.
  """
  energy_scale: jax.Array
  energy_ratio: jax.Array
  energy_layer_clips: jax.Array
  energy_clipped_steps: jax.Array


# --- wiring to the layers of a pytree ---------------------------------------------

def _partition(tree: Any, layer_labels: _layers.LayerLabelsFn | None,
               stacked: tuple[str, ...]) -> _layers.LayerPartition:
  return _layers.partition_layers(tree, layer_labels, include_embed_out=True,
                                  stacked=stacked)


def _expand_stacked(activation_norms: Any, part: _layers.LayerPartition,
                    stacked: tuple[str, ...], who: str) -> Any:
  """``{group: [n] vector}`` of a stacked group -> ``{"group/i": scalar}``."""
  if not isinstance(activation_norms, Mapping) or not stacked:
    return activation_norms
  out = {}
  for key, value in activation_norms.items():
    if key not in stacked:
      out[key] = value
      continue
    n = sum(1 for lab in part.labels if lab.rsplit("/", 1)[0] == key)
    if np.shape(value) != (n,):
      raise ValueError(
          f"{who}: activation_norms[{key!r}] is a stacked group of {n} layers, "
          f"so it must have shape ({n},) (one norm per slice); got shape "
          f"{np.shape(value)}.")
    out.update({f"{key}/{i}": value[i] for i in range(n)})
  return out


def _check_activation_norms(activation_norms: Any, labels: tuple[str, ...],
                            who: str) -> None:
  if activation_norms is None:
    raise ValueError(
        f"{who} needs the keyword argument `activation_norms` (a mapping from "
        "layer label to the scalar norm of that layer's activation), e.g. "
        "update(grads, state, activation_norms={'blocks/0': a0, ...}).")
  if not isinstance(activation_norms, Mapping):
    raise ValueError(
        f"{who}: activation_norms must be a mapping from layer label to a "
        f"scalar; got {type(activation_norms).__name__}.")
  unknown = sorted(set(activation_norms) - set(labels), key=str)
  if unknown:
    raise ValueError(
        f"{who}: activation_norms has label(s) {unknown} that are not layers "
        f"of the parameters; the layers are {list(labels)}.")
  for label, value in activation_norms.items():
    if np.ndim(value) != 0:
      raise ValueError(
          f"{who}: activation_norms[{label!r}] must be a scalar; got shape "
          f"{np.shape(value)}.")


def _layer_norms_and_activations(tree: Any, activation_norms: Mapping[str, Any],
                                 part: _layers.LayerPartition):
  norms = _sensitivity.layer_norms(jax.tree.leaves(tree), part)
  acts = jnp.stack([
      jnp.asarray(activation_norms.get(label, 0.0), jnp.float32)
      for label in part.labels]) if part.labels else jnp.zeros([0], jnp.float32)
  has = np.array([label in activation_norms for label in part.labels], bool)
  return norms, acts, has


def energy_ratios(grads: Any, activation_norms: Mapping[str, Any], *,
                  layer_labels: _layers.LayerLabelsFn | None = None,
                  stacked: _layers.Stacked = None,
                  ) -> dict[str, jax.Array]:
  r"""The monitor: ``‖∇L_ℓ‖ / ‖a_ℓ‖`` for each layer with an activation norm.

  ``‖∇L_ℓ‖`` is the Frobenius norm of all gradient leaves labelled ``ℓ``.
  Pure and jit-safe. The rule asks for values ``≤ ratio`` (0.1 by default).

  Args:
    grads: the gradient pytree (the structure of the parameters).
    activation_norms: ``{label: scalar}``, e.g. from :func:`activation_norm`
      of each layer's input.
    layer_labels: ``params -> pytree of str``; default
      :func:`~ebc_optax.layers.default_layer_labels`.
    stacked: label prefixes of layers stacked on axis 0, as for
      :func:`energy_budget_clip`.

  Returns:
    ``{label: float32 scalar}`` for the labels of ``activation_norms``, ``inf``
    where the activation norm is zero, negative or non-finite (see
    :func:`energy_ratio`).

  Raises:
    ValueError: for a label that is not a layer of ``grads``.

  Example:
    >>> import jax.numpy as jnp
    >>> g = {"blocks": [jnp.array([3.0, 4.0])], "head": jnp.array([1.0])}
    >>> r = energy_ratios(g, {"blocks/0": 20.0})
    >>> {k: float(v) for k, v in r.items()}
    {'blocks/0': 0.25}
  """
  stacked = _layers.check_stacked(stacked)
  part = _partition(grads, layer_labels, stacked)
  activation_norms = _expand_stacked(activation_norms, part, stacked,
                                     "energy_ratios")
  _check_activation_norms(activation_norms, part.labels, "energy_ratios")
  norms, acts, _ = _layer_norms_and_activations(grads, activation_norms, part)
  return {label: formulas.energy_ratio(norms[i], acts[i])
          for i, label in enumerate(part.labels) if label in activation_norms}


def energy_budget_clip(
    ratio: float = 0.1,
    *,
    layer_labels: _layers.LayerLabelsFn | None = None,
    stacked: _layers.Stacked = None,
) -> optax.GradientTransformationExtraArgs:
  r"""Clips each layer's gradient to ``ratio`` times its activation norm.

  .. math::
    g_\ell \leftarrow s_\ell\, g_\ell, \qquad
    s_\ell = \min\!\big(1,\; r\,\lVert a_\ell \rVert / \lVert g_\ell \rVert\big)

  per layer ``ℓ`` (see :func:`energy_scale`), with ``‖a_ℓ‖`` given by the
  forward pass as ``update(..., activation_norms={label: scalar})``. A
  drop-in for ``optax.clip_by_global_norm``: it clips *gradients*, so put it
  before the base optimizer, ``optax.chain(energy_budget_clip(), adam)``.

  * Layers without an entry in ``activation_norms`` pass through unchanged
    (scale 1, not counted as clipped).
  * A layer whose activation norm is zero, negative or non-finite, or whose
    gradient norm is non-finite, has its update set to exactly zero: the
    budget is then undefined and zero is the only update that honours it
    (no NaN is produced). It is counted as clipped.
  * Norms and factors are computed in float32; updates keep their dtypes.

  Args:
    ratio: the budget ``r`` (> 0, finite); the proposal's default is 0.1.
    layer_labels: ``params -> pytree of str`` with the structure of the
      gradients; default :func:`~ebc_optax.layers.default_layer_labels`. Every group
      is a layer, embedding and output groups included.
    stacked: label prefixes of layers stacked on axis 0 (scanned models):
      slice ``i`` of the leaves under prefix ``p`` is layer ``"p/i"``, clipped
      on its own. Its norms may be given per slice (``{"p/0": a0, ...}``) or
      as one ``[n]`` vector under the prefix (``{"p": a}``, what a scanned
      forward pass returns).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; ``update`` requires the
    keyword ``activation_norms`` and does not need ``params``. Telemetry is
    in :class:`EnergyBudgetClipState` (read it with ``optax.tree.get(state,
    "energy_scale")``).

  Raises:
    ValueError: for an invalid ``ratio``; in ``update``, when
      ``activation_norms`` is missing, is not a mapping, has a non-scalar
      value or names a label that is not a layer of the gradients.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> params = {"blocks": [jnp.ones(4)], "head": jnp.ones(2)}
    >>> tx = optax.chain(energy_budget_clip(0.1), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> grads = {"blocks": [jnp.full(4, 1.0)], "head": jnp.ones(2)}  # ‖g‖ = 2
    >>> updates, state = tx.update(grads, state, params,
    ...                            activation_norms={"blocks/0": 10.0})
    >>> [float(x) for x in updates["blocks"][0]]  # 2 -> 1 = 0.1 * 10
    [-0.5, -0.5, -0.5, -0.5]

  References:
    H. Tedjamantri, *ebc-clip: Energy-Budget Gradient Clipping* (2025).
  """
  _validation.check_number("ratio", ratio, lo=0, lo_open=True, hi_open=True)

  stacked = _layers.check_stacked(stacked)

  def init(params):
    num_layers = len(_partition(params, layer_labels, stacked).labels)
    return EnergyBudgetClipState(
        energy_scale=jnp.ones([num_layers], jnp.float32),
        energy_ratio=jnp.zeros([num_layers], jnp.float32),
        energy_layer_clips=jnp.zeros([num_layers], jnp.int32),
        energy_clipped_steps=jnp.zeros([], jnp.int32),
    )

  def update(updates, state, params=None, *, activation_norms=None,
             **extra_args):
    del params, extra_args
    part = _partition(updates, layer_labels, stacked)
    activation_norms = _expand_stacked(activation_norms, part, stacked,
                                       "energy_budget_clip")
    _check_activation_norms(activation_norms, part.labels, "energy_budget_clip")
    _layers.check_state_layers(part, state.energy_scale.shape[0], "updates")
    norms, acts, has = _layer_norms_and_activations(updates, activation_norms,
                                                    part)
    has = jnp.asarray(has)
    scales = jnp.where(has, formulas.energy_scale(norms, acts, ratio), 1.0)
    ratios = jnp.where(has, formulas.energy_ratio(norms, acts), 0.0)
    clipped = scales < 1.0

    leaves, treedef = jax.tree.flatten(updates)

    def apply(u, slot):
      s = _layers.for_leaf(scales, slot, u.ndim)
      # where, not u * 0: a zeroed layer must not turn inf entries into NaN.
      scaled = (u.astype(jnp.float32) * s).astype(u.dtype)
      return jnp.where(s > 0, scaled, jnp.zeros_like(u))

    new_updates = jax.tree.unflatten(
        treedef, [apply(u, slot) for u, slot in zip(leaves, part.leaf_layers)])
    new_state = EnergyBudgetClipState(
        energy_scale=scales.astype(jnp.float32),
        energy_ratio=ratios.astype(jnp.float32),
        energy_layer_clips=state.energy_layer_clips + clipped.astype(jnp.int32),
        energy_clipped_steps=(state.energy_clipped_steps
                              + jnp.any(clipped).astype(jnp.int32)),
    )
    return new_updates, new_state

  return optax.GradientTransformationExtraArgs(init, update)
