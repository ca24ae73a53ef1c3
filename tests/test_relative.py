"""``relative_radius``: δ a multiple of the median predicted KL of the last
steps — ordinary steps pass, bursts are cut, sustained growth is followed."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ebc_optax
from ebc_optax import formulas
from conftest import random_like, tiny_logits_fn


def _deltas(surrogates, multiple=4.0, window=8, trend=12, z=4.0):
  """Drives the controller with given S values; returns δ after each step."""
  ctrl = ebc_optax.controllers.relative_radius(multiple=multiple, window=window,
                                   trend=trend, z=z)
  state, delta = ctrl.init(jnp.float32(0.05))
  out = []
  for s in surrogates:
    m = ebc_optax.controllers.ProbeMeasurement(
        applied_kl=0.0, applied_change=0.0, clip_scale=1.0, surrogate=s,
        guard_ratio=float("nan"), interval=1)
    state, delta = ctrl.update(state, m, delta, jnp.float32(0.05))
    out.append(float(delta))
  return np.asarray(out), state


def _reference(surrogates, multiple=4.0, window=8, trend=12, z=4.0):
  """The rule in float64 numpy, written from the docstring: ``(δ after each
  step, whether each step was an outlier)``."""
  trend = min(trend, window)
  level, accepted, deltas, outliers = [], [], [], []
  delta, clock = 1e30, 0
  for s in surrogates:
    k = np.log(s * s / 4)
    outlier = k > np.log(delta)
    level = (level + [min(k, np.log(delta))])[-window:]
    if not outlier:
      accepted = (accepted + [(clock, k)])[-trend:]
    clock += 1
    t = np.array([a for a, _ in accepted], np.float64) - clock
    y = np.array([b for _, b in accepted])
    pairs = [(y[j] - y[i]) / (t[j] - t[i])
             for i in range(len(t)) for j in range(i + 1, len(t))]
    slope = np.median(pairs)
    residual = y - slope * t
    spread = 1.4826 * np.median(np.abs(residual - np.median(residual)))
    value = np.median(y - np.clip(slope, 0, 2 * np.log(1.5)) * t)
    log_delta = max(value, np.median(level)) + max(np.log(multiple), z * spread)
    delta = np.exp(log_delta) if clock >= window else 1e30
    deltas.append(delta)
    outliers.append(outlier)
  return np.asarray(deltas), np.asarray(outliers)


def test_threshold_against_a_brute_force_of_the_rule():
  rng = np.random.default_rng(0)
  s = rng.lognormal(0.0, 0.5, size=70) * np.exp(0.03 * np.arange(70))
  s[40:44] *= 30.0  # outliers: they enter the level at δ, never the trend
  s[55] *= 0.01
  deltas, _ = _deltas(s, window=16, trend=10)
  want, outliers = _reference(s, window=16, trend=10)
  np.testing.assert_allclose(deltas, want, rtol=2e-4)
  assert outliers[40:44].all() and outliers.sum() == 4
  assert (deltas[:15] >= 1e29).all()  # the window is filling: no clipping


def test_robust_trend_against_a_brute_force():
  rng = np.random.default_rng(3)
  t = np.sort(rng.choice(100, size=9, replace=False))
  y = 0.2 * t + rng.normal(0, 0.3, size=9)
  value, spread = formulas.robust_trend(jnp.asarray(t), jnp.asarray(y),
                                         jnp.int32(100))
  slope = np.median([(y[j] - y[i]) / (t[j] - t[i])
                     for i in range(9) for j in range(i + 1, 9)])
  carried = y + slope * (100 - t)
  np.testing.assert_allclose(float(value), np.median(carried), rtol=1e-4)
  np.testing.assert_allclose(
      float(spread), 1.4826 * np.median(np.abs(carried - np.median(carried))),
      rtol=1e-3)
  # A decay is not extrapolated; its scatter is measured around its own line.
  value, spread = formulas.robust_trend(jnp.asarray(t), jnp.asarray(-y),
                                         jnp.int32(100))
  np.testing.assert_allclose(float(value), np.median(-y), rtol=1e-4)
  np.testing.assert_allclose(
      float(spread), 1.4826 * np.median(np.abs(carried - np.median(carried))),
      rtol=1e-3)


def test_zero_updates_do_not_enter_the_window():
  deltas, state = _deltas([1.0] * 8 + [0.0] * 5, window=8)
  assert int(state.median_steps) == 8
  np.testing.assert_allclose(deltas[-1], 4.0 * 0.25, rtol=1e-5)


def test_a_burst_shorter_than_half_the_window_is_cut_and_growth_is_followed():
  rng = np.random.default_rng(1)
  typical = rng.lognormal(0.0, 0.2, size=120)
  burst = typical.copy()
  burst[60:75] *= 30.0  # 15 steps of a 32-window: all cut
  deltas, _ = _deltas(burst, window=32)
  passed = burst[1:] ** 2 / 4 <= deltas[:-1]  # δ used at step t is δ_{t-1}
  assert not passed[59:74].any()
  assert passed[31:59].all() and passed[75:].all()
  # Prodigy's start-up: ×600 in 40 steps (×1.17 per step), from a filled
  # window on — a trend, followed with no refusal.
  growing = np.exp(np.log(600) / 40 * np.clip(np.arange(300) - 40, 0, 40))
  deltas, _ = _deltas(growing, window=32)
  assert (growing[32:] ** 2 / 4 <= deltas[31:-1]).all()


def test_ordinary_steps_pass_and_an_outlier_is_cut(tiny):
  _, params, batch, _ = tiny
  tx = ebc_optax.ellipsotope_budget_clip(
      tiny_logits_fn, controller=ebc_optax.controllers.relative_radius(window=8),
      overshoot="scale", aggregate="exact", kl="fisher", probe_every=0,
      probe_batch_size=None)
  state = tx.init(params)
  update = jax.jit(tx.update)
  base = random_like(jax.random.PRNGKey(3), params, 0.01)
  cs = []
  for t in range(20):
    scale = 50.0 if t == 15 else 1.0 + 0.1 * np.sin(t)  # one step 50× larger
    _, state = update(jax.tree.map(lambda u: scale * u, base), state, params,
                      batch=batch)
    stats = ebc_optax.telemetry(state)
    cs.append(float(stats["c"]))
    if t == 15:
      # Cut back to twice the typical size (multiple 4 in KL): c·S = sqrt(4δ).
      np.testing.assert_allclose(float(stats["c"]) * float(stats["S"]),
                                 float(stats["tau"]), rtol=1e-5)
      np.testing.assert_allclose(float(stats["c"]) * 50, 2.0, rtol=0.15)
  assert all(c == 1.0 for i, c in enumerate(cs) if i != 15)
  assert cs[15] < 0.05


def test_bad_arguments_raise_naming_them():
  with pytest.raises(ValueError, match="multiple"):
    ebc_optax.controllers.relative_radius(multiple=1.0)
  with pytest.raises(ValueError, match="window"):
    ebc_optax.controllers.relative_radius(window=3)
  with pytest.raises(ValueError, match="trend"):
    ebc_optax.controllers.relative_radius(trend=2)
  with pytest.raises(ValueError, match="z"):
    ebc_optax.controllers.relative_radius(z=-1.0)


def _skip_deltas(surrogates, multiple=4.0, window=8):
  """As ``_deltas``, with the clip refusing (c = 0) every step with K > δ."""
  ctrl = ebc_optax.controllers.relative_radius(multiple=multiple, window=window)
  state, delta = ctrl.init(jnp.float32(0.05))
  out, refused = [], []
  for s in surrogates:
    refuse = 0.25 * s * s > float(delta)
    m = ebc_optax.controllers.ProbeMeasurement(
        applied_kl=0.0, applied_change=0.0, clip_scale=0.0 if refuse else 1.0,
        surrogate=s, guard_ratio=float("nan"), interval=1)
    state, delta = ctrl.update(state, m, delta, jnp.float32(0.05))
    out.append(float(delta))
    refused.append(refuse)
  return np.asarray(out), np.asarray(refused)


def test_refusing_never_stalls_a_lasting_change():
  # The step size jumps ×10 for good: refused at first, then the level climbs
  # (×4 in KL per half window at least) until the new size passes.
  s = np.concatenate([np.ones(40), 10.0 * np.ones(200)])
  _, refused = _skip_deltas(s, window=16)
  assert refused[40] and not refused[120:].any()
  assert refused[40:].sum() < 60


def test_overshoot_skip_refuses_the_outlier_step_whole(tiny):
  _, params, batch, _ = tiny
  # The default: the relative radius, refusing what is beyond it.
  tx = ebc_optax.wrap(optax.sgd(1.0), tiny_logits_fn,
                      controller=ebc_optax.controllers.relative_radius(window=8),
                      probe_batch_size=None)
  state = tx.init(params)
  update = jax.jit(tx.update)
  base = random_like(jax.random.PRNGKey(4), params, 0.01)
  for t in range(20):
    scale = 50.0 if t == 15 else 1.0 + 0.1 * np.sin(t)
    updates, state = update(jax.tree.map(lambda u: -scale * u, base), state,
                            params, batch=batch)
    stats = ebc_optax.telemetry(state)
    if t == 15:
      assert float(stats["c"]) == 0.0 and float(stats["S"]) > float(stats["tau"])
      assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
    else:
      assert float(stats["c"]) == 1.0
  assert int(stats["clipped_steps"]) == 1


def test_overshoot_skip_needs_a_relative_radius():
  for controller in ("pi", None, "trust_region"):
    with pytest.raises(ValueError, match="overshoot='skip'.*relative"):
      ebc_optax.ellipsotope_budget_clip(
          tiny_logits_fn, controller=controller, overshoot="skip",
          loss_fn=lambda logits, batch: jnp.mean(logits))
  with pytest.raises(ValueError, match="overshoot"):
    ebc_optax.ellipsotope_budget_clip(tiny_logits_fn, overshoot="drop")
  cfg = ebc_optax.EBCConfig.from_mapping({"ebc_overshoot": "skip"})
  assert cfg.overshoot == "skip" and cfg.controller == "relative"


def test_default_overshoot_is_skip_with_the_relative_radius_only(tiny):
  _, params, batch, _ = tiny
  big = random_like(jax.random.PRNGKey(5), params, 10.0)

  def c_of(**kw):
    tx = ebc_optax.ellipsotope_budget_clip(tiny_logits_fn, target_kl=1e-6,
                                           probe_every=0, **{"controller": "pi", **kw})
    _, state = tx.update(big, tx.init(params), params, batch=batch)
    return float(ebc_optax.telemetry(state)["c"])

  assert 0.0 < c_of(controller=None) < 1.0    # a fixed δ: cut back
  assert 0.0 < c_of(controller="pi") < 1.0
  assert c_of(controller=None, overshoot="scale") == c_of(controller=None)
  assert ebc_optax.EBCConfig().overshoot is None
  assert ebc_optax.EBCConfig().controller == "relative"
