"""Named recipes: complete sets of EBC keyword arguments.

``SEEDS_RECIPE`` is the reference recipe (the method write-up's corrected
recipe, the *seed documents* of this project), the defaults of
this package's first releases: the triangle-inequality surrogate (L1) in the
centered-logit bound metric, β refreshed round-robin by ``jax.jvp`` (2 layers
every 20 steps, a full sweep every 200, EMA 0.9, safety 1.05), and a PI
controller on the applied KL (δ* = 0.05 nats/token, k_p = 0.15, k_i = 0.02,
half-life 250 steps, δ clamped to [0.01, 0.30]) with the shrink-only guard,
probing every 20 steps on a quarter of the batch. Use it to reproduce the
write-up's behaviour::

  tx = ebc_optax.wrap(optax.adam(lr), logits_fn, **ebc_optax.SEEDS_RECIPE)

and override any entry by keyword (``{**SEEDS_RECIPE, "target_kl": 0.1}``).
"""

from __future__ import annotations

import types

SEEDS_RECIPE = types.MappingProxyType({
    "target_kl": 0.05,
    "update_every": 20,
    "probe_layers": 2,
    "full_sweep_every": 200,
    "beta_ema": 0.9,
    "safety": 1.05,
    "aggregate": "l1",
    "kl": "bound",
    "exact_every": 1,
    "center_logits": True,
    "include_embed_out": False,
    "sensitivity": "jvp",
    "huber_ratio": 4.0,
    "fd_step": 1e-2,
    "probe_batch_size": 0.25,
    "controller": "pi",
    "guard": True,
    "probe_every": 20,
})
