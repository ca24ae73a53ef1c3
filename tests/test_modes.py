"""The modes beyond the seeds: ``kl="fisher"``, ``aggregate="exact"``,
``exact_every`` and fractional ``probe_batch_size``.

Every reference is brute force: Jacobians of the logits are materialised with
``jax.jacfwd``, the softmax Fisher ``F_t = diag(p_t) − p_t p_tᵀ`` is built
explicitly per token, and exact KLs are computed in float64 numpy.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import _data_parallel as dp
import ebc_optax
from ebc_optax import formulas
from conftest import block_jacobian
from conftest import next_token_loss
from conftest import block_norms
from conftest import flat_block
from conftest import np_center
from conftest import random_like
from conftest import telemetry_per_step
from conftest import tiny_batch
from conftest import tiny_logits_fn
from conftest import tiny_params

N_TOK, VOCAB = 40, 11  # tiny_batch(): [8, 5] tokens, vocab 11


# ---------------------------------------------------------------------------
# float64 numpy references
# ---------------------------------------------------------------------------


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  m = z.max(-1, keepdims=True)
  return z - m - np.log(np.exp(z - m).sum(-1, keepdims=True))


def np_kl(z, z_new):
  """Exact mean per-token ``KL(softmax(z) ‖ softmax(z_new))`` in float64."""
  logp, logq = np_log_softmax(z), np_log_softmax(z_new)
  kl = np.sum(np.exp(logp) * (logp - logq), -1)
  return float(kl.mean())


def np_fisher_sq_sum(z, dz):
  """``Σ_t 2·dz_tᵀ (diag p_t − p_t p_tᵀ) dz_t`` with an explicit Fisher per token."""
  z = np.asarray(z, np.float64)
  p = np.exp(np_log_softmax(z)).reshape(-1, z.shape[-1])
  dz = np.asarray(dz, np.float64).reshape(p.shape)
  total = 0.0
  for p_t, d_t in zip(p, dz):
    fisher = np.diag(p_t) - np.outer(p_t, p_t)
    total += 2.0 * d_t @ fisher @ d_t
  return total


def np_size(dz, z, kl):
  """Per-token RMS size of ``dz`` in the metric of ``kl`` (float64)."""
  dz = np.asarray(dz, np.float64)
  dz = dz.reshape(-1, dz.shape[-1])
  n = dz.shape[0]
  if kl == "bound":
    return float(np.sqrt(np.sum(np_center(dz) ** 2) / n))
  return float(np.sqrt(np_fisher_sq_sum(z, dz) / n))


def blocks_jacobian(params, batch):
  """``[N·V, P]`` float64 Jacobian of the logits w.r.t. *all* budgeted params.

  The budgeted params of the tiny model are its blocks (embed / lm_head are
  embedding/output groups), flattened by ``ravel_pytree(params["blocks"])``.
  """
  flat, unravel = ravel_pytree(params["blocks"])

  def f(theta):
    return tiny_logits_fn({**params, "blocks": unravel(theta)}, batch).reshape(-1)

  return np.asarray(jax.jacfwd(f)(flat), np.float64)


def flat_blocks(tree):
  return np.asarray(ravel_pytree(tree["blocks"])[0], np.float64)


def logits64(params, batch):
  return np.asarray(tiny_logits_fn(params, batch), np.float64)


def brute_exact_S(params, batch, updates, kl):
  """``‖J ΔW‖`` of the budgeted (block) update, in the ``kl`` metric."""
  dz = blocks_jacobian(params, batch) @ flat_blocks(updates)
  return np_size(dz.reshape(-1, VOCAB), logits64(params, batch), kl)


def brute_betas(params, batch, updates, kl):
  """Per-block ``β_ℓ``: size of ``J_ℓ U_ℓ`` in the ``kl`` metric."""
  z = logits64(params, batch)
  out = []
  for i in range(len(params["blocks"])):
    dw = flat_block(updates, i)
    dz = block_jacobian(tiny_logits_fn, params, batch, i) @ (dw / np.linalg.norm(dw))
    out.append(np_size(dz.reshape(-1, VOCAB), z, kl))
  return np.asarray(out)


def make_tx(target_kl=0.05, **kw):
  """EBC with everything that would blur a brute-force comparison switched off."""
  kw.setdefault("controller", None)
  kw.setdefault("guard", False)
  kw.setdefault("beta_ema", 0.0)
  kw.setdefault("safety", 1.0)
  kw.setdefault("probe_batch_size", None)  # brute force is on the whole batch
  kw.setdefault("probe_every", 0)
  return ebc_optax.ellipsotope_budget_clip(tiny_logits_fn, target_kl, **{"controller": "pi", **kw})


DELTA = 1e-3  # the default δ of the single-step tests


def tau_of(delta):
  """``τ = sqrt(4δ)`` with δ rounded to float32, as the transform stores it."""
  return float(np.sqrt(4.0 * np.float64(np.float32(delta))))


_COMPILED = {}


def compiled(target_kl=DELTA, **kw):
  """``(tx, jit(tx.update))`` for a configuration, compiled once per module."""
  key = (target_kl,) + tuple(sorted(kw.items()))
  if key not in _COMPILED:
    tx = make_tx(target_kl, **kw)
    _COMPILED[key] = (tx, jax.jit(tx.update))
  return _COMPILED[key]


def one_update(params, batch, updates, **kw):
  """One update from a fresh state: ``(clipped updates, state, telemetry)``."""
  tx, update = compiled(**kw)
  out, state = update(updates, tx.init(params), params, batch=batch)
  return out, state, ebc_optax.telemetry(state)


def scaled(tree, factor):
  return jax.tree.map(lambda x: (factor * x).astype(x.dtype), tree)


@pytest.fixture(scope="module")
def model():
  params = tiny_params(jax.random.PRNGKey(0))
  batch = tiny_batch(jax.random.PRNGKey(1))
  return params, batch


# ---------------------------------------------------------------------------
# 1. fisher_kl, fisher_sq_sum, per_token_change_norm(kl="fisher")
# ---------------------------------------------------------------------------


def _random_logits(seed, shape=(3, 4, 9), scale=2.0):
  kz, kv = jax.random.split(jax.random.PRNGKey(seed))
  return (scale * jax.random.normal(kz, shape), jax.random.normal(kv, shape))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fisher_kl_is_the_small_step_limit_of_the_exact_kl(seed):
  z, v = _random_logits(seed)
  errors = []
  for s in (1e-1, 1e-2, 1e-3):
    quad = float(ebc_optax.formulas.fisher_kl(z, s * v))
    exact = np_kl(z, np.asarray(z, np.float64) + s * np.asarray(v, np.float64))
    assert exact > 0
    errors.append(abs(quad / exact - 1))
    if s >= 1e-2:  # float32 KL cancels for smaller steps
      lib = float(ebc_optax.formulas.per_token_kl(z, z + s * v))
      np.testing.assert_allclose(lib, exact, rtol=2e-3)
      np.testing.assert_allclose(quad / lib, 1.0, atol=10 * s)
  # The error of the quadratic model is O(s): it shrinks ~10x per decade.
  assert errors[2] < 1e-2, errors
  assert errors[1] < 0.3 * errors[0] and errors[2] < 0.3 * errors[1], errors
  # fisher_kl is ½·mean Var_p (not 2·Var, not Var): ratio to the KL is 1.
  assert errors[0] < 0.2


@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 4)])
def test_fisher_sq_sum_and_change_norm_match_explicit_fisher(shape):
  z, dz = _random_logits(sum(shape), shape)
  want = np_fisher_sq_sum(z, dz)
  n = math.prod(shape[:-1])
  np.testing.assert_allclose(float(formulas.fisher_sq_sum(z, dz)), want, rtol=1e-5)
  np.testing.assert_allclose(
      float(formulas.change_sq_sum(dz, z, kl="fisher")), want, rtol=1e-5)
  np.testing.assert_allclose(
      float(ebc_optax.formulas.per_token_change_norm(dz, z, kl="fisher")),
      np.sqrt(want / n), rtol=1e-5)
  np.testing.assert_allclose(float(ebc_optax.formulas.fisher_kl(z, dz)), want / n / 4,
                             rtol=1e-5)
  # The bound metric is the centered Euclidean one, and dominates the Fisher
  # one (the softmax Fisher has spectral norm <= 1/2).
  bound = float(ebc_optax.formulas.per_token_change_norm(dz, z, kl="bound"))
  np.testing.assert_allclose(bound, np_size(dz, z, "bound"), rtol=1e-5)
  np.testing.assert_allclose(bound, float(ebc_optax.formulas.per_token_rms_norm(dz)),
                             rtol=1e-6)
  assert bound >= np.sqrt(want / n) * (1 - 1e-6)
  np.testing.assert_allclose(
      float(formulas.change_sq_sum(dz, kl="bound")),
      np.sum(np_center(dz) ** 2), rtol=1e-5)


def test_fisher_metric_is_invariant_to_per_token_constants():
  z, dz = _random_logits(7, (6, 8))
  a = 3.0 * jax.random.normal(jax.random.PRNGKey(8), (6, 1))
  b = 5.0 * jax.random.normal(jax.random.PRNGKey(9), (6, 1))
  base = float(formulas.fisher_sq_sum(z, dz))
  # A constant on the change, on the logits, or both: same p, same Var_p.
  np.testing.assert_allclose(float(formulas.fisher_sq_sum(z, dz + a)), base,
                             rtol=1e-5)
  np.testing.assert_allclose(float(formulas.fisher_sq_sum(z + b, dz + a)), base,
                             rtol=1e-5)
  np.testing.assert_allclose(float(ebc_optax.formulas.fisher_kl(z + b, dz + a)),
                             float(ebc_optax.formulas.fisher_kl(z, dz)), rtol=1e-5)
  # No centering needed for the Fisher metric ...
  for center in (True, False):
    np.testing.assert_allclose(
        float(ebc_optax.formulas.per_token_change_norm(dz + a, z, kl="fisher",
                                              center=center)),
        np.sqrt(base / 6), rtol=1e-5)
  # ... whereas the uncentered Euclidean norm does see the constant.
  assert abs(float(ebc_optax.formulas.per_token_change_norm(dz + a, kl="bound",
                                                   center=False))
             - float(ebc_optax.formulas.per_token_change_norm(dz, kl="bound",
                                                     center=False))) > 1e-2
  # A constant change alone is invisible.
  assert float(formulas.fisher_sq_sum(z, jnp.broadcast_to(a, z.shape))) < 1e-5


def test_fisher_metric_needs_the_logits():
  _, dz = _random_logits(3, (4, 5))
  with pytest.raises(ValueError, match="fisher"):
    ebc_optax.formulas.per_token_change_norm(dz, None, kl="fisher")


def test_fisher_kl_all_reduces_over_axis_name():
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  z, dz = _random_logits(11, (8, 3, 6))
  got = jax.pmap(lambda a, b: ebc_optax.formulas.fisher_kl(a, b, axis_name="i"),
                 axis_name="i")(z, dz)
  np.testing.assert_allclose(np.asarray(got), np.full(8, np_fisher_sq_sum(z, dz)
                                                       / 24 / 4), rtol=1e-5)
  norm = jax.pmap(lambda a, b: ebc_optax.formulas.per_token_change_norm(
      b, a, kl="fisher", axis_name="i"), axis_name="i")(z, dz)
  np.testing.assert_allclose(np.asarray(norm),
                             np.full(8, np.sqrt(np_fisher_sq_sum(z, dz) / 24)),
                             rtol=1e-5)


# ---------------------------------------------------------------------------
# 2. aggregate="exact": S = ‖J ΔW‖ and c = min(1, τ/S); L1 >= exact
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kl", ["bound", "fisher"])
def test_exact_surrogate_matches_brute_force_jacobian(model, kl):
  params, batch = model
  # Updates on every leaf: embed / lm_head must be left out of S (but scaled).
  base = random_like(jax.random.PRNGKey(4), params, 0.1)
  S_base = brute_exact_S(params, batch, base, kl)
  tau = tau_of(DELTA)
  cfg = dict(aggregate="exact", kl=kl)

  # Clipped: S = 5τ.
  updates = scaled(base, 5 * tau / S_base)
  S_ref = brute_exact_S(params, batch, updates, kl)
  np.testing.assert_allclose(S_ref, 5 * tau, rtol=1e-5)
  out, _, stats = one_update(params, batch, updates, **cfg)
  S = float(stats["S"])
  np.testing.assert_allclose(S, S_ref, rtol=1e-5)
  assert float(stats["S_lin"]) == S
  tau32 = np.float32(stats["tau"])
  np.testing.assert_allclose(float(tau32), tau, rtol=1e-6)
  c = float(stats["c"])
  assert c == float(np.minimum(np.float32(1), tau32 / np.float32(S)))
  np.testing.assert_allclose(c, 0.2, rtol=1e-5)
  assert int(stats["clipped_steps"]) == 1
  # exact_every=1: the β estimator does not run, so no β was measured.
  assert np.isnan(np.asarray(stats["beta"])).all()
  assert np.isnan(np.asarray(stats["contribution"])).all()
  assert float(stats["calibration"]) == 1.0
  # Every leaf, embed and lm_head included, is scaled by the same c.
  for got, u in zip(jax.tree.leaves(out), jax.tree.leaves(updates)):
    np.testing.assert_allclose(np.asarray(got), c * np.asarray(u), rtol=2e-5,
                               atol=1e-9)

  # Unclipped (S = τ/5): c = 1 exactly.
  updates = scaled(base, 0.2 * tau / S_base)
  _, _, stats = one_update(params, batch, updates, **cfg)
  np.testing.assert_allclose(float(stats["S"]),
                             brute_exact_S(params, batch, updates, kl), rtol=1e-5)
  assert float(stats["c"]) == 1.0 and int(stats["clipped_steps"]) == 0

  # A zero update: S = 0, c = 1, nothing NaN.
  _, _, stats = one_update(params, batch, jax.tree.map(jnp.zeros_like, base),
                           **cfg)
  assert float(stats["S"]) == 0.0 and float(stats["c"]) == 1.0


def test_exact_surrogate_metrics_differ_and_l1_dominates_exact(model):
  params, batch = model
  updates = random_like(jax.random.PRNGKey(5), params, 0.1)
  S = {}
  for kl in ("bound", "fisher"):
    for aggregate in ("exact", "l1"):
      S[kl, aggregate] = float(one_update(params, batch, updates,
                                          aggregate=aggregate, kl=kl)[2]["S"])
    # The L1 surrogate bounds the exact change (the triangle inequality holds
    # for the Fisher seminorm too), and is not trivially equal to it.
    assert S[kl, "l1"] >= S[kl, "exact"] * (1 - 1e-6), S
    assert S[kl, "l1"] > S[kl, "exact"] * (1 + 1e-3), S
    np.testing.assert_allclose(S[kl, "exact"],
                               brute_exact_S(params, batch, updates, kl),
                               rtol=1e-5)
    np.testing.assert_allclose(
        S[kl, "l1"],
        np.sum(brute_betas(params, batch, updates, kl) * block_norms(updates)),
        rtol=1e-5)
  # The Fisher size is at most the bound size (‖F‖ <= ½), and differs from it.
  assert S["fisher", "exact"] < S["bound", "exact"]
  assert S["fisher", "l1"] < S["bound", "l1"]


# ---------------------------------------------------------------------------
# 3. kl="fisher" with the per-layer surrogates
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("aggregate", ["l1", "l2"])
def test_fisher_layer_betas_match_brute_force(model, aggregate):
  params, batch = model
  base = random_like(jax.random.PRNGKey(6), params, 0.1)
  beta_ref = brute_betas(params, batch, base, "fisher")
  # The Fisher β differs from the bound β: the test can tell them apart.
  assert np.all(np.abs(beta_ref / brute_betas(params, batch, base, "bound")
                       - 1) > 1e-2)

  def surrogate(s):
    return s.sum() if aggregate == "l1" else np.sqrt(len(s)) * np.linalg.norm(s)

  # Scale the update so that S = 4τ: c = 1/4.
  updates = scaled(base, 4 * tau_of(DELTA)
                   / surrogate(beta_ref * block_norms(base)))
  s_ref = beta_ref * block_norms(updates)  # β depends on the direction only
  _, _, stats = one_update(params, batch, updates, aggregate=aggregate,
                           kl="fisher")
  np.testing.assert_allclose(np.asarray(stats["beta"]), beta_ref, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(stats["contribution"]), s_ref, rtol=1e-5)
  np.testing.assert_allclose(float(stats["S"]), surrogate(s_ref), rtol=1e-5)
  np.testing.assert_allclose(float(stats["c"]), 0.25, rtol=1e-5)
  assert "S_lin" not in stats and "calibration" not in stats  # not "exact"


# ---------------------------------------------------------------------------
# 4. fisher + exact: the applied KL lands on δ
# ---------------------------------------------------------------------------


def _still_embed_out(updates):
  """Unbudgeted groups change the logits outside of S: keep them still."""
  return {**updates, "embed": jnp.zeros_like(updates["embed"]),
          "lm_head": jnp.zeros_like(updates["lm_head"])}


@pytest.mark.parametrize("delta,include_embed_out", [
    (1e-4, False), (1e-3, False), (1e-3, True)])
def test_fisher_exact_applied_kl_lands_on_delta(model, delta, include_embed_out):
  params, batch = model
  updates = random_like(jax.random.PRNGKey(7), params, 0.3)
  if not include_embed_out:
    updates = _still_embed_out(updates)
  # (guard=True does not change this step: it acts on the next one.)
  out, _, stats = one_update(params, batch, updates, target_kl=delta,
                             aggregate="exact", kl="fisher", probe_every=1,
                             guard=True, include_embed_out=include_embed_out)
  c = float(stats["c"])
  assert c < 0.5
  # Second order: c²·½·mean Var_p(J ΔW) = δ.
  np.testing.assert_allclose(c * float(stats["S"]), tau_of(delta), rtol=1e-6)
  applied = float(stats["applied_kl"])
  np.testing.assert_allclose(applied, delta, rtol=0.05)
  # Recompute from the logits before / after the step the caller applies.
  z0 = logits64(params, batch)
  z1 = logits64(optax.apply_updates(params, out), batch)
  exact = np_kl(z0, z1)
  np.testing.assert_allclose(exact, delta, rtol=0.05)
  np.testing.assert_allclose(applied, exact, rtol=2e-3)
  # T is the applied change's Fisher size (≈ τ at this small δ).
  np.testing.assert_allclose(float(stats["applied_change"]),
                             np_size(z1 - z0, z0, "fisher"), rtol=1e-3)
  np.testing.assert_allclose(float(stats["applied_change"]), tau_of(delta),
                             rtol=0.05)


def test_bound_exact_applied_kl_stays_below_delta(model):
  """The bound metric over-estimates the KL: the applied KL is well below δ."""
  params, batch = model
  updates = _still_embed_out(random_like(jax.random.PRNGKey(7), params, 0.3))
  _, _, stats = one_update(params, batch, updates, aggregate="exact",
                           kl="bound", probe_every=1)
  assert float(stats["c"]) < 1
  assert float(stats["applied_kl"]) < 0.9 * DELTA


# ---------------------------------------------------------------------------
# 5. exact_every=k: measure every k steps, calibrated L1 in between
# ---------------------------------------------------------------------------


def test_exact_every_three_follows_the_calibration_rule(model):
  params, batch = model
  kl = "fisher"
  tx, update = compiled(aggregate="exact", kl=kl, exact_every=3,
                        update_every=1)
  state = tx.init(params)
  prev = None
  off_step_gap = []
  for k in range(7):
    # A new direction every step, so a stale calibration is visibly stale.
    updates = random_like(jax.random.PRNGKey(100 + k), params, 0.05 * (1 + k))
    out, state = update(updates, state, params, batch=batch)
    stats = jax.tree.map(np.asarray, ebc_optax.telemetry(state))
    S, S_lin = float(stats["S"]), float(stats["S_lin"])
    cal = float(stats["calibration"])
    s_l1 = float(np.sum(stats["contribution"], dtype=np.float32))
    exact_now = brute_exact_S(params, batch, updates, kl)
    # β runs (every step here): the contributions are the brute-force ones.
    np.testing.assert_allclose(
        stats["contribution"],
        brute_betas(params, batch, updates, kl) * block_norms(updates),
        rtol=1e-5)
    assert int(stats["step"]) == k + 1
    if k % 3 == 0:  # a measurement step
      assert S == S_lin
      np.testing.assert_allclose(S_lin, exact_now, rtol=1e-5)
      np.testing.assert_allclose(cal, S_lin / s_l1, rtol=1e-6)
      assert cal < 1.0  # exact <= L1 at safety 1
    else:
      assert S_lin == prev["S_lin"] and cal == prev["calibration"]
      np.testing.assert_allclose(S, cal * s_l1, rtol=1e-6)
      off_step_gap.append(abs(S / exact_now - 1))
    assert float(stats["c"]) == float(np.minimum(
        np.float32(1), np.float32(stats["tau"]) / np.float32(S)))
    prev = {"S_lin": S_lin, "calibration": cal}
    params = optax.apply_updates(params, out)
  # Between measurements S is an estimate, not a fresh measurement.
  assert max(off_step_gap) > 1e-3, off_step_gap


# ---------------------------------------------------------------------------
# 6. jit: one trace over several steps inside optax.chain
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("aggregate,kl,exact_every", [
    ("exact", "bound", 1), ("exact", "fisher", 2), ("l1", "fisher", 1)])
def test_modes_trace_once_in_a_chain(model, aggregate, kl, exact_every):
  params, batch = model
  tx = optax.chain(optax.adam(5e-2), ebc_optax.ellipsotope_budget_clip(
      tiny_logits_fn, 0.01, aggregate=aggregate, kl=kl, exact_every=exact_every,
      probe_every=2, update_every=2, controller="pi"))
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    grads = jax.grad(next_token_loss)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  for _ in range(5):
    params, state = step(params, state, batch)
  assert step._cache_size() == 1
  chex.assert_tree_all_finite(state)
  stats = ebc_optax.telemetry(state)
  assert int(stats["step"]) == 5 and int(stats["probe_count"]) == 3
  assert float(stats["S"]) > 0 and 0 < float(stats["c"]) <= 1
  assert float(stats["applied_kl"]) > 0
  if aggregate == "exact":
    assert float(stats["S_lin"]) > 0
    assert (float(stats["calibration"]) == 1.0) == (exact_every == 1)
  else:
    assert "S_lin" not in stats


# ---------------------------------------------------------------------------
# 7. data parallel: pmap and sharded jit match one device
# ---------------------------------------------------------------------------

PAR_STEPS = 3
PAR_KW = dict(controller="pi", target_kl=0.003, update_every=1, probe_layers=1, probe_every=1,
              probe_batch_size=None)
PAR_KEYS = ("c", "S", "tau", "delta", "applied_kl", "applied_change", "rho",
            "beta", "contribution", "S_lin", "calibration")


def _par_tx(aggregate, axis_name=None, **kw):
  return optax.chain(optax.adam(5e-2), ebc_optax.ellipsotope_budget_clip(
      tiny_logits_fn, aggregate=aggregate, kl="fisher", axis_name=axis_name,
      **{**PAR_KW, **kw}))


def _single_device(tx):
  """``run(params, grad_batch, ebc_batch)``: grads from one batch, EBC on another."""
  @jax.jit
  def step(params, state, grad_batch, ebc_batch):
    grads = jax.grad(next_token_loss)(params, grad_batch)
    updates, state = tx.update(grads, state, params, batch=ebc_batch)
    return optax.apply_updates(params, updates), state

  def run(params, grad_batch, ebc_batch, steps=PAR_STEPS):
    state = tx.init(params)
    for _ in range(steps):
      params, state = step(params, state, grad_batch, ebc_batch)
    return params, ebc_optax.telemetry(state)
  return run


def _pmap_run(tx, params, batch, steps=PAR_STEPS):
  return dp.pmap_run(tx, next_token_loss, params, batch, steps, keys=PAR_KEYS)


def _assert_matches(params, stats, reference):
  ref_params, ref_stats = reference
  chex.assert_trees_all_close(params, ref_params, rtol=2e-5, atol=2e-6)
  for key in PAR_KEYS:
    if key not in ref_stats:  # S_lin, calibration: "exact" only
      assert key not in stats
      continue
    # A small step's KL (and T, ρ) cancel in float32: allow for the
    # reduction order.
    np.testing.assert_allclose(
        stats[key], ref_stats[key],
        rtol=1e-4 if key in ("applied_kl", "applied_change", "rho") else 2e-5,
        atol=1e-12, err_msg=key)


@pytest.fixture(scope="module")
def par_setup():
  return dp.problem()


@pytest.mark.parametrize("aggregate", ["exact", "l1"])
def test_fisher_data_parallel_matches_single_device(par_setup, aggregate):
  params, batch = par_setup
  reference = _single_device(_par_tx(aggregate))(params, batch, batch)
  ref_stats = reference[1]
  assert float(ref_stats["c"]) < 1.0  # the clip is active: a meaningful check
  assert float(ref_stats["applied_kl"]) > 0
  assert ("S_lin" in ref_stats) == (aggregate == "exact")

  _assert_matches(*_pmap_run(_par_tx(aggregate, "dp"), params, batch), reference)
  _assert_matches(*dp.sharded_jit_run(_par_tx(aggregate), next_token_loss,
                                      params, batch, PAR_STEPS), reference)


# ---------------------------------------------------------------------------
# 8. fractional probe_batch_size
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("value", [0.0, 1.5, -1, 0, True, float("nan"),
                                   jnp.asarray(0.5), jnp.asarray(2)])
def test_bad_probe_batch_size_raises_naming_it(value):
  with pytest.raises(ValueError, match="probe_batch_size"):
    ebc_optax.ellipsotope_budget_clip(tiny_logits_fn, 0.05,
                                      probe_batch_size=value, controller="pi")
  with pytest.raises(ValueError, match="probe_batch_size"):
    ebc_optax.advanced.sensitivity_estimator(tiny_logits_fn, **{
        **ebc_optax.EBCConfig().estimator_kwargs(), "probe_batch_size": value})


def test_fractional_probe_batch_in_the_transform_uses_strided_rows(model):
  """The rule itself is tested in test_rows.py; here it reaches ‖J ΔW‖."""
  params, batch = model
  updates = random_like(jax.random.PRNGKey(12), params, 0.1)
  _, _, stats = one_update(params, batch, updates, aggregate="exact",
                           kl="fisher", probe_batch_size=0.3)  # every 3rd row
  S_3 = brute_exact_S(params, batch[::3], updates, "fisher")
  np.testing.assert_allclose(float(stats["S"]), S_3, rtol=1e-5)
  # Neither the first 3 rows nor the whole batch would give this S.
  for other in (batch[:3], batch):
    assert abs(brute_exact_S(params, other, updates, "fisher") / S_3 - 1) > 1e-3


# ---------------------------------------------------------------------------
# 9. the PI controller on top of fisher + exact
# ---------------------------------------------------------------------------


def test_pi_controller_tracks_the_target_with_fisher_exact(model):
  params, batch = model
  target = 0.005  # below the default delta_min: pass a controller
  tx = optax.chain(optax.adam(0.3), ebc_optax.ellipsotope_budget_clip(
      tiny_logits_fn, target, aggregate="exact", kl="fisher",
      controller=ebc_optax.controllers.pi_controller(delta_min=1e-3, delta_max=0.3),
      include_embed_out=True, probe_every=2, probe_batch_size=None))
  history = []
  for k, stats in enumerate(telemetry_per_step(tx, params, batch, 30)[0]):
    if k % 2 == 0:
      history.append((float(stats["applied_kl"]), float(stats["c"]),
                      float(stats["delta"])))
  assert int(stats["probe_count"]) == 15
  later = history[len(history) // 2:]
  assert all(c < 1.0 for _, c, _ in later), history  # the clip is active
  for applied, _, delta in later:
    assert 0.7 * target <= applied <= 1.3 * target, history
    assert 0.7 * target <= delta <= 1.3 * target, history


# ---------------------------------------------------------------------------
# 10. the guard's ρ with the Fisher metric
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("aggregate,safety", [("l1", 0.3), ("exact", 1.0)])
def test_fisher_guard_ratio_matches_brute_force(model, aggregate, safety):
  params, batch = model
  updates = _still_embed_out(random_like(jax.random.PRNGKey(7), params, 0.3))
  delta = 1e-3
  tx, update = compiled(delta, aggregate=aggregate, kl="fisher", guard=True,
                        probe_every=1, safety=safety, include_embed_out=False)
  state = tx.init(params)
  out, state = update(updates, state, params, batch=batch)
  stats = ebc_optax.telemetry(state)

  if aggregate == "exact":
    S_ref = brute_exact_S(params, batch, updates, "fisher")
  else:
    S_ref = safety * np.sum(brute_betas(params, batch, updates, "fisher")
                            * block_norms(updates))
  c_ref = min(1.0, tau_of(delta) / S_ref)
  assert c_ref < 1
  np.testing.assert_allclose(float(stats["S"]), S_ref, rtol=1e-5)
  np.testing.assert_allclose(float(stats["c"]), c_ref, rtol=1e-5)
  z0 = logits64(params, batch)
  z1 = logits64(optax.apply_updates(params, out), batch)
  T_ref = np_size(z1 - z0, z0, "fisher")
  rho_ref = T_ref / (c_ref * S_ref)
  np.testing.assert_allclose(float(stats["applied_change"]), T_ref, rtol=1e-4)
  np.testing.assert_allclose(float(stats["rho"]), rho_ref, rtol=1e-4)
  np.testing.assert_allclose(float(optax.tree.get(state, "next_radius_factor")),
                             min(1.0, 1 / rho_ref),
                             rtol=1e-4)
  assert int(stats["guard_trips"]) == int(rho_ref > 1)
  if safety < 1:
    assert rho_ref > 1.5  # the surrogate under-estimates: the guard trips
  else:
    np.testing.assert_allclose(rho_ref, 1.0, atol=0.05)  # exact to 2nd order
  # The next step uses τ = sqrt(4δ)·min(1, 1/ρ).
  _, state = update(updates, state, params, batch=batch)
  np.testing.assert_allclose(float(ebc_optax.telemetry(state)["tau"]),
                             tau_of(delta) * min(1.0, 1 / rho_ref), rtol=1e-4)


# ---------------------------------------------------------------------------
# 11. bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,value,message", [
    ("kl", "kl2", r"kl must be one of \('bound', 'fisher'\)"),
    ("kl", None, "kl must be one of"),
    ("aggregate", "linf", r"aggregate must be one of \('l1', 'l2', 'exact'\)"),
    ("exact_every", 0, r"exact_every must be in \[1"),
    ("exact_every", -2, r"exact_every must be in \[1"),
    ("exact_every", 1.5, "exact_every must be an int"),
    ("exact_every", True, "exact_every must be an int"),
])
def test_bad_mode_arguments_raise_naming_the_parameter(name, value, message):
  with pytest.raises(ValueError, match=message):
    ebc_optax.ellipsotope_budget_clip(tiny_logits_fn, 0.05, **{"controller": "pi", name: value})


def test_bad_kl_in_the_pieces_raises():
  with pytest.raises(ValueError, match="kl must be one of"):
    ebc_optax.advanced.sensitivity_estimator(
        tiny_logits_fn, **ebc_optax.EBCConfig(kl="kl2").estimator_kwargs())
  est = ebc_optax.advanced.sensitivity_estimator(
      tiny_logits_fn, **ebc_optax.EBCConfig().estimator_kwargs())
  clip_kwargs = ebc_optax.EBCConfig(controller="none").clip_kwargs()
  # kl_probe has no metric of its own: it measures in the estimator's.
  with pytest.raises(TypeError, match="kl"):
    ebc_optax.advanced.kl_probe(
        ebc_optax.advanced.budget_clip(est, **clip_kwargs), est, kl="fisher",
        **ebc_optax.EBCConfig(controller="none").probe_kwargs())
  with pytest.raises(ValueError, match="exact_every"):
    ebc_optax.advanced.budget_clip(
        est, **{**clip_kwargs, "aggregate": "exact", "exact_every": 0})
