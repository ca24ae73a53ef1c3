"""The peer spike guards against transcriptions of their reference code."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ebc_optax.experiments import guards


def _run(tx, grads_seq, params, **extra_seq):
  state = tx.init(params)
  outs, states = [], []
  for i, g in enumerate(grads_seq):
    extra = {k: v[i] for k, v in extra_seq.items()}
    u, state = tx.update(g, state, params, **extra)
    outs.append(u)
    states.append(state)
  return outs, states


# --- skip_step ---------------------------------------------------------------

def test_window_stats_matches_numpy():
  h = jnp.array([3.0, 1.0, 4.0, 1.0, 5.0, 0.0, 0.0])
  m, s = guards.window_stats(h, jnp.int32(5))
  np.testing.assert_allclose([m, s], [np.mean(h[:5]), np.std(h[:5])], rtol=1e-6)


def test_skip_step_hand_worked():
  """History 1, 2, 3: mean 2, σ = √(2/3); with σ-factor 2 the limit is
  3.633: a loss of 3.7 is skipped (Adam's moments kept, its count
  advances); the skipped value enters the window only when kept."""
  params = {"w": jnp.zeros(2)}
  g = {"w": jnp.ones(2)}
  for keep_skipped in (True, False):
    tx = guards.skip_step(optax.adam(0.1), sigma=2.0, window=8, min_history=3,
                          keep_skipped=keep_skipped)
    outs, states = _run(tx, [g] * 5, params,
                        loss=[1.0, 2.0, 3.0, 3.7, 3.6])
    # 3.6 after a kept 3.7: limit 2.425 + 2·1.06 = 4.55, passes; after a
    # left-out 3.7 the limit is still 3.633: passes too.
    assert [int(s.decision) for s in states] == [0, 0, 0, 2, 0]
    assert float(jnp.abs(outs[2]["w"]).sum()) > 0
    assert float(jnp.abs(outs[3]["w"]).sum()) == 0
    adam_before, adam_after = states[2].inner_state[0], states[3].inner_state[0]
    np.testing.assert_array_equal(adam_after.mu["w"], adam_before.mu["w"])
    assert int(adam_after.count) == int(adam_before.count) + 1
    assert int(states[3].filled) == (4 if keep_skipped else 3)
    assert int(states[4].total_skipped) == 1


def test_skip_step_state_absorbs_when_asked():
  params = {"w": jnp.zeros(2)}
  g = {"w": jnp.ones(2)}
  tx = guards.skip_step(optax.adam(0.1), sigma=2.0, window=8, min_history=3,
                        keep_state=False)
  outs, states = _run(tx, [g] * 4, params, loss=[1.0, 2.0, 3.0, 9.0])
  assert int(states[3].decision) == guards.SKIPPED
  assert float(jnp.abs(outs[3]["w"]).sum()) == 0
  # Adam took the gradient into its first moment all the same.
  assert not np.array_equal(states[3].inner_state[0].mu["w"],
                            states[2].inner_state[0].mu["w"])


def test_skip_step_against_a_transcription_of_levanter():
  """Random losses and gradients with spikes: the decisions equal a plain
  Python loop over the rule (one-sided, population σ, 64 of 128)."""
  rng = np.random.default_rng(0)
  n = 300
  losses = 2 + 0.05 * rng.standard_normal(n)
  scales = 1 + 0.1 * rng.standard_normal(n)
  spikes = rng.choice(np.arange(70, n), 12, replace=False)
  losses[spikes[:6]] += 3
  scales[spikes[6:]] *= 20
  params = {"w": jnp.zeros(3)}
  grads = [{"w": jnp.full(3, s, jnp.float32)} for s in scales]
  for keep_skipped in (True, False):
    tx = guards.skip_step(optax.sgd(0.1), keep_skipped=keep_skipped)
    _, states = _run(tx, grads, params, loss=list(losses))
    hist_l, hist_g, expect = [], [], []
    for loss, s in zip(losses, scales):
      norm = abs(s) * math.sqrt(3)
      skip = False
      if len(hist_l) >= 64:
        lw, gw = np.array(hist_l[-128:]), np.array(hist_g[-128:])
        skip = (loss > lw.mean() + 6 * max(lw.std(), 1e-6)
                or norm > gw.mean() + 6 * max(gw.std(), 1e-6))
      expect.append(2 if skip else 0)
      if keep_skipped or not skip:
        hist_l.append(loss)
        hist_g.append(norm)
    assert [int(s.decision) for s in states] == expect
    assert sum(e == 2 for e in expect) >= 6


def test_skip_step_skips_non_finite_and_needs_the_loss():
  params = {"w": jnp.zeros(2)}
  tx = guards.skip_step(optax.adam(0.1))
  state = tx.init(params)
  u, s2 = tx.update({"w": jnp.array([jnp.nan, 1.0])}, state, params, loss=1.0)
  assert int(s2.decision) == guards.SKIPPED
  assert np.all(np.asarray(u["w"]) == 0)
  assert np.all(np.isfinite(np.asarray(s2.inner_state[0].mu["w"])))
  with pytest.raises(ValueError, match="loss="):
    tx.update({"w": jnp.ones(2)}, state, params)


# --- ZClip -------------------------------------------------------------------

class _ZClipReference:
  """ZClip's zscore / adaptive_scaling rule, transcribed from its code."""

  def __init__(self, alpha=0.97, z_thresh=2.5, eps=1e-6, warmup=25):
    self.alpha, self.z, self.eps, self.warmup = alpha, z_thresh, eps, warmup
    self.buffer, self.mean, self.var = [], None, None

  def step(self, norm):
    if self.mean is None:
      self.buffer.append(norm)
      if len(self.buffer) >= self.warmup:
        self.mean = sum(self.buffer) / len(self.buffer)
        self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
      return norm
    std = self.var ** 0.5
    z = (norm - self.mean) / (std + self.eps)
    clip = None
    if z > self.z:
      clip = self.mean + (self.z * std) / (z / self.z)
    out = clip if clip is not None and norm > clip else norm
    new = clip if clip is not None else norm
    self.mean = self.alpha * self.mean + (1 - self.alpha) * new
    self.var = self.alpha * self.var + (1 - self.alpha) * (new - self.mean) ** 2
    return out


def test_zclip_hand_worked():
  """Warm-up norms 1, 2, 3 (mean 2, var 2/3); then ‖g‖ = 10 has z = 9.80
  and is scaled to 2 + 2.5·0.8165/3.919 = 2.5208."""
  tx = guards.zclip(warmup=3)
  norms = [1.0, 2.0, 3.0, 10.0]
  grads = [{"w": jnp.array([n, 0.0])} for n in norms]
  outs, states = _run(tx, grads, {"w": jnp.zeros(2)})
  assert float(outs[2]["w"][0]) == 3.0
  np.testing.assert_allclose(float(outs[3]["w"][0]), 2.52083, rtol=1e-4)
  assert int(states[3].decision) == guards.CLIPPED
  np.testing.assert_allclose(float(states[3].mean), 0.97 * 2 + 0.03 * 2.52083,
                             rtol=1e-5)


def test_zclip_against_its_reference_on_a_spiky_sequence():
  rng = np.random.default_rng(1)
  norms = np.abs(1 + 0.2 * rng.standard_normal(200))
  norms[[40, 41, 90, 150]] *= [30, 8, 50, 4]
  ref = _ZClipReference()
  expect = [ref.step(float(n)) for n in norms]
  grads = [{"w": jnp.array([n], jnp.float32)} for n in norms]
  outs, _ = _run(guards.zclip(), grads, {"w": jnp.zeros(1)})
  got = [float(o["w"][0]) for o in outs]
  np.testing.assert_allclose(got, expect, rtol=2e-4)
  assert sum(g < n * 0.999 for g, n in zip(got, norms)) >= 4


# --- SPAM --------------------------------------------------------------------

def _spam_reference(grads, lr, b1, b2, eps, threshold, reset_every, warmup,
                    clip_after):
  """SPAM's step loop (density 1) in numpy, transcribed from its code."""
  m = np.zeros_like(grads[0])
  v = np.zeros_like(grads[0])
  current = warmup + 1
  out = []
  for t, g in enumerate(grads):
    g = g.copy()
    if current >= warmup:
      scale = 1.0
    else:
      scale = 1 - 0.99 * (1 + math.cos(math.pi * (current + 1) / (warmup + 1))) / 2
    step = t + 1
    if (t + 1) % reset_every == 0:
      m[:] = 0
      v[:] = 0
    if step >= clip_after and step % reset_every >= clip_after:
      mask = g ** 2 > threshold * v
      g[mask] = np.sign(g[mask]) * np.sqrt(v[mask] * threshold)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    size = lr * math.sqrt(1 - b2 ** step) / (1 - b1 ** step)
    out.append(-size * scale * m / (np.sqrt(v) + eps))
    current += 1
    if (t + 1) % reset_every == reset_every - 1:
      current = 0
  return out


def test_spam_ramp_values():
  assert float(guards.spam_ramp(jnp.int32(0), 150)) == pytest.approx(0.0101, abs=1e-4)
  assert float(guards.spam_ramp(jnp.int32(150), 150)) == 1.0


def test_spam_against_its_reference_through_two_resets():
  rng = np.random.default_rng(2)
  grads = [rng.standard_normal(5).astype(np.float32) for _ in range(45)]
  grads[25][1] = 400.0  # a spike after the first clip-free stretch
  kw = dict(b1=0.9, b2=0.999, eps=1e-6, threshold=50.0, reset_every=20,
            warmup=6, clip_after=3)
  expect = _spam_reference(grads, 0.01, **kw)
  outs, states = _run(guards.spam(0.01, **kw),
                      [{"w": jnp.asarray(g)} for g in grads],
                      {"w": jnp.zeros(5, jnp.float32)})
  for t, (o, e) in enumerate(zip(outs, expect)):
    np.testing.assert_allclose(np.asarray(o["w"]), e, rtol=2e-4, atol=1e-7,
                               err_msg=f"step {t}")
  assert int(states[25].decision) == guards.CLIPPED


# --- StableAdamW -------------------------------------------------------------

def test_stable_adamw_is_adam_when_no_tensor_exceeds_rms_one():
  rng = np.random.default_rng(3)
  grads = [{"w": jnp.asarray(0.1 * rng.standard_normal(4), jnp.float32)}
           for _ in range(3)]
  params = {"w": jnp.zeros(4)}
  ours, states = _run(guards.stable_adamw(0.01), grads, params)
  adam, _ = _run(optax.adam(0.01), grads, params)
  # Step 1: g²/v̂ = 1 exactly, RMS 1: no clipping; Adam's update.
  np.testing.assert_allclose(ours[0]["w"], adam[0]["w"], rtol=1e-5)
  assert int(states[0].decision) == guards.PASSED


def test_stable_adamw_divides_a_spiking_tensor_by_its_rms():
  params = {"a": jnp.zeros(3), "b": jnp.zeros(3)}
  calm = {"a": jnp.full(3, 0.1), "b": jnp.full(3, 0.1)}
  spike = {"a": jnp.full(3, 10.0), "b": jnp.full(3, 0.1)}
  ours, states = _run(guards.stable_adamw(1.0), [calm] * 20 + [spike], params)
  # Reference for tensor "a" at the spike step.
  m = v = 0.0
  b1, b2, eps = 0.9, 0.999, 1e-8
  for g in [0.1] * 20 + [10.0]:
    m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
  t = 21
  mh, vh = m / (1 - b1 ** t), v / (1 - b2 ** t)
  rms = math.sqrt(10.0 ** 2 / vh)
  assert rms > 1
  np.testing.assert_allclose(float(ours[-1]["a"][0]),
                             -mh / (math.sqrt(vh) + eps) / rms, rtol=1e-4)
  assert int(states[-1].decision) == guards.CLIPPED


# --- Levanter's update clip ---------------------------------------------------

def test_clip_update_by_historical_norm_against_a_transcription():
  rng = np.random.default_rng(4)
  norms = np.abs(1 + 0.1 * rng.standard_normal(160))
  norms[[70, 71, 120]] *= [10, 3, 6]
  tx = guards.clip_update_by_historical_norm()
  outs, states = _run(tx, [{"w": jnp.array([n], jnp.float32)} for n in norms],
                      {"w": jnp.zeros(1)})
  hist, expect = [], []
  for n in norms:
    limit = math.inf
    if len(hist) >= 64:
      w = np.array(hist[-128:])
      limit = w.mean() + 3 * max(w.std(), 1e-6)
    expect.append(min(n, limit))
    hist.append(n)  # the unclipped norm
  np.testing.assert_allclose([float(o["w"][0]) for o in outs], expect, rtol=1e-5)
  assert int(states[70].decision) == guards.CLIPPED


# --- decisions ---------------------------------------------------------------

def test_decision_reads_every_guard_in_a_chain():
  params = {"w": jnp.zeros(2)}
  tx = optax.chain(guards.recording(optax.clip_by_global_norm(1.0)),
                   optax.adam(0.1), guards.clip_update_by_historical_norm())
  state = tx.init(params)
  assert int(guards.decision(optax.adam(0.1).init(params))) == guards.PASSED
  _, state = tx.update({"w": jnp.array([0.1, 0.1])}, state, params)
  assert int(guards.decision(state)) == guards.PASSED
  _, state = tx.update({"w": jnp.array([3.0, 4.0])}, state, params)
  assert int(guards.decision(state)) == guards.CLIPPED
  jax.jit(tx.update)({"w": jnp.ones(2)}, state, params)  # jittable


def test_decision_reads_ebc_wrap_refusals():
  """EBC's default refuses a step 10⁴× larger than its recent ones: 2."""
  import ebc_optax
  w = jnp.ones((4, 3)) * 0.1
  x = jnp.ones((8, 4))
  tx = ebc_optax.wrap(optax.sgd(1.0), lambda p, b: b @ p)
  state = tx.init(w)
  update = jax.jit(tx.update)
  key = jax.random.PRNGKey(0)
  decisions = []
  for i in range(80):
    g = 1e-3 * jax.random.normal(jax.random.fold_in(key, i), w.shape)
    if i == 79:
      g = g * 1e4
    _, state = update(g, state, w, batch=x)
    decisions.append(int(guards.decision(state)))
  assert decisions[-1] == guards.SKIPPED
  assert decisions[:60].count(guards.SKIPPED) == 0
