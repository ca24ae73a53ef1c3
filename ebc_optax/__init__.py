"""ebc_optax: Ellipsotope-Budgeted Clipping as an optax transformation.

A trust region on what the model predicts: the whole update is scaled by
``c = min(1, τ/S)``, where ``S = Σ_ℓ β_ℓ ‖ΔW_ℓ‖`` bounds the change of the
per-token-centered logits and ``τ = sqrt(4δ)`` comes from a KL target ``δ``.
"""

from ebc_optax._aggregate import budget_surrogate
from ebc_optax._aggregate import clip_scale
from ebc_optax._aggregate import layer_contributions
from ebc_optax._clip import budget_clip
from ebc_optax._clip import BudgetClipState
from ebc_optax._config import EBCConfig
from ebc_optax._config import from_config
from ebc_optax._controller import KLController
from ebc_optax._controller import pi_controller
from ebc_optax._controller import PIControllerState
from ebc_optax._controller import ProbeMeasurement
from ebc_optax._energy import activation_norm
from ebc_optax._energy import energy_budget_clip
from ebc_optax._energy import energy_ratios
from ebc_optax._energy import EnergyBudgetClipState
from ebc_optax._guard import guard_factor
from ebc_optax._guard import guard_ratio
from ebc_optax._guard import GuardState
from ebc_optax._layers import budget_layers
from ebc_optax._layers import default_layer_labels
from ebc_optax._layers import is_embed_or_output
from ebc_optax._logits import center_per_token
from ebc_optax._logits import fisher_kl
from ebc_optax._logits import per_token_change_norm
from ebc_optax._logits import per_token_kl
from ebc_optax._logits import per_token_rms_norm
from ebc_optax._logits import trust_radius
from ebc_optax._probe import kl_probe
from ebc_optax._probe import KLProbeState
from ebc_optax._probe import measure_applied_change
from ebc_optax._recipes import SEEDS_RECIPE
from ebc_optax._relative import relative_radius
from ebc_optax._relative import RelativeRadiusState
from ebc_optax._safety import NonFiniteSkipState
from ebc_optax._safety import skip_nonfinite
from ebc_optax._sensitivity import directional_logit_change
from ebc_optax._sensitivity import LogitMetric
from ebc_optax._sensitivity import sensitivity_estimator
from ebc_optax._sensitivity import SensitivityEstimator
from ebc_optax._sensitivity import SensitivityState
from ebc_optax._telemetry import telemetry
from ebc_optax._transform import ellipsotope_budget_clip
from ebc_optax._trust_region import trust_region_radius
from ebc_optax._trust_region import trust_region_ratio
from ebc_optax._trust_region import TrustRegionState
from ebc_optax._wrap import wrap
from ebc_optax._wrap import WrapState
from ebc_optax import cadence  # the refresh / sweep / probe schedule

__version__ = "0.1.0"

__all__ = (
    "SEEDS_RECIPE",
    "cadence",
    "BudgetClipState",
    "EBCConfig",
    "EnergyBudgetClipState",
    "GuardState",
    "KLController",
    "KLProbeState",
    "LogitMetric",
    "NonFiniteSkipState",
    "PIControllerState",
    "RelativeRadiusState",
    "ProbeMeasurement",
    "SensitivityEstimator",
    "SensitivityState",
    "TrustRegionState",
    "WrapState",
    "activation_norm",
    "budget_clip",
    "budget_layers",
    "budget_surrogate",
    "center_per_token",
    "clip_scale",
    "default_layer_labels",
    "directional_logit_change",
    "fisher_kl",
    "ellipsotope_budget_clip",
    "energy_budget_clip",
    "energy_ratios",
    "from_config",
    "guard_factor",
    "guard_ratio",
    "is_embed_or_output",
    "kl_probe",
    "layer_contributions",
    "measure_applied_change",
    "per_token_change_norm",
    "per_token_kl",
    "per_token_rms_norm",
    "pi_controller",
    "relative_radius",
    "sensitivity_estimator",
    "skip_nonfinite",
    "telemetry",
    "trust_radius",
    "trust_region_radius",
    "trust_region_ratio",
    "wrap",
)
