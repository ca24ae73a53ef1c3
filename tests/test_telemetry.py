"""``telemetry``: values derived from the state (asserted, not just keys);
absent pieces absent; not-yet-measured quantities NaN."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ebc_optax
from conftest import next_token_loss, tiny_logits_fn


ALWAYS = {"c", "S", "tau", "delta", "guard_factor", "update_norm", "beta",
          "contribution", "step", "clipped_steps", "beta_refreshed"}
PROBE = {"applied_kl", "applied_change", "budgeted_change", "rho",
         "probe_count", "probed"}
RELATIVE = {"outliers", "outlier_run"}  # the default controller


def test_before_the_first_step_nothing_reads_as_measured(tiny):
  _, params, _, _ = tiny
  stats = ebc_optax.telemetry(ebc_optax.ellipsotope_budget_clip(
      tiny_logits_fn).init(params))
  for key in ("c", "S", "tau", "delta", "guard_factor", "update_norm",
              "applied_kl", "applied_change", "rho"):
    assert np.isnan(float(stats[key])), key
  assert np.isnan(np.asarray(stats["beta"])).all()
  assert int(stats["step"]) == 0 and int(stats["probe_count"]) == 0


@pytest.mark.parametrize("build,keys", [
    (lambda: ebc_optax.advanced.budget_clip(
        ebc_optax.advanced.sensitivity_estimator(
            tiny_logits_fn, **ebc_optax.EBCConfig(
                probe_batch_size=None).estimator_kwargs()),
        **ebc_optax.EBCConfig(controller="none").clip_kwargs()), ALWAYS),
    (lambda: ebc_optax.ellipsotope_budget_clip(tiny_logits_fn, guard=False),
     ALWAYS | PROBE | RELATIVE | {"nonfinite_skips"}),
    # The default: the relative radius, no guard (see ellipsotope_budget_clip).
    (lambda: ebc_optax.ellipsotope_budget_clip(tiny_logits_fn),
     ALWAYS | PROBE | RELATIVE | {"nonfinite_skips"}),
    (lambda: ebc_optax.ellipsotope_budget_clip(tiny_logits_fn, guard=True),
     ALWAYS | PROBE | RELATIVE | {"guard_trips", "nonfinite_skips"}),
    (lambda: ebc_optax.ellipsotope_budget_clip(tiny_logits_fn, aggregate="exact"),
     ALWAYS | PROBE | RELATIVE | {"nonfinite_skips", "S_lin", "calibration"}),
    (lambda: ebc_optax.ellipsotope_budget_clip(
        tiny_logits_fn, controller="trust_region",
        loss_fn=lambda z, b: jnp.mean(z ** 2)),
     ALWAYS | PROBE | {"guard_trips", "nonfinite_skips", "rho_tr", "loss_change",
                       "predicted_loss_change", "tr_accepted", "tr_shrunk",
                       "tr_grown"}),
    (lambda: ebc_optax.wrap(optax.adam(1e-3), tiny_logits_fn),
     ALWAYS | PROBE | RELATIVE | {"nonfinite_skips", "notfinite_count",
                                 "total_notfinite", "refused_count",
                                 "total_refused", "grad_outliers",
                                 "grad_outlier_run", "loss_outliers",
                                 "loss_outlier_run"}),
])
def test_pieces_absent_from_the_composition_are_absent(tiny, build, keys):
  _, params, _, _ = tiny
  assert set(ebc_optax.telemetry(build().init(params))) == keys
  assert keys <= _readme_keys(), keys - _readme_keys()


def _readme_keys():
  """The keys the telemetry guide's table documents (its first column)."""
  import pathlib
  import re
  text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "guides"
          / "telemetry.md").read_text()
  table = text.split("\n\n**", 1)[0]
  return {key for row in table.splitlines() if row.startswith("| `")
          for key in re.findall(r"`([^`]+)`", row.split(" | ")[0])}


def test_values_follow_the_state_over_a_run(tiny):
  """Every number against its definition, step by step, through wrap."""
  _, params, batch, _ = tiny
  tx = ebc_optax.wrap(optax.adam(0.1), tiny_logits_fn, target_kl=0.003,
                      probe_every=3, update_every=2, probe_batch_size=None,
                      controller=None)
  state = tx.init(params)
  clipped = 0
  for t in range(7):
    grads = jax.grad(next_token_loss)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    stats = {k: np.asarray(v) for k, v in ebc_optax.telemetry(state).items()}
    assert int(stats["step"]) == t + 1
    assert int(stats["probe_count"]) == len(range(0, t + 1, 3))
    np.testing.assert_allclose(stats["delta"], 0.003, rtol=1e-6)
    np.testing.assert_allclose(
        stats["tau"], np.sqrt(4 * stats["delta"]) * stats["guard_factor"], rtol=1e-6)
    np.testing.assert_allclose(stats["c"], min(1.0, stats["tau"] / stats["S"]),
                               rtol=1e-6)
    np.testing.assert_allclose(stats["S"], np.sum(stats["contribution"]), rtol=1e-5)
    np.testing.assert_allclose(
        stats["contribution"], 1.05 * stats["beta"] * np.asarray(
            [np.linalg.norm(np.concatenate([np.ravel(x) for x in
                                            jax.tree.leaves(updates["blocks"][i])]))
             / stats["c"] for i in range(2)]), rtol=1e-4)
    clipped += int(stats["c"] < 1)
    assert int(stats["clipped_steps"]) == clipped
    if t % 3 == 0:  # a probe ran on this step: the applied KL of this step
      z = tiny_logits_fn(params, batch)
      z_new = tiny_logits_fn(optax.apply_updates(params, updates), batch)
      np.testing.assert_allclose(stats["applied_kl"],
                                 ebc_optax.formulas.per_token_kl(z, z_new), rtol=1e-4)
      change = float(ebc_optax.formulas.per_token_change_norm(z_new - z, z))
      np.testing.assert_allclose(stats["applied_change"], change, rtol=1e-4)
      # ρ compares like with like: the change of the budgeted leaves (the
      # blocks) alone, against what S promised for them.
      blocks_only = {**params, "blocks": optax.apply_updates(
          params["blocks"], updates["blocks"])}
      z_b = tiny_logits_fn(blocks_only, batch)
      budgeted = float(ebc_optax.formulas.per_token_change_norm(z_b - z, z))
      np.testing.assert_allclose(stats["budgeted_change"], budgeted, rtol=1e-4)
      assert budgeted != pytest.approx(change, rel=1e-3)  # embed/head moved
      np.testing.assert_allclose(stats["rho"], budgeted / (stats["c"] * stats["S"]),
                                 rtol=1e-4)
    params = optax.apply_updates(params, updates)
  assert clipped > 0


def test_unmeasured_layers_read_nan():
  """A layer that has only ever had a zero update keeps β NaN (not 0)."""
  params = {"blocks": [{"w": jnp.eye(3)}, {"w": jnp.eye(3)}],
            "lm_head": jnp.arange(12.0).reshape(3, 4) / 10}

  def logits_fn(p, x):
    h = x
    for b in p["blocks"]:
      h = jnp.tanh(h @ b["w"])
    return h @ p["lm_head"]

  tx = ebc_optax.ellipsotope_budget_clip(logits_fn, probe_every=0)
  updates = jax.tree.map(jnp.zeros_like, params)
  updates["blocks"][0]["w"] = 0.1 * jnp.ones((3, 3))
  _, state = tx.update(updates, tx.init(params), params,
                       batch=jnp.ones((2, 3)))
  beta = np.asarray(ebc_optax.telemetry(state)["beta"])
  assert np.isfinite(beta[0]) and beta[0] > 0 and np.isnan(beta[1])


def test_what_ran_at_each_step_follows_the_cadence(tiny):
  """``beta_refreshed`` and ``probed`` say what the step measured: the
  schedule of :mod:`ebc_optax.cadence`, step by step."""
  _, params, batch, _ = tiny
  every = dict(update_every=2, probe_every=3)
  tx = ebc_optax.wrap(optax.adam(1e-2), tiny_logits_fn, probe_layers=1,
                      full_sweep_every=6, **every)
  num_layers = len(ebc_optax.layers.budget_layers(params))
  state = tx.init(params)
  update = jax.jit(tx.update)
  grads = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), params)
  for step in range(13):
    _, state = update(grads, state, params, batch=batch)
    stats = ebc_optax.telemetry(state)
    kind = ebc_optax.cadence.step_kind(step, sweep_every=6, **every)
    want = (num_layers if kind.startswith("sweep")
            else 1 if kind.startswith("refresh") else 0)
    assert int(stats["beta_refreshed"]) == want, (step, kind)
    assert bool(stats["probed"]) == ("probe" in kind), (step, kind)

