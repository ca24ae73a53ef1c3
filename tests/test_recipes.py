"""``SEEDS_RECIPE``: the reference recipe, piece by piece."""

import jax
import numpy as np
import optax

import ebc_optax
from conftest import telemetry_per_step, tiny_logits_fn


def test_seeds_recipe_holds_the_seed_documents_numbers():
  r = ebc_optax.SEEDS_RECIPE
  assert (r["target_kl"], r["update_every"], r["probe_layers"],
          r["full_sweep_every"], r["aggregate"], r["kl"], r["controller"],
          r["guard"]) == (0.05, 20, 2, 200, "l1", "bound", "pi", True)


def _blocks_only(params):
  """Per leaf, whether the budget holds it: the blocks (embed / head out)."""
  return tuple(jax.tree_util.keystr(path).startswith("['blocks']")
               for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])


def test_seeds_recipe_is_the_seeds_pieces_with_their_gains(tiny):
  """The recipe through wrap equals the reference recipe's composition assembled
  by hand: L1 surrogate in the bound metric, PI controller (k_p 0.15, k_i 0.02,
  half-life 250, δ in [0.01, 0.30]) and the guard, probing every 20 steps."""
  _, params, batch, _ = tiny
  est = ebc_optax.advanced.sensitivity_estimator(
      tiny_logits_fn, sensitivity="jvp", update_every=20, probe_layers=2,
      full_sweep_every=200, beta_ema=0.9, huber_ratio=4.0, safety=1.05,
      center_logits=True, fd_step=1e-2, kl="bound", probe_batch_size=0.25)
  by_hand = optax.chain(optax.adam(0.05), ebc_optax.advanced.skip_nonfinite(
      ebc_optax.advanced.kl_probe(
          ebc_optax.advanced.budget_clip(
              est, target_kl=0.05, aggregate="l1", exact_every=1,
              include_embed_out=False, overshoot="scale", eps=1e-12), est,
          target_kl=0.05, guard=True, probe_every=20, eps=1e-12,
          controller=ebc_optax.controllers.pi_controller(kp=0.15, ki=0.02, half_life=250,
                                             delta_min=0.01, delta_max=0.30),
          budgeted_leaves=_blocks_only),
      check_updates=False))
  recipe = ebc_optax.wrap(optax.adam(0.05), tiny_logits_fn,
                          **ebc_optax.SEEDS_RECIPE)
  want, p_want = telemetry_per_step(by_hand, params, batch, 42)
  got, p_got = telemetry_per_step(recipe, params, batch, 42)
  for a, b in zip(got, want):
    for key in b:  # a small step's KL cancels in float32: reduction order
      rtol = 1e-4 if key in ("applied_kl", "applied_change", "budgeted_change",
                             "rho") else 1e-5
      np.testing.assert_allclose(a[key], b[key], rtol=rtol, err_msg=key)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-7), p_got, p_want)
  assert float(got[-1]["delta"]) != 0.05  # the controller acted: a real check
  assert int(got[-1]["probe_count"]) == 3
