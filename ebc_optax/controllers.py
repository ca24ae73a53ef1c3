"""How δ, the per-token KL budget, is chosen: the controllers (stable).

A controller is a :class:`KLController` — ``init(target_kl) -> state`` and
``update(state, measurement, delta, target_kl) -> (state, delta)`` — passed as
``controller=`` to :func:`ebc_optax.wrap` or
:func:`ebc_optax.ellipsotope_budget_clip`. It is called once per step with a
:class:`ProbeMeasurement` (the surrogate, the clip scale and, on probe steps,
the applied KL of the probe rows). Three come with the package:

* :func:`relative_radius` (the default) — δ relative to the trend of the base
  optimizer's own recent steps; an outlier step is refused;
* :func:`pi_controller` — the reference recipe's PI loop on the applied KL;
* :func:`trust_region_radius` — δ adapted by the classic ratio test on the
  probe's loss.

Writing your own: the :doc:`Controllers </guides/controllers>` guide of the
documentation.
"""

from ebc_optax._controller import KLController
from ebc_optax._controller import pi_controller
from ebc_optax._controller import PIControllerState
from ebc_optax._controller import ProbeMeasurement
from ebc_optax._relative import relative_radius
from ebc_optax._relative import RelativeRadiusState
from ebc_optax._trust_region import trust_region_radius
from ebc_optax._trust_region import TrustRegionState

__all__ = (
    "KLController",
    "PIControllerState",
    "ProbeMeasurement",
    "RelativeRadiusState",
    "TrustRegionState",
    "pi_controller",
    "relative_radius",
    "trust_region_radius",
)
