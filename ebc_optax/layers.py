"""What a "layer" is: grouping a parameter tree into budgeted layers (stable).

EBC sums ``β_ℓ ‖ΔW_ℓ‖`` over layers ℓ. :func:`default_layer_labels` groups
the leaves of any Flax (linen, NNX), Hugging Face Flax, equinox or plain-dict
tree by their path — a numbered block and everything under it is one layer, a
stacked (``nn.scan`` / ``nnx.scan``) leaf is one layer per slice with
``stacked=`` — and :func:`is_embed_or_output` says which groups stay out of
the budget by default. :func:`budget_layers` prints the grouping a tree gets,
which is the first thing to check on a new model; ``layer_labels=`` (a
``params -> pytree of str``) replaces the rule.
"""

from ebc_optax._layers import budget_layers
from ebc_optax._layers import default_layer_labels
from ebc_optax._layers import is_embed_or_output
from ebc_optax._layers import key_name
from ebc_optax._layers import LayerPartition
from ebc_optax._layers import name_tokens
from ebc_optax._layers import partition_layers

__all__ = (
    "LayerPartition",
    "budget_layers",
    "default_layer_labels",
    "is_embed_or_output",
    "key_name",
    "name_tokens",
    "partition_layers",
)
