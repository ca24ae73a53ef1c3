"""Tests for ``ebc_optax.formulas``: each equation against a brute force.

Every reference here is written out in plain numpy / Python loops (float64
where the formula allows), one token, layer or point at a time, so it shares
no code with the vectorised function it checks. The last tests hold the
module to its contract: every public function is small, has a docstring
example and a row in the formula map, and the map names only functions of
the module.
"""

import ast
import inspect
import itertools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ebc_optax import formulas

RNG = np.random.default_rng(0)


def _logits(shape=(3, 4, 6), scale=2.0, seed=0):
  rng = np.random.default_rng(seed)
  return (scale * rng.normal(size=shape)).astype(np.float32)


def _tokens(x):
  """The tokens of ``x [..., V]`` as a list of ``[V]`` float64 vectors."""
  x = np.asarray(x, np.float64)
  return list(x.reshape(-1, x.shape[-1]))


def _softmax(v):
  e = np.exp(v - v.max())
  return e / e.sum()


# --- logit space --------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7, 4), (2, 3, 5), (1, 1, 1, 2)])
def test_token_count_is_the_product_of_the_leading_axes(shape):
  n = 1
  for d in shape[:-1]:
    n *= d
  assert formulas.token_count(jnp.zeros(shape)) == n


def test_center_per_token_subtracts_each_tokens_mean():
  x = _logits()
  got = np.asarray(formulas.center_per_token(jnp.asarray(x))).reshape(-1, 6)
  for g, t in zip(got, _tokens(x)):
    np.testing.assert_allclose(g, t - sum(t) / len(t), atol=1e-5)


@pytest.mark.parametrize("center", [True, False])
def test_logit_change_sq_sum_brute_force(center):
  dz = _logits(seed=1)
  want = 0.0
  for t in _tokens(dz):
    c = t - t.mean() if center else t
    want += sum(v * v for v in c)
  np.testing.assert_allclose(
      float(formulas.logit_change_sq_sum(jnp.asarray(dz), center)), want,
      rtol=1e-5)


def test_fisher_sq_sum_is_twice_the_softmax_quadratic_form():
  z, dz = _logits(seed=2), _logits(seed=3)
  want = 0.0
  for zt, dt in zip(_tokens(z), _tokens(dz)):
    p = _softmax(zt)
    fisher = np.diag(p) - np.outer(p, p)  # the softmax Hessian of KL
    want += 2.0 * dt @ fisher @ dt
  np.testing.assert_allclose(
      float(formulas.fisher_sq_sum(jnp.asarray(z), jnp.asarray(dz))), want,
      rtol=1e-4)


def test_change_sq_sum_dispatches_on_the_metric():
  z, dz = jnp.asarray(_logits(seed=4)), jnp.asarray(_logits(seed=5))
  assert float(formulas.change_sq_sum(dz)) == float(
      formulas.logit_change_sq_sum(dz))
  assert float(formulas.change_sq_sum(dz, center=False)) == float(
      formulas.logit_change_sq_sum(dz, False))
  assert float(formulas.change_sq_sum(dz, z, kl="fisher")) == float(
      formulas.fisher_sq_sum(z, dz))
  with pytest.raises(ValueError, match="needs the logits z"):
    formulas.change_sq_sum(dz, kl="fisher")


def test_per_token_norms_brute_force():
  z, dz = _logits(seed=6), _logits(seed=7)
  tokens = _tokens(dz)
  bound = math.sqrt(sum(((t - t.mean()) ** 2).sum() for t in tokens)
                    / len(tokens))
  fisher = 0.0
  for zt, dt in zip(_tokens(z), tokens):
    p = _softmax(zt)
    fisher += 2.0 * (p * (dt - p @ dt) ** 2).sum()
  fisher = math.sqrt(fisher / len(tokens))
  z, dz = jnp.asarray(z), jnp.asarray(dz)
  np.testing.assert_allclose(float(formulas.per_token_change_norm(dz)), bound,
                             rtol=1e-5)
  np.testing.assert_allclose(float(formulas.per_token_rms_norm(dz)), bound,
                             rtol=1e-5)
  np.testing.assert_allclose(
      float(formulas.per_token_change_norm(dz, z, kl="fisher")), fisher,
      rtol=1e-4)
  np.testing.assert_allclose(float(formulas.fisher_kl(z, dz)),
                             fisher ** 2 / 4, rtol=1e-4)


def test_kl_brute_force():
  z, z_new = _logits(seed=8), _logits(seed=9)
  total = 0.0
  for a, b in zip(_tokens(z), _tokens(z_new)):
    p, q = _softmax(a), _softmax(b)
    total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
  z, z_new = jnp.asarray(z), jnp.asarray(z_new)
  np.testing.assert_allclose(float(formulas.softmax_kl_sum(z, z_new)), total,
                             rtol=1e-4)
  np.testing.assert_allclose(float(formulas.per_token_kl(z, z_new)),
                             total / 12, rtol=1e-4)
  assert float(formulas.softmax_kl_sum(z, z + 3.0)) < 1e-5  # shift-invariant


def test_fisher_kl_is_the_kl_to_second_order():
  z, v = jnp.asarray(_logits(seed=10)), jnp.asarray(_logits(seed=11))
  for h in (1e-1, 1e-2):
    ratio = float(formulas.per_token_kl(z, z + h * v)) / float(
        formulas.fisher_kl(z, h * v))
    assert abs(ratio - 1) < 5 * h


def test_per_token_sums_are_all_reduced_over_replicas():
  devices = jax.local_devices()[:2]
  if len(devices) < 2:
    pytest.skip("needs 2 devices")
  z, dz = _logits((4, 3, 5), seed=12), _logits((4, 3, 5), seed=13)
  shard = lambda x: jnp.asarray(x).reshape(2, 2, 3, 5)

  def per_replica(z, dz):
    return (formulas.per_token_change_norm(dz, z, kl="fisher", axis_name="r"),
            formulas.per_token_kl(z, z + dz, axis_name="r"))
  norm, kl = jax.pmap(per_replica, axis_name="r", devices=devices)(
      shard(z), shard(dz))
  z, dz = jnp.asarray(z), jnp.asarray(dz)
  np.testing.assert_allclose(np.asarray(norm), float(
      formulas.per_token_change_norm(dz, z, kl="fisher")), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(kl), float(
      formulas.per_token_kl(z, z + dz)), rtol=1e-5)


@pytest.mark.parametrize("delta", [1e-4, 0.05, 0.3, 2.0])
def test_trust_radius_and_the_guarded_radius(delta):
  np.testing.assert_allclose(float(formulas.trust_radius(delta)),
                             math.sqrt(4 * delta), rtol=1e-6)
  for g in (1.0, 0.5, 0.01):
    np.testing.assert_allclose(float(formulas.guarded_radius(delta, g)),
                               math.sqrt(4 * delta) * g, rtol=1e-6)
  # The bound it rests on: a centered change of RMS h·τ has KL <= h²·δ (to
  # second order), measured here in float64.
  h = 0.1
  dz = [t - t.mean() for t in _tokens(_logits(seed=14))]
  rms = math.sqrt(sum((t ** 2).sum() for t in dz) / len(dz))
  kl = 0.0
  for zt, dt in zip(_tokens(_logits(seed=15)), dz):
    p, q = _softmax(zt), _softmax(zt + dt * h * math.sqrt(4 * delta) / rms)
    kl += (p * np.log(p / q)).sum() / len(dz)
  assert kl <= h * h * delta


# --- S and c ------------------------------------------------------------------

def test_layer_contributions_and_surrogates_brute_force():
  for _ in range(20):
    L = int(RNG.integers(1, 6))
    beta, norms = RNG.uniform(0, 3, L), RNG.uniform(0, 2, L)
    s = np.asarray(formulas.layer_contributions(beta, norms))
    want = [b * n for b, n in zip(beta, norms)]
    np.testing.assert_allclose(s, want, rtol=1e-6)
    l1 = float(formulas.budget_surrogate(s, "l1"))
    l2 = float(formulas.budget_surrogate(s, "l2"))
    np.testing.assert_allclose(l1, sum(want), rtol=1e-5)
    np.testing.assert_allclose(
        l2, math.sqrt(L) * math.sqrt(sum(v * v for v in want)), rtol=1e-5)
    assert l2 >= l1 * (1 - 1e-6)  # Cauchy–Schwarz: still a bound
  with pytest.raises(ValueError, match="aggregate must be one of"):
    formulas.budget_surrogate(jnp.ones(2), "linf")


def test_clip_scale_brute_force():
  eps = 1e-12
  for s, tau in itertools.product([0.0, 1e-13, 0.3, 1.0, 4.0, 1e6],
                                  [1e-3, 0.5, 1.0, 3.0]):
    c = float(formulas.clip_scale(s, tau, eps))
    np.testing.assert_allclose(c, min(1.0, tau / max(s, eps)), rtol=1e-6)
    assert c * s <= tau * (1 + 1e-6)  # the clipped step is inside the radius
    skip = float(formulas.clip_scale(s, tau, eps, "skip"))
    assert skip == (0.0 if s > tau else 1.0)
  with pytest.raises(ValueError, match="overshoot"):
    formulas.clip_scale(1.0, 1.0, overshoot="clip")


def test_exact_calibration_recovers_the_measured_change():
  eps = 1e-12
  for t, base, prev in [(1.0, 4.0, 0.3), (2.0, 0.5, 1.0), (1.0, 0.0, 0.3),
                        (1.0, 1e-13, 0.7)]:
    k = float(formulas.exact_calibration(t, base, prev, eps))
    np.testing.assert_allclose(k, t / base if base > eps else prev, rtol=1e-6)
    if base > eps:  # between measurements, S = k·S_L1 reproduces ‖J ΔW‖
      np.testing.assert_allclose(
          float(formulas.calibrated_surrogate(k, base)), t, rtol=1e-6)


# --- β ------------------------------------------------------------------------

def test_unit_scale_makes_a_unit_direction():
  u = RNG.normal(size=17).astype(np.float32)
  norm = float(np.linalg.norm(u))
  np.testing.assert_allclose(
      np.linalg.norm(u * float(formulas.unit_scale(jnp.float32(norm)))), 1.0,
      rtol=1e-6)
  zero = formulas.unit_scale(jnp.zeros(3))
  assert np.all(np.isfinite(zero)) and np.all(np.asarray(zero) * 0.0 == 0.0)


def test_fd_epsilon_brute_force():
  for sq, size, h in [(400.0, 100, 1e-2), (0.0, 5, 1e-2), (3.0, 7, 1e-3)]:
    want = h * max(math.sqrt(sq / size), formulas.FD_RMS_FLOOR)
    np.testing.assert_allclose(float(formulas.fd_epsilon(sq, size, h)), want,
                               rtol=1e-6)


def test_central_difference_is_exact_on_a_quadratic():
  w, u, eps = 0.7, 1.3, 0.1
  f = lambda x: 2.0 * x * x - 3.0 * x + 1.0
  z, dz = formulas.central_difference(f(w + eps * u), f(w - eps * u), eps)
  np.testing.assert_allclose(float(dz), (4.0 * w - 3.0) * u, rtol=1e-9)
  np.testing.assert_allclose(float(z), f(w) + 2.0 * (eps * u) ** 2, rtol=1e-9)


def test_beta_estimate_is_the_per_token_rms():
  dz = _logits(seed=16)
  sq = float(formulas.change_sq_sum(jnp.asarray(dz)))
  n = formulas.token_count(dz)
  want = math.sqrt(sum(((t - t.mean()) ** 2).sum() for t in _tokens(dz)) / n)
  np.testing.assert_allclose(float(formulas.beta_estimate(sq, float(n))), want,
                             rtol=1e-5)


def _robust_ema_reference(old, new, measured, decay, huber):
  if not measured or decay == 0:
    return new
  if old > 0:
    new = min(max(new, old / huber), old * huber)
  return decay * old + (1 - decay) * new


def test_robust_ema_brute_force():
  for old, new, measured, decay, huber in itertools.product(
      [0.0, 0.5, 2.0], [0.0, 0.1, 1.0, 50.0], [False, True], [0.0, 0.9],
      [1.0, 4.0]):
    got = float(formulas.robust_ema(jnp.float32(old), jnp.float32(new),
                                    measured, decay, huber))
    np.testing.assert_allclose(
        got, _robust_ema_reference(old, new, measured, decay, huber),
        rtol=1e-6, atol=1e-7)


# --- the probe and the guard --------------------------------------------------

def test_probe_clip_scale_and_promised_change_brute_force():
  eps = 1e-12
  for c, s, tau in itertools.product([0.0, 0.25, 1.0], [0.0, 0.5, 8.0],
                                     [1.0, 2.0]):
    probe = float(formulas.probe_clip_scale(c, s, tau, eps))
    np.testing.assert_allclose(probe, c if c > 0 else min(1, tau / max(s, eps)),
                               rtol=1e-6)
    promised = float(formulas.promised_change(c, s, eps))
    assert promised == (c * s if c * s > eps else 0.0)


def test_guard_ratio_and_factors_brute_force():
  eps = 1e-12
  for t, c, s in itertools.product([0.0, 0.5, 3.0], [0.0, 0.5, 1.0],
                                   [0.0, 1.0, 4.0]):
    rho = float(formulas.guard_ratio(t, c, s, eps))
    if c * s > eps:
      np.testing.assert_allclose(rho, t / (c * s), rtol=1e-6)
    else:
      assert math.isnan(rho)
    g = float(formulas.guard_factor(rho))
    assert g == (1.0 if math.isnan(rho) or rho <= 1 else np.float32(1 / rho))
    for old in (1.0, 0.25):
      got = float(formulas.next_guard_factor(jnp.float32(rho),
                                             jnp.float32(old)))
      assert got == (old if math.isnan(rho) else g)


def test_quadratic_loss_change_is_exact_for_a_quadratic_loss():
  n = 6
  a = RNG.normal(size=(n, n))
  a = a @ a.T
  b = RNG.normal(size=n)
  loss = lambda z: 0.5 * z @ a @ z + b @ z
  z, dz = RNG.normal(size=n), RNG.normal(size=n)
  grad = a @ z + b
  hvp = a @ dz
  np.testing.assert_allclose(
      float(formulas.quadratic_loss_change(grad, hvp, dz)),
      loss(z + dz) - loss(z), rtol=1e-5)


# --- controllers --------------------------------------------------------------

def test_pi_log_error_brute_force():
  tiny = float(np.finfo(np.float32).tiny)
  for target, kl, cap in [(0.05, 0.1, 5.0), (0.05, 0.0, math.log(10)),
                          (0.1, 1e-8, 3.0), (0.1, 0.1, 1.0)]:
    want = math.log(target) - math.log(max(kl, tiny))
    np.testing.assert_allclose(float(formulas.pi_log_error(target, kl, cap)),
                               min(max(want, -cap), cap), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("interval,half_life", [(20, 250.0), (1, 10.0),
                                                (7, 3.5)])
def test_half_life_decay_halves_over_a_half_life(interval, half_life):
  a = formulas.half_life_decay(interval, half_life)
  np.testing.assert_allclose(a ** (half_life / interval), 0.5, rtol=1e-9)


def test_pi_step_brute_force():
  ld, ema = 0.0, 0.0
  for e in (1.0, -0.5, 2.0, 0.1):
    got_ld, got_ema = formulas.pi_step(
        jnp.float32(ld), jnp.float32(e), jnp.float32(ema), kp=0.15, ki=0.02,
        ema_decay=jnp.float32(0.9), log_delta_min=-1.0, log_delta_max=0.2)
    ema = 0.9 * ema + 0.1 * e
    ld = min(max(ld + 0.15 * e + 0.02 * ema, -1.0), 0.2)
    np.testing.assert_allclose(float(got_ema), ema, rtol=1e-5)
    np.testing.assert_allclose(float(got_ld), ld, rtol=1e-5, atol=1e-6)


def test_pi_anti_windup_brute_force():
  for delta, c, err in itertools.product([0.005, 0.05, 0.5], [0.5, 1.0],
                                         [-1.0, 0.0, 1.0]):
    log_delta, old_ema, new_ema = -2.0, 0.1, 0.3
    got_delta, got_ema = formulas.pi_anti_windup(
        delta, log_delta, old_ema, new_ema, err, c, 0.01, 0.3)
    frozen = c >= 1 and err > 0
    want = min(max(delta, 0.01), 0.3) if frozen else math.exp(log_delta)
    np.testing.assert_allclose(float(got_delta), want, rtol=1e-6)
    np.testing.assert_allclose(float(got_ema), old_ema if frozen else new_ema,
                               rtol=1e-6)


def test_surrogate_kl_inverts_the_trust_radius():
  for s in (0.0, 0.3, 2.0, 1e3):
    k = float(formulas.surrogate_kl(s))
    np.testing.assert_allclose(k, s * s / 4, rtol=1e-6)
    np.testing.assert_allclose(float(formulas.trust_radius(k)), s, rtol=1e-6)


def _median(v):
  v = sorted(v)
  n = len(v)
  return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def test_robust_trend_brute_force():
  for seed in range(5):
    rng = np.random.default_rng(seed)
    t = rng.permutation(12)[:7].astype(float)
    y = 0.3 * t + rng.normal(size=7)
    at = 15.0
    slopes = [(y[j] - y[i]) / (t[j] - t[i])
              for i in range(7) for j in range(i + 1, 7)]
    b = _median(slopes)
    res = [yi - b * (ti - at) for ti, yi in zip(t, y)]
    spread = 1.4826 * _median([abs(r - _median(res)) for r in res])
    clamped = min(max(b, 0.0), formulas.MAX_LOG_GROWTH)
    value = _median([yi - clamped * (ti - at) for ti, yi in zip(t, y)])
    got = formulas.robust_trend(jnp.asarray(t), jnp.asarray(y), at)
    np.testing.assert_allclose([float(x) for x in got], [value, spread],
                               rtol=1e-4, atol=1e-5)


def test_level_entry_and_window_level_brute_force():
  for value, threshold in [(5.0, 2.0), (1.0, 2.0)]:
    assert float(formulas.level_entry(value, threshold)) == min(value,
                                                                threshold)
    assert formulas.level_entry(value, threshold, False) == value
  buf = RNG.normal(size=8).astype(np.float32)
  for count in range(1, 12):
    np.testing.assert_allclose(
        float(formulas.window_level(jnp.asarray(buf), count)),
        _median(list(buf[:min(count, 8)])), rtol=1e-6)
  assert math.isnan(float(formulas.window_level(jnp.asarray(buf), 0)))


def test_relative_threshold_and_delta_brute_force():
  for trend, spread, level in itertools.product([-3.0, 1.0], [0.0, 0.5],
                                                [-1.0, 2.0]):
    want = max(trend, level) + max(math.log(4.0), 4.0 * spread)
    got = float(formulas.relative_threshold(trend, spread, level, 4.0, 4.0))
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(
        float(formulas.threshold_delta(jnp.float32(got))), math.exp(want),
        rtol=1e-5)
  assert float(formulas.threshold_delta(jnp.float32(formulas.LOG_UNSET))) == (
      np.float32(formulas.UNSET_DELTA))


def test_trust_region_ratio_and_step_brute_force():
  kw = dict(shrink_below=0.25, grow_above=0.75, shrink_factor=0.5,
            grow_factor=1.5, delta_min=1e-3, delta_max=0.5)
  for actual, pred, c in itertools.product(
      [-1.0, -0.1, 0.2, float("nan")], [-1.0, 0.0, 0.5], [0.5, 1.0]):
    ok = math.isfinite(actual) and pred < 0
    rho = min(max(actual / pred, -10.0), 10.0) if ok else -10.0
    got = float(formulas.trust_region_ratio(actual, pred))
    np.testing.assert_allclose(got, rho, rtol=1e-6)
    rose = not (math.isfinite(actual) and actual <= 0)
    shrunk = rho < 0.25 or rose
    grown = not shrunk and rho > 0.75 and c < 0.999
    factor = 0.5 if shrunk else 1.5 if grown else 1.0
    new, s, g = formulas.trust_region_step(0.1, jnp.float32(got), actual, c,
                                           **kw)
    np.testing.assert_allclose(float(new), min(max(0.1 * factor, 1e-3), 0.5),
                               rtol=1e-6)
    assert (bool(s), bool(g)) == (shrunk, grown)


# --- the energy budget --------------------------------------------------------

def test_activation_norm_brute_force():
  x = _logits((2, 3, 4), seed=17)
  tokens = _tokens(x)
  want = math.sqrt(sum((t ** 2).sum() for t in tokens) / len(tokens))
  np.testing.assert_allclose(float(formulas.activation_norm(jnp.asarray(x))),
                             want, rtol=1e-5)
  assert float(formulas.activation_norm(-3.0)) == 3.0


def test_energy_ratio_and_scale_brute_force():
  for g, a, r in itertools.product([0.0, 0.5, 2.0, float("inf")],
                                   [0.0, -1.0, 10.0, float("inf")], [0.1]):
    valid = math.isfinite(a) and a > 0
    ratio = float(formulas.energy_ratio(g, a))
    if valid:
      np.testing.assert_allclose(ratio, g / a, rtol=1e-6)
    else:
      assert ratio == math.inf
    scale = float(formulas.energy_scale(g, a, r))
    if valid and math.isfinite(g):
      np.testing.assert_allclose(scale, 1.0 if g == 0 else min(1.0, r * a / g),
                                 rtol=1e-6)
    else:
      assert scale == 0.0


# --- the module's contract ----------------------------------------------------

def _public_functions():
  return {name: fn for name, fn in vars(formulas).items()
          if inspect.isfunction(fn) and fn.__module__ == formulas.__name__
          and not name.startswith("_")}


def _code_lines(fn):
  """Lines of code of ``fn``'s body: no docstring, blank or comment lines."""
  tree = ast.parse(inspect.cleandoc("\n" + inspect.getsource(fn)))
  body = tree.body[0].body
  if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
    body = body[1:]
  lines = inspect.getsource(fn).splitlines()
  first = body[0].lineno - 1
  return [line for line in lines[first:]
          if line.strip() and not line.strip().startswith("#")]


def _formula_map():
  """``{function: [used in, ...]}`` from the module docstring's table."""
  doc = formulas.__doc__
  table = doc[doc.index(".. rubric:: Formula map"):]
  border = re.search(r"^(=+) (=+) (=+)$", table, re.M)
  w1, w2 = len(border.group(1)), len(border.group(2))
  rows = table[border.end():].strip("\n").splitlines()[2:-1]  # header, border
  out, current = {}, None
  for row in rows:
    fn = row[w1 + 1:w1 + 1 + w2].strip()
    if fn:
      current = fn
    out.setdefault(current, []).append(row[w1 + w2 + 2:].strip(" ,"))
  return out


def test_every_formula_is_small_and_has_an_example():
  for name, fn in _public_functions().items():
    assert len(_code_lines(fn)) <= 15, name
    assert ">>>" in (fn.__doc__ or ""), f"{name} has no docstring example"


def test_the_formula_map_lists_every_formula_and_only_those():
  table = _formula_map()
  assert set(table) == set(_public_functions())
  for name, places in table.items():
    for place in places:
      if place.startswith("public API"):
        continue
      module, func = re.fullmatch(r"``([\w.]+)\.(\w+)``", place).groups()
      user = getattr(__import__(f"ebc_optax.{module}", fromlist=["_"]), func)
      assert re.search(rf"\b{name}\(", inspect.getsource(user)), (
          f"{name} is not used in {module}.{func}")
