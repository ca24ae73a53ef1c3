"""Tests for the β estimator (``ebc_optax._sensitivity``) and its use in the transform.

The reference for every β is the brute-force one: the Jacobian of the logits
with respect to each block's flattened parameters is materialised with
``jax.jacfwd`` and applied to the unit update direction in float64 numpy.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import ebc_optax
from ebc_optax import _layers
from ebc_optax import _sensitivity
from ebc_optax import formulas
from conftest import block_jacobian
from conftest import block_norms
from conftest import flat_block
from conftest import np_center
from conftest import random_like
from conftest import tiny_batch
from conftest import tiny_logits_fn
from conftest import tiny_params

SETTINGS = settings(max_examples=25, deadline=None)


# ---------------------------------------------------------------------------
# Independent references
# ---------------------------------------------------------------------------


def block_jacobians(params, batch, logits_fn=tiny_logits_fn):
  """One [N*V, P_i] float64 Jacobian per block (logits w.r.t. flat block params)."""
  return [block_jacobian(logits_fn, params, batch, i)
          for i in range(len(params["blocks"]))]


def brute_betas(jacs, updates, n_tokens, vocab):
  """β_ℓ = ‖center(J_ℓ U_ℓ)‖ / sqrt(N); NaN for a zero update."""
  out = []
  for i, jac in enumerate(jacs):
    dw = flat_block(updates, i)
    norm = np.linalg.norm(dw)
    if norm == 0:
      out.append(np.nan)
      continue
    dz = (jac @ (dw / norm)).reshape(n_tokens, vocab)
    out.append(np.linalg.norm(np_center(dz)) / np.sqrt(n_tokens))
  return np.asarray(out)


def make_tx(target_kl=0.05, **kw):
  kw.setdefault("controller", None)
  kw.setdefault("guard", False)
  kw.setdefault("beta_ema", 0.0)
  kw.setdefault("probe_batch_size", None)  # brute force is on the whole batch
  kw.setdefault("safety", 1.0)
  return ebc_optax.ellipsotope_budget_clip(tiny_logits_fn, target_kl, **{"controller": "pi", **kw})


@pytest.fixture(scope="module")
def model2():
  """2-block tiny model, its batch [8, 5] (vocab 11) and block Jacobians."""
  params = tiny_params(jax.random.PRNGKey(0))
  batch = tiny_batch(jax.random.PRNGKey(1))
  return params, batch, block_jacobians(params, batch)


# ---------------------------------------------------------------------------
# (a) directional_logit_change, jvp == J U
# ---------------------------------------------------------------------------


def _directional(params, batch, updates, block, method, fd_step=1e-2):
  part = _layers.partition_layers(params)
  leaves, treedef = jax.tree.flatten(params)
  idx = part.leaf_indices[block]
  upd = jax.tree.leaves(updates)
  norm = np.sqrt(sum(float(jnp.sum(upd[i] ** 2)) for i in idx))
  direction = [upd[i] / norm for i in idx]
  return np.asarray(_sensitivity.directional_logit_change(
      tiny_logits_fn, leaves, treedef, idx, direction, batch, method=method,
      fd_step=fd_step), np.float64)


def test_directional_logit_change_jvp_equals_jacobian(model2):
  params, batch, jacs = model2
  updates = random_like(jax.random.PRNGKey(2), params)
  for block in range(2):
    dz = _directional(params, batch, updates, block, "jvp")
    assert dz.shape == (8, 5, 11)
    dw = flat_block(updates, block)
    want = (jacs[block] @ (dw / np.linalg.norm(dw))).reshape(8, 5, 11)
    np.testing.assert_allclose(dz, want, rtol=1e-5, atol=1e-6)
    # The change is not trivially zero, and only this block moved: the
    # other block's direction gives a different change.
    assert np.linalg.norm(want) > 1e-2
  other = (jacs[1] @ (flat_block(updates, 1) / np.linalg.norm(flat_block(updates, 1))))
  assert not np.allclose(_directional(params, batch, updates, 0, "jvp").reshape(-1),
                         other, rtol=1e-2)


def test_directional_logit_change_is_linear_in_the_direction(model2):
  params, batch, jacs = model2
  part = _layers.partition_layers(params)
  leaves, treedef = jax.tree.flatten(params)
  idx = part.leaf_indices[1]
  d1 = [jax.random.normal(jax.random.PRNGKey(5), leaves[i].shape) for i in idx]
  d2 = [jax.random.normal(jax.random.PRNGKey(6), leaves[i].shape) for i in idx]
  f = lambda d: np.asarray(_sensitivity.directional_logit_change(
      tiny_logits_fn, leaves, treedef, idx, d, batch))
  combo = [2.0 * a - 3.0 * b for a, b in zip(d1, d2)]
  np.testing.assert_allclose(f(combo), 2.0 * f(d1) - 3.0 * f(d2), rtol=1e-4,
                             atol=1e-5)
  # And equals the Jacobian applied to the raw (non-unit) direction.
  # Leaf order of the block (b, w) is the order ravel_pytree uses.
  flat = np.concatenate([np.asarray(d, np.float64).reshape(-1) for d in d1])
  np.testing.assert_allclose(f(d1).reshape(-1), jacs[1] @ flat, rtol=1e-5,
                             atol=1e-5)


# ---------------------------------------------------------------------------
# (b) fd agrees with jvp
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fd_step", [1e-2, 1e-3])
def test_directional_logit_change_fd_matches_jvp(model2, fd_step):
  params, batch, _ = model2
  updates = random_like(jax.random.PRNGKey(3), params)
  for block in range(2):
    jvp = _directional(params, batch, updates, block, "jvp")
    fd = _directional(params, batch, updates, block, "fd", fd_step=fd_step)
    n_jvp = np.linalg.norm(np_center(jvp))
    n_fd = np.linalg.norm(np_center(fd))
    np.testing.assert_allclose(n_fd, n_jvp, rtol=1e-3)
    # Elementwise too, relative to the size of the change.
    assert np.max(np.abs(fd - jvp)) <= 1e-2 * np.max(np.abs(jvp))


# ---------------------------------------------------------------------------
# (c) the transform's β and c after the first update
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("aggregate", ["l1", "l2"])
@pytest.mark.parametrize("regime", ["clipped", "unclipped"])
def test_first_update_beta_and_c_match_brute_force(model2, regime, aggregate):
  params, batch, jacs = model2
  updates = random_like(jax.random.PRNGKey(4), params, 0.1)
  beta_ref = brute_betas(jacs, updates, 40, 11)
  norms = block_norms(updates)
  s_ref = beta_ref * norms
  if aggregate == "l1":
    S_ref = s_ref.sum()
  else:
    S_ref = np.sqrt(len(s_ref)) * np.linalg.norm(s_ref)
  # Pick δ so that τ = S_ref / 5 (clipped) or 5 S_ref (unclipped).
  tau_goal = S_ref / 5 if regime == "clipped" else 5 * S_ref
  target_kl = float(tau_goal**2 / 4)

  tx = make_tx(target_kl, aggregate=aggregate)
  state = tx.init(params)
  out, state = jax.jit(tx.update)(updates, state, params, batch=batch)
  stats = ebc_optax.telemetry(state)

  np.testing.assert_allclose(np.asarray(stats["beta"]), beta_ref, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(stats["contribution"]), s_ref, rtol=1e-5)
  np.testing.assert_allclose(float(stats["S"]), S_ref, rtol=1e-5)
  tau = np.sqrt(4.0 * np.float64(np.float32(target_kl)))
  np.testing.assert_allclose(float(stats["tau"]), tau, rtol=1e-6)
  np.testing.assert_allclose(float(stats["delta"]), target_kl, rtol=1e-6)
  c_ref = min(1.0, tau / S_ref)
  c = float(stats["c"])
  np.testing.assert_allclose(c, c_ref, rtol=1e-5)
  if regime == "clipped":
    assert c < 1.0
    np.testing.assert_allclose(c, 0.2, rtol=1e-5)
    assert int(stats["clipped_steps"]) == 1
  else:
    assert c == 1.0
    assert int(stats["clipped_steps"]) == 0
  assert int(stats["step"]) == 1
  # Every leaf, embed and lm_head included, is scaled by the same c.
  for got, u in zip(jax.tree.leaves(out), jax.tree.leaves(updates)):
    np.testing.assert_allclose(np.asarray(got), c_ref * np.asarray(u),
                               rtol=2e-5, atol=1e-9)


def test_safety_factor_scales_contributions_not_beta(model2):
  params, batch, jacs = model2
  updates = random_like(jax.random.PRNGKey(4), params, 0.1)
  beta_ref = brute_betas(jacs, updates, 40, 11)
  norms = block_norms(updates)
  tx = make_tx(1e-4, safety=1.25)
  state = tx.init(params)
  _, state = jax.jit(tx.update)(updates, state, params, batch=batch)
  stats = ebc_optax.telemetry(state)
  np.testing.assert_allclose(np.asarray(stats["beta"]), beta_ref, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(stats["contribution"]),
                             1.25 * beta_ref * norms, rtol=1e-5)
  S_ref = 1.25 * np.sum(beta_ref * norms)
  np.testing.assert_allclose(float(stats["S"]), S_ref, rtol=1e-5)
  np.testing.assert_allclose(float(stats["c"]),
                             min(1.0, np.sqrt(4 * np.float64(np.float32(1e-4))) / S_ref),
                             rtol=1e-5)


# ---------------------------------------------------------------------------
# (d) robust_ema
# ---------------------------------------------------------------------------


def ref_robust_ema(old, new, measured, decay, huber_ratio):
  if not measured or decay == 0:
    return new
  clipped = new
  if old > 0:
    clipped = min(max(new, old / huber_ratio), old * huber_ratio)
  return decay * old + (1 - decay) * clipped


@SETTINGS
@given(old=st.one_of(st.just(0.0), st.floats(1e-3, 10.0)),
       new=st.one_of(st.just(0.0), st.floats(1e-4, 100.0)),
       measured=st.booleans(),
       decay=st.sampled_from([0.0, 0.5, 0.9, 0.99]),
       huber_ratio=st.sampled_from([1.0, 2.0, 4.0, 10.0]))
def test_robust_ema_matches_python_reference(old, new, measured, decay,
                                             huber_ratio):
  old32, new32 = float(np.float32(old)), float(np.float32(new))
  got = float(formulas.robust_ema(jnp.float32(old), jnp.float32(new),
                                      jnp.asarray(measured), decay, huber_ratio))
  want = ref_robust_ema(old32, new32, measured, decay, huber_ratio)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-30)


def test_robust_ema_cases():
  ema = lambda old, new, measured, decay, huber: float(formulas.robust_ema(
      jnp.float32(old), jnp.float32(new), jnp.asarray(measured), decay, huber))
  # First measurement: taken as is, whatever the (init) old value.
  assert ema(0.0, 3.0, False, 0.9, 4.0) == pytest.approx(3.0)
  assert ema(50.0, 3.0, False, 0.9, 4.0) == pytest.approx(3.0)
  # decay = 0: no memory, no clipping, even for a 100x outlier.
  assert ema(1.0, 100.0, True, 0.0, 4.0) == pytest.approx(100.0)
  assert ema(1.0, 0.01, True, 0.0, 4.0) == pytest.approx(0.01)
  # old = 0 (measured): nothing to clip against, plain EMA.
  assert ema(0.0, 2.0, True, 0.75, 4.0) == pytest.approx(0.5)
  # Huber clipping up and down.
  assert ema(1.0, 100.0, True, 0.5, 4.0) == pytest.approx(0.5 + 0.5 * 4.0)
  assert ema(1.0, 0.01, True, 0.5, 4.0) == pytest.approx(0.5 + 0.5 * 0.25)
  # Inside the band: plain EMA.
  assert ema(1.0, 2.0, True, 0.9, 4.0) == pytest.approx(0.9 + 0.1 * 2.0)
  # huber_ratio = 1 pins the estimate to old.
  assert ema(2.0, 7.0, True, 0.3, 1.0) == pytest.approx(2.0)


def test_robust_ema_vectorised():
  old = jnp.array([0.0, 1.0, 1.0, 2.0], jnp.float32)
  new = jnp.array([5.0, 10.0, 0.1, 3.0], jnp.float32)
  measured = jnp.array([False, True, True, True])
  got = np.asarray(formulas.robust_ema(old, new, measured, 0.5, 2.0))
  want = [ref_robust_ema(float(o), float(n), bool(m), 0.5, 2.0)
          for o, n, m in zip(old, new, measured)]
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_transform_ema_takes_first_measurement_as_is(model2):
  """beta_ema > 0: step 0 gives the fresh β; step 1 is the Huber-clipped EMA."""
  params, batch, jacs = model2
  u0 = random_like(jax.random.PRNGKey(10), params)
  u1 = random_like(jax.random.PRNGKey(11), params)
  tx = make_tx(0.05, beta_ema=0.5, huber_ratio=1.05, full_sweep_every=1,
               probe_every=0)
  update = jax.jit(tx.update)
  state = tx.init(params)
  _, state = update(u0, state, params, batch=batch)
  b0 = brute_betas(jacs, u0, 40, 11)
  np.testing.assert_allclose(np.asarray(ebc_optax.telemetry(state)["beta"]), b0,
                             rtol=1e-5)
  _, state = update(u1, state, params, batch=batch)
  b1 = brute_betas(jacs, u1, 40, 11)
  want = [ref_robust_ema(o, n, True, 0.5, 1.05) for o, n in zip(b0, b1)]
  np.testing.assert_allclose(np.asarray(ebc_optax.telemetry(state)["beta"]),
                             want, rtol=1e-5)


# ---------------------------------------------------------------------------
# (e) the round-robin schedule
# ---------------------------------------------------------------------------


def _run_schedule(params, batch, num_steps, tx, seed=100, updates_fn=None):
  """Runs tx for num_steps on fresh random updates; returns β per step and updates."""
  update = jax.jit(tx.update)
  state = tx.init(params)
  betas, ups = [], []
  for step in range(num_steps):
    u = random_like(jax.random.PRNGKey(seed + step), params)
    if updates_fn is not None:
      u = updates_fn(step, u)
    _, state = update(u, state, params, batch=batch)
    betas.append(np.asarray(ebc_optax.telemetry(state)["beta"], np.float64))
    ups.append(u)
  return betas, ups, state


def _check_refreshes(betas, ups, jacs, expected, n_tokens, vocab):
  """expected[step] = set of layers refreshed at step."""
  prev = None
  for step, (beta, u) in enumerate(zip(betas, ups)):
    ref = brute_betas(jacs, u, n_tokens, vocab)
    for layer in range(len(beta)):
      if layer in expected[step]:
        np.testing.assert_allclose(beta[layer], ref[layer], rtol=1e-5,
                                   err_msg=f"step {step} layer {layer}")
        if prev is not None:
          assert beta[layer] != prev[layer], (step, layer)
      else:
        assert beta[layer] == prev[layer], (step, layer, beta, prev)
    prev = beta


def test_round_robin_one_layer_every_third_step():
  params = tiny_params(jax.random.PRNGKey(7), num_blocks=4)
  batch = tiny_batch(jax.random.PRNGKey(8), batch=2, seq=3)
  jacs = block_jacobians(params, batch)
  tx = make_tx(0.05, update_every=3, probe_layers=1, full_sweep_every=0)
  betas, ups, state = _run_schedule(params, batch, 17, tx)
  expected = {0: {0, 1, 2, 3}}
  for step in range(1, 17):
    expected[step] = {(step // 3 - 1) % 4} if step % 3 == 0 else set()
  assert expected[3] == {0} and expected[12] == {3} and expected[15] == {0}
  _check_refreshes(betas, ups, jacs, expected, 6, 11)
  assert int(ebc_optax.telemetry(state)["step"]) == 17


def test_round_robin_two_layers_wraps_around():
  params = tiny_params(jax.random.PRNGKey(7), num_blocks=3)
  batch = tiny_batch(jax.random.PRNGKey(8), batch=2, seq=3)
  jacs = block_jacobians(params, batch)
  tx = make_tx(0.05, update_every=2, probe_layers=2, full_sweep_every=None,
               probe_every=0)
  betas, ups, _ = _run_schedule(params, batch, 9, tx)
  expected = {0: {0, 1, 2}, 1: set(), 2: {0, 1}, 3: set(), 4: {2, 0}, 5: set(),
              6: {1, 2}, 7: set(), 8: {0, 1}}
  _check_refreshes(betas, ups, jacs, expected, 6, 11)


def test_periodic_full_sweeps():
  params = tiny_params(jax.random.PRNGKey(7), num_blocks=3)
  batch = tiny_batch(jax.random.PRNGKey(8), batch=2, seq=3)
  jacs = block_jacobians(params, batch)
  tx = make_tx(0.05, update_every=100, probe_layers=1, full_sweep_every=4,
               probe_every=0)
  betas, ups, _ = _run_schedule(params, batch, 9, tx)
  expected = {s: ({0, 1, 2} if s % 4 == 0 else set()) for s in range(9)}
  _check_refreshes(betas, ups, jacs, expected, 6, 11)


@pytest.mark.parametrize("num_blocks,swept_at", [(8, (200, 400)), (9, (400,))])
def test_auto_full_sweep_comes_every_200_steps_per_8_layers(num_blocks, swept_at):
  """The default sweep cadence: at 8 layers steps 200 and 400 sweep, at 9
  layers only 400 (200·⌈9/8⌉); the round-robin is kept out of the way."""
  params = tiny_params(jax.random.PRNGKey(7), num_blocks=num_blocks)
  batch = tiny_batch(jax.random.PRNGKey(8), batch=2, seq=3)
  tx = make_tx(0.05, update_every=1000, probe_layers=1, probe_every=0,
               beta_ema=0.5)
  update = jax.jit(tx.update)
  grads = random_like(jax.random.PRNGKey(9), params)
  _, state = update(grads, tx.init(params), params, batch=batch)
  first = np.asarray(ebc_optax.telemetry(state)["beta"])
  assert np.all(first > 0)

  def at(state, step):  # EBC's step counter set to ``step``
    return jax.tree.map(
        lambda x: x._replace(ebc_step=jnp.asarray(step, jnp.int32))
        if isinstance(x, ebc_optax.advanced.BudgetClipState) else x, state,
        is_leaf=lambda x: isinstance(x, ebc_optax.advanced.BudgetClipState))

  other = random_like(jax.random.PRNGKey(10), params)  # a new direction
  for step in (200, 400):
    _, after = update(other, at(state, step), params, batch=batch)
    beta = np.asarray(ebc_optax.telemetry(after)["beta"])
    if step in swept_at:
      assert np.all(beta != first), step
    else:
      np.testing.assert_array_equal(beta, first)


# ---------------------------------------------------------------------------
# (f) zero-norm layers
# ---------------------------------------------------------------------------


def _zero_block(u, i):
  blocks = list(u["blocks"])
  blocks[i] = jax.tree.map(jnp.zeros_like, blocks[i])
  return {**u, "blocks": blocks}


def test_zero_update_layer_keeps_its_beta(model2):
  params, batch, jacs = model2
  tx = make_tx(0.05, update_every=1, probe_layers=2, full_sweep_every=1,
               probe_every=0)
  # Every step refreshes every layer; step 1 has block 1 exactly zero.
  betas, ups, state = _run_schedule(
      params, batch, 3, tx,
      updates_fn=lambda s, u: _zero_block(u, 1) if s == 1 else u)
  refs = [brute_betas(jacs, u, 40, 11) for u in ups]
  np.testing.assert_allclose(betas[0], refs[0], rtol=1e-5)
  # Step 1: block 0 refreshed, block 1 kept (bitwise).
  np.testing.assert_allclose(betas[1][0], refs[1][0], rtol=1e-5)
  assert betas[1][0] != betas[0][0]
  assert betas[1][1] == betas[0][1]
  # Step 2: both refreshed again.
  np.testing.assert_allclose(betas[2], refs[2], rtol=1e-5)


def test_zero_update_layer_contributes_nothing_and_is_measured_when_it_moves(model2):
  params, batch, jacs = model2
  tx = make_tx(0.05, update_every=1000, probe_layers=1, full_sweep_every=0,
               probe_every=0)
  update = jax.jit(tx.update)
  state = tx.init(params)

  # Step 0: block 1 is zero -> never measured (β reads NaN), contributes 0.
  u0 = _zero_block(random_like(jax.random.PRNGKey(20), params), 1)
  out0, state = update(u0, state, params, batch=batch)
  st0 = ebc_optax.telemetry(state)
  b0 = brute_betas(jacs, u0, 40, 11)
  np.testing.assert_allclose(float(st0["beta"][0]), b0[0], rtol=1e-5)
  assert np.isnan(float(st0["beta"][1]))
  assert float(st0["contribution"][1]) == 0.0
  n0 = block_norms(u0)
  np.testing.assert_allclose(float(st0["S"]), b0[0] * n0[0], rtol=1e-5)
  assert np.all(np.isfinite(np.asarray(jax.tree.leaves(out0)[0])))

  # Step 1 is not a refresh step (1 % 1000 != 0, no periodic sweep), but block 1
  # now moves and has never been measured: it must be measured now.
  u1 = random_like(jax.random.PRNGKey(21), params)
  _, state = update(u1, state, params, batch=batch)
  st1 = ebc_optax.telemetry(state)
  b1 = brute_betas(jacs, u1, 40, 11)
  assert float(st1["beta"][1]) > 0.0
  np.testing.assert_allclose(float(st1["beta"][1]), b1[1], rtol=1e-5)
  n1 = block_norms(u1)
  beta1 = np.asarray(st1["beta"], np.float64)
  np.testing.assert_allclose(float(st1["S"]), np.sum(beta1 * n1), rtol=1e-5)

  # Step 2: everything measured, not a refresh step: β unchanged.
  u2 = random_like(jax.random.PRNGKey(22), params)
  _, state = update(u2, state, params, batch=batch)
  st2 = ebc_optax.telemetry(state)
  np.testing.assert_array_equal(np.asarray(st2["beta"]), np.asarray(st1["beta"]))
  np.testing.assert_allclose(float(st2["S"]), np.sum(beta1 * block_norms(u2)),
                             rtol=1e-5)


def test_all_zero_update_is_a_no_op(model2):
  params, batch, _ = model2
  tx = make_tx(0.05)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  out, state = jax.jit(tx.update)(zeros, state, params, batch=batch)
  stats = ebc_optax.telemetry(state)
  assert float(stats["S"]) == 0.0
  assert float(stats["c"]) == 1.0
  assert np.isnan(np.asarray(stats["beta"])).all()  # nothing was measured
  assert int(stats["nonfinite_skips"]) == 0
  for leaf in jax.tree.leaves(out):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)


# ---------------------------------------------------------------------------
# (g) sensitivity="fd" through the transform
# ---------------------------------------------------------------------------


def test_fd_transform_matches_jvp_transform(model2):
  params, batch, jacs = model2
  updates = random_like(jax.random.PRNGKey(30), params, 0.05)
  stats = {}
  for method in ("jvp", "fd"):
    tx = make_tx(1e-5, sensitivity=method, fd_step=1e-3, probe_every=0)
    state = tx.init(params)
    _, state = jax.jit(tx.update)(updates, state, params, batch=batch)
    stats[method] = ebc_optax.telemetry(state)
  c_jvp, c_fd = float(stats["jvp"]["c"]), float(stats["fd"]["c"])
  assert c_jvp < 1.0  # the comparison is not trivially 1 == 1
  np.testing.assert_allclose(c_fd, c_jvp, rtol=1e-3)
  np.testing.assert_allclose(np.asarray(stats["fd"]["beta"]),
                             brute_betas(jacs, updates, 40, 11), rtol=1e-3)


# ---------------------------------------------------------------------------
# (h) probe_batch_size
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("rows", [1, 3])
def test_probe_batch_size_uses_strided_rows(model2, rows):
  params, batch, jacs_full = model2
  updates = random_like(jax.random.PRNGKey(40), params)
  sub = batch[::len(batch) // rows][:rows]  # rows 0 / rows 0, 2, 4 of 8
  jacs_sub = block_jacobians(params, sub)
  beta_sub = brute_betas(jacs_sub, updates, rows * 5, 11)
  beta_full = brute_betas(jacs_full, updates, 40, 11)
  # The check below can tell the two apart.
  assert np.max(np.abs(beta_sub / beta_full - 1)) > 1e-3

  tx = make_tx(1e-4, probe_batch_size=rows)
  state = tx.init(params)
  _, state = jax.jit(tx.update)(updates, state, params, batch=batch)
  stats = ebc_optax.telemetry(state)
  np.testing.assert_allclose(np.asarray(stats["beta"]), beta_sub, rtol=1e-5)
  S_ref = np.sum(beta_sub * block_norms(updates))
  np.testing.assert_allclose(float(stats["S"]), S_ref, rtol=1e-5)
  np.testing.assert_allclose(float(stats["c"]),
                             min(1.0, np.sqrt(4 * np.float64(np.float32(1e-4))) / S_ref),
                             rtol=1e-5)


def test_probe_batch_size_larger_than_batch_raises(model2):
  params, batch, _ = model2
  tx = make_tx(1e-4, probe_batch_size=9)
  state = tx.init(params)
  with pytest.raises(ValueError, match="probe_batch_size"):
    tx.update(params, state, params, batch=batch)


@pytest.mark.parametrize("width,scale", [(128, 1.0), (256, 1.0), (128, 0.05)])
def test_fd_beta_within_one_percent_of_jvp_at_width(width, scale):
  """The FD step is relative to the RMS entry, so it stays linear at any width."""
  keys = jax.random.split(jax.random.PRNGKey(7), 4)
  params = {"embed": jax.random.normal(keys[0], (11, width)),
            "blocks": [{"w": scale * jax.random.normal(keys[1], (width, width)),
                        "b": jnp.zeros(width)}],
            "lm_head": jax.random.normal(keys[2], (width, 11)) / width ** 0.5}

  def logits_fn(p, tokens):
    h = p["embed"][tokens]
    h = h + jnp.tanh(h @ p["blocks"][0]["w"] / width ** 0.5 + p["blocks"][0]["b"])
    return h @ p["lm_head"]

  batch = jax.random.randint(keys[3], (4, 5), 0, 11)
  updates = random_like(jax.random.PRNGKey(8), params)
  betas = {}
  for method in ("jvp", "fd"):
    est = ebc_optax.advanced.sensitivity_estimator(
        logits_fn, **ebc_optax.EBCConfig(
            sensitivity=method, beta_ema=0.0, safety=1.0,
            probe_batch_size=None).estimator_kwargs())
    tx = ebc_optax.advanced.budget_clip(
        est, **ebc_optax.EBCConfig(controller="none").clip_kwargs())
    _, state = tx.update(updates, tx.init(params), params, batch=batch)
    betas[method] = float(state.sensitivity.layer_beta[0])
  np.testing.assert_allclose(betas["fd"], betas["jvp"], rtol=1e-2)


def test_fd_epsilon_does_not_grow_with_size():
  for n in (10, 1000, 100000):  # unit-scale entries: rms 1 at every size
    np.testing.assert_allclose(formulas.fd_epsilon(float(n), n, 1e-2), 1e-2,
                               rtol=1e-6)
  np.testing.assert_allclose(formulas.fd_epsilon(0.0, 5, 1e-2), 1e-4)
