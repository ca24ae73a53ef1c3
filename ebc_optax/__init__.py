"""ebc_optax: Ellipsotope-Budgeted Clipping as an optax transformation.

A trust region on what the model predicts: the whole update is scaled by
``c = min(1, τ/S)``, where ``S = Σ_ℓ β_ℓ ‖ΔW_ℓ‖`` bounds the change of the
per-token-centered logits and ``τ = sqrt(4δ)`` comes from a KL target ``δ``.

The front door is this module (stable). The extension points are the modules
:mod:`ebc_optax.controllers` (how δ is chosen), :mod:`ebc_optax.formulas`
(every equation), :mod:`ebc_optax.cadence` (when what is measured) and
:mod:`ebc_optax.layers` (what a layer is); :mod:`ebc_optax.advanced` holds
the pieces :func:`wrap` is built from (may change between minor versions).
"""

from ebc_optax import advanced
from ebc_optax import cadence
from ebc_optax import controllers
from ebc_optax import formulas
from ebc_optax import layers
from ebc_optax._config import EBCConfig
from ebc_optax._config import from_config
from ebc_optax._energy import energy_budget_clip
from ebc_optax._energy import EnergyBudgetClipState
from ebc_optax._recipes import SEEDS_RECIPE
from ebc_optax._telemetry import telemetry
from ebc_optax._transform import ellipsotope_budget_clip
from ebc_optax._wrap import wrap
from ebc_optax._wrap import WrapState

__version__ = "0.2.0"

__all__ = (
    "EBCConfig",
    "EnergyBudgetClipState",
    "SEEDS_RECIPE",
    "WrapState",
    "advanced",
    "cadence",
    "controllers",
    "ellipsotope_budget_clip",
    "energy_budget_clip",
    "formulas",
    "from_config",
    "layers",
    "telemetry",
    "wrap",
)
