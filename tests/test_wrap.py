"""``ebc_optax.wrap``: EBC around a base optimizer, the gradient guarded first."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ebc_optax
from conftest import next_token_loss, tiny_logits_fn


def _train(tx, params, batch, steps, poison=None):
  """``steps`` jitted steps; ``poison[i]`` is added to every gradient at step i."""
  poison = poison or {}

  @jax.jit
  def step(params, state, bad):
    grads = jax.grad(next_token_loss)(params, batch)
    grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].add(bad), grads)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  losses = []
  for i in range(steps):
    params, state = step(params, state, jnp.float32(poison.get(i, 0.0)))
    losses.append(float(next_token_loss(params, batch)))
  assert step._cache_size() == 1
  return params, state, losses


def test_wrap_adam_trains_and_clips(tiny):
  _, params, batch, _ = tiny
  tx = ebc_optax.wrap(optax.adam(0.3), tiny_logits_fn, target_kl=1e-3, controller="pi")
  params, state, losses = _train(tx, params, batch, 6)
  stats = ebc_optax.telemetry(state)
  assert losses[-1] < losses[0]
  assert 0 < float(stats["c"]) < 1 and int(stats["step"]) == 6
  assert int(stats["total_notfinite"]) == 0


def test_wrap_equals_the_chain_on_finite_gradients(tiny):
  _, params, batch, _ = tiny
  opts = dict(controller="pi", target_kl=1e-3, probe_every=2, update_every=2)
  got, _, _ = _train(ebc_optax.wrap(optax.adam(0.1), tiny_logits_fn, **opts),
                     params, batch, 5)
  want, _, _ = _train(optax.chain(optax.adam(0.1), ebc_optax.ellipsotope_budget_clip(
      tiny_logits_fn, **opts)), params, batch, 5)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nonfinite_gradients_at_random_steps_are_skipped_exactly(tiny, seed):
  """NaN/Inf at random steps: adam's state stays finite, training goes on, and
  the run equals the same run with those steps left out; counters are exact."""
  _, params, batch, _ = tiny
  rng = np.random.default_rng(seed)
  steps = 12
  bad_at = sorted(rng.choice(np.arange(1, steps), size=4, replace=False).tolist())
  poison = {i: rng.choice([np.nan, np.inf, -np.inf]) for i in bad_at}
  tx = ebc_optax.wrap(optax.adam(0.1), tiny_logits_fn, target_kl=1e-3,
                      update_every=2, probe_every=2, controller="pi")
  got, state, losses = _train(tx, params, batch, steps, poison)
  chex.assert_tree_all_finite((got, state))
  stats = ebc_optax.telemetry(state)
  assert int(stats["total_notfinite"]) == len(bad_at)
  assert int(stats["step"]) == steps - len(bad_at)
  assert int(stats["nonfinite_skips"]) == 0  # nothing non-finite reached EBC
  want_consecutive = 1 if bad_at[-1] == steps - 1 else 0
  assert int(stats["notfinite_count"]) == want_consecutive
  # The same run without the bad steps (a clean run of the remaining steps).
  want, _, _ = _train(tx, params, batch, steps - len(bad_at))
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-7)
  assert losses[-1] < losses[0]


def test_consecutive_counter_and_max_consecutive_errors(tiny):
  _, params, batch, _ = tiny
  tx = ebc_optax.wrap(optax.sgd(0.1), tiny_logits_fn, max_consecutive_errors=2)
  state = tx.init(params)
  good = jax.grad(next_token_loss)(params, batch)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), good)
  counts = []
  for grads in (bad, bad, bad, good):
    updates, state = tx.update(grads, state, params, batch=batch)
    counts.append((int(state.notfinite_count), int(state.total_notfinite),
                   all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))))
  # Two rejections; the third consecutive one is applied (and EBC's own
  # non-finite guard then zeroes it); a finite gradient resets the streak.
  assert counts[0] == (1, 1, True) and counts[1] == (2, 2, True)
  assert counts[2][:2] == (3, 3) and counts[3][:2] == (0, 3)
  assert int(ebc_optax.telemetry(state)["nonfinite_skips"]) == 1


def test_after_is_outside_the_clip(tiny):
  """Decoupled weight decay as `after` is added unscaled to the clipped step."""
  _, params, batch, _ = tiny
  lr, wd = 0.3, 0.1
  grads = jax.grad(next_token_loss)(params, batch)
  tx = ebc_optax.wrap(optax.adam(lr), tiny_logits_fn, target_kl=1e-4,
                      after=optax.add_decayed_weights(-lr * wd), controller="pi")
  updates, state = tx.update(grads, tx.init(params), params, batch=batch)
  plain = ebc_optax.wrap(optax.adam(lr), tiny_logits_fn, target_kl=1e-4, controller="pi")
  clipped, _ = plain.update(grads, plain.init(params), params, batch=batch)
  c = float(ebc_optax.telemetry(state)["c"])
  assert c < 0.5
  for u, v, p in zip(jax.tree.leaves(updates), jax.tree.leaves(clipped),
                     jax.tree.leaves(params)):
    np.testing.assert_allclose(u, v - lr * wd * p, rtol=1e-5, atol=1e-7)


def test_lr_times_100_stays_finite(tiny):
  # A target-steered δ bounds every step whatever the LR; the default
  # relative radius follows the base's steps, so it is not the guard here.
  _, params, batch, _ = tiny
  tx = ebc_optax.wrap(optax.adam(30.0), tiny_logits_fn, **ebc_optax.SEEDS_RECIPE)
  params, state, losses = _train(tx, params, batch, 30)
  chex.assert_tree_all_finite((params, state))
  assert np.all(np.isfinite(losses))
  assert float(ebc_optax.telemetry(state)["c"]) < 0.05


@pytest.mark.parametrize("kwargs,match", [
    ({"max_consecutive_errors": -1}, "max_consecutive_errors"),
    ({"max_consecutive_errors": 1.5}, "max_consecutive_errors"),
    ({"after": "decay"}, "after must be an optax"),
    ({"target_kl": 0.0}, "target_kl"),
    ({"skip_refused": 1}, "skip_refused"),
    ({"loss_multiple": 1.0}, "loss_multiple"),
    ({"grad_norm_multiple": 0.5}, "grad_norm_multiple"),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    ebc_optax.wrap(optax.adam(1e-3), tiny_logits_fn, **kwargs)
  with pytest.raises(ValueError, match="base_optimizer"):
    ebc_optax.wrap(optax.adam, tiny_logits_fn)


def _refusing_run(params, batch, skip_refused):
  """SGD with momentum + the default relative radius (window 8); step 12's
  gradient is ×100 (an outlier, refused). Returns the base state after each
  step and the refusal counters."""
  tx = ebc_optax.wrap(optax.sgd(1e-2, momentum=0.9), tiny_logits_fn,
                      controller=ebc_optax.controllers.relative_radius(window=8),
                      probe_batch_size=None, skip_refused=skip_refused)
  state = tx.init(params)

  @jax.jit
  def step(params, state, scale):
    grads = jax.grad(next_token_loss)(params, batch)
    grads = jax.tree.map(lambda g: g * scale, grads)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  bases, counts = [], []
  for t in range(16):
    params, state = step(params, state, jnp.float32(100.0 if t == 12 else 1.0))
    bases.append(state.base_state)
    stats = ebc_optax.telemetry(state)
    counts.append((int(stats["refused_count"]), int(stats["total_refused"]),
                   float(stats["c"])))
  return bases, counts


def test_a_refused_step_leaves_the_base_state_untouched(tiny):
  _, params, batch, _ = tiny
  bases, counts = _refusing_run(params, batch, skip_refused=True)
  refused = [t for t, (_, _, c) in enumerate(counts) if c == 0.0]
  assert refused, counts  # the spike was refused...
  for t in refused:  # ... and Adam's state did not move on it
    chex.assert_trees_all_equal(bases[t], bases[t - 1])
  assert refused == [12] and counts[12][:2] == (1, 1)
  assert counts[-1] == (0, 1, 1.0)  # the steps after it pass again
  # Off: the momentum takes the spike in, as in the chain form, and replays
  # it: the steps after the spike are outliers too.
  off, counts = _refusing_run(params, batch, skip_refused=False)
  assert counts[12][2] == 0.0 and counts[-1][1] > 1
  trace = lambda b: jax.tree.leaves(b)
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(
      trace(off[12]), trace(off[11]))) > 10 * max(
          float(jnp.abs(a - b).max()) for a, b in zip(trace(bases[13]),
                                                       trace(bases[12])))


def test_a_refused_batch_keeps_the_moments_but_the_count_advances(tiny):
  """Adam, a ×100 gradient at step 40 (refused by the gradient-norm check):
  ``mu`` and ``nu`` are as before it, ``count`` has advanced (schedules follow
  the training step)."""
  _, params, batch, _ = tiny
  tx = ebc_optax.wrap(optax.adam(1e-2), tiny_logits_fn, probe_batch_size=None)
  state = tx.init(params)

  @jax.jit
  def step(params, state, scale):
    grads = jax.tree.map(lambda g: g * scale,
                         jax.grad(next_token_loss)(params, batch))
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state

  for t in range(41):
    before = state.base_state[0]
    params, state = step(params, state, jnp.float32(100.0 if t == 40 else 1.0))
  adam = state.base_state[0]
  assert int(ebc_optax.telemetry(state)["grad_outliers"]) == 1
  chex.assert_trees_all_equal((adam.mu, adam.nu), (before.mu, before.nu))
  assert int(adam.count) == int(before.count) + 1 == 41


def _loss_run(tiny, factors, **options):
  """Adam under wrap for ``len(factors)`` steps of the tiny problem, with
  the loss passed to ``update`` a stationary noisy one (2 nats ± 2%, as a
  run's plateau) times ``factors[t]`` (a corrupted batch's loss; the
  gradient unchanged); returns the per-step refusals of the loss check and
  the final state."""
  noise = 1 + 0.02 * np.random.default_rng(0).standard_normal(len(factors))
  _, params, batch, _ = tiny
  tx = ebc_optax.wrap(optax.adam(1e-2), tiny_logits_fn, probe_batch_size=None,
                      **options)
  state = tx.init(params)

  @jax.jit
  def step(params, state, loss):
    grads = jax.grad(next_token_loss)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch, loss=loss)
    return optax.apply_updates(params, updates), state, updates

  flags, count = [], 0
  for t, f in enumerate(factors):
    before = state
    params, state, updates = step(params, state, jnp.float32(2 * noise[t] * f))
    n = int(ebc_optax.telemetry(state).get("loss_outliers", 0))
    flags.append(n > count)
    if n > count:  # refused whole: no update, Adam's moments as they were
      assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree.leaves(updates))
      chex.assert_trees_all_equal(state.base_state[0].mu,
                                  before.base_state[0].mu)
    count = n
  return np.asarray(flags), state


def test_a_batch_whose_loss_is_an_outlier_is_refused(tiny):
  factors = np.ones(60)
  factors[45] = 1.3   # a quarter of the rows random: refused
  factors[50] = 1.05  # under loss_multiple (1.1): passes
  flags, state = _loss_run(tiny, factors)
  assert np.flatnonzero(flags).tolist() == [45]
  assert int(ebc_optax.telemetry(state)["loss_outlier_run"]) == 0
  # Off, or no loss given: nothing judged, the key absent when off.
  flags, state = _loss_run(tiny, factors, loss_multiple=None)
  assert not flags.any() and "loss_outliers" not in ebc_optax.telemetry(state)


def test_a_lasting_change_of_the_loss_passes(tiny):
  """The loss ×1.5 for good from step 40: refused until the shifted values
  hold half of the level's window (here: as many as the 40 before), then
  let through for good."""
  factors = np.where(np.arange(200) >= 40, 1.5, 1.0)
  flags, _ = _loss_run(tiny, factors)
  refused = np.flatnonzero(flags)
  assert refused[0] == 40 and 30 <= len(refused) <= 50, refused
  assert refused[-1] < 100, refused


def test_a_loss_that_is_not_a_scalar_is_an_error(tiny):
  _, params, batch, _ = tiny
  tx = ebc_optax.wrap(optax.adam(1e-2), tiny_logits_fn)
  grads = jax.grad(next_token_loss)(params, batch)
  with pytest.raises(ValueError, match="scalar mean loss"):
    tx.update(grads, tx.init(params), params, batch=batch, loss=jnp.ones(3))
