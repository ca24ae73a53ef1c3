"""The pieces :func:`ebc_optax.wrap` is built from (composition tier).

For custom compositions and research on the method itself: the budget clip
without a controller, the β estimator, the applied-KL probe, the shrink-only
guard, the non-finite skip, and the measurements they make. These are public
but may change between minor versions (``CHANGELOG.md`` says what did);
:func:`ebc_optax.wrap` and :func:`ebc_optax.ellipsotope_budget_clip` are the
stable way to use them.
"""

from ebc_optax._clip import budget_clip
from ebc_optax._clip import BudgetClipState
from ebc_optax._energy import energy_ratios
from ebc_optax._guard import GuardState
from ebc_optax._probe import kl_probe
from ebc_optax._probe import KLProbeState
from ebc_optax._probe import measure_applied_change
from ebc_optax._rows import probe_batch
from ebc_optax._rows import probe_stride
from ebc_optax._safety import NonFiniteSkipState
from ebc_optax._safety import skip_nonfinite
from ebc_optax._sensitivity import directional_logit_change
from ebc_optax._sensitivity import layer_change_fn
from ebc_optax._sensitivity import LogitMetric
from ebc_optax._sensitivity import logits_of
from ebc_optax._sensitivity import masked_direction
from ebc_optax._sensitivity import sensitivity_estimator
from ebc_optax._sensitivity import SensitivityEstimator
from ebc_optax._sensitivity import SensitivityState
from ebc_optax._validation import check_number
from ebc_optax._wrap import select_state

__all__ = (
    "BudgetClipState",
    "GuardState",
    "KLProbeState",
    "LogitMetric",
    "NonFiniteSkipState",
    "SensitivityEstimator",
    "SensitivityState",
    "budget_clip",
    "check_number",
    "directional_logit_change",
    "energy_ratios",
    "kl_probe",
    "layer_change_fn",
    "logits_of",
    "masked_direction",
    "measure_applied_change",
    "probe_batch",
    "probe_stride",
    "select_state",
    "sensitivity_estimator",
    "skip_nonfinite",
)
