"""Energy-budget clipping: the math against numpy, the transform against a
brute-force per-layer reference, jit, chains, errors, dtypes, bad inputs."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import tiny_batch, tiny_params
from ebc_optax import _energy
from ebc_optax import _layers
from ebc_optax._energy import energy_budget_clip
from ebc_optax._energy import energy_ratios
from ebc_optax._energy import EnergyBudgetClipState
from ebc_optax.formulas import activation_norm
from ebc_optax.formulas import energy_ratio
from ebc_optax.formulas import energy_scale

# Flatten order (dict keys sorted): the order of the per-layer state arrays.
LABELS = ("blocks/0", "blocks/1", "embed", "lm_head")


def random_like(tree, seed, scale=1.0):
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [
      (scale * jax.random.normal(k, x.shape)).astype(x.dtype)
      for k, x in zip(keys, leaves)])


# --- brute-force numpy references ----------------------------------------------

def np_layer_grad_norms(grads):
  """Frobenius norm of each default-labelled layer, float64, by hand."""
  out = {}
  out["embed"] = np.linalg.norm(np.asarray(grads["embed"], np.float64))
  for i, block in enumerate(grads["blocks"]):
    sq = sum(np.sum(np.asarray(x, np.float64) ** 2) for x in block.values())
    out[f"blocks/{i}"] = np.sqrt(sq)
  out["lm_head"] = np.linalg.norm(np.asarray(grads["lm_head"], np.float64))
  return out


def np_scale(g, a, r):
  if not (np.isfinite(a) and a > 0 and np.isfinite(g)):
    return 0.0
  return 1.0 if g == 0 else min(1.0, r * a / g)


def np_clip(grads, acts, r):
  """Per-layer clip with plain numpy and an explicit label -> leaves map."""
  norms = np_layer_grad_norms(grads)
  scale = {lab: np_scale(norms[lab], acts[lab], r) if lab in acts else 1.0
           for lab in LABELS}
  return {
      "embed": np.asarray(grads["embed"], np.float64) * scale["embed"],
      "blocks": [{k: np.asarray(v, np.float64) * scale[f"blocks/{i}"]
                  for k, v in block.items()}
                 for i, block in enumerate(grads["blocks"])],
      "lm_head": np.asarray(grads["lm_head"], np.float64) * scale["lm_head"],
  }, scale


def assert_tree_close(actual, expected, **kw):
  jax.tree.map(lambda a, e: np.testing.assert_allclose(
      np.asarray(a, np.float64), e, **kw), actual, expected)


# --- the math --------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7,), (5, 7), (2, 3, 7)])
def test_activation_norm_is_per_token_rms_of_l2(shape):
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), shape), np.float64)
  tokens = x.reshape(-1, shape[-1])
  expected = np.sqrt(np.mean(np.sum(tokens ** 2, axis=-1)))
  np.testing.assert_allclose(activation_norm(jnp.asarray(x)), expected, rtol=1e-6)
  # Batch-size invariant: repeating the tokens does not change it.
  repeated = np.stack([x, x])
  np.testing.assert_allclose(activation_norm(jnp.asarray(repeated)), expected,
                             rtol=1e-6)
  out = activation_norm(jnp.asarray(x, jnp.bfloat16))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, expected, rtol=2e-2)


VALUES = [0.0, 1e-30, 0.3, 2.0, 50.0, np.inf, -1.0, np.nan]


def test_energy_ratio_and_scale_match_the_reference_on_a_grid():
  g, a = np.meshgrid(np.array(VALUES[:6] + [np.nan]), np.array(VALUES),
                     indexing="ij")
  g, a = g.ravel(), a.ravel()
  for r in (0.1, 1.0):
    scale = np.asarray(energy_scale(jnp.asarray(g, jnp.float32),
                                    jnp.asarray(a, jnp.float32), r))
    assert scale.dtype == np.float32 and np.isfinite(scale).all()
    expected = [np_scale(gi, ai, r) for gi, ai in zip(g, a)]
    np.testing.assert_allclose(scale, expected, rtol=1e-6)
    assert ((scale >= 0) & (scale <= 1)).all()
    # Where the budget is honourable, the clipped norm is within it.
    ok = np.isfinite(g) & np.isfinite(a) & (a > 0)
    assert (scale[ok] * g[ok] <= r * a[ok] * (1 + 1e-6)).all()
  ratio = np.asarray(energy_ratio(jnp.asarray(g, jnp.float32),
                                  jnp.asarray(a, jnp.float32)))
  valid = np.isfinite(a) & (a > 0)
  with np.errstate(divide="ignore", invalid="ignore"):
    np.testing.assert_allclose(ratio[valid], (g / a)[valid].astype(np.float32),
                               rtol=1e-6)
  assert np.isposinf(ratio[~valid]).all()


def test_module_doctests():
  result = doctest.testmod(_energy, optionflags=doctest.ELLIPSIS)
  assert result.attempted > 0 and result.failed == 0


# --- the transform ------------------------------------------------------------------

@pytest.fixture
def setup():
  params = tiny_params(jax.random.PRNGKey(0))
  grads = random_like(params, 1)
  norms = np_layer_grad_norms(grads)
  # blocks/0 far over budget, lm_head under it, embed and blocks/1 absent.
  acts = {"blocks/0": jnp.float32(norms["blocks/0"] * 2.0),  # s = 0.05 / ... < 1
          "lm_head": jnp.float32(norms["lm_head"] * 100.0)}   # s = 1
  return params, grads, acts


def test_clip_matches_the_per_layer_reference(setup):
  params, grads, acts = setup
  tx = energy_budget_clip(0.1)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params, activation_norms=acts)
  expected, scale = np_clip(grads, {k: float(v) for k, v in acts.items()}, 0.1)
  assert_tree_close(updates, expected, rtol=1e-5, atol=1e-7)
  labels = _layers.budget_layers(params, include_embed_out=True)
  assert labels == LABELS
  np.testing.assert_allclose(state.energy_scale, [scale[l] for l in labels],
                             rtol=1e-5)
  assert scale["blocks/0"] < 1 and scale["lm_head"] == 1
  norms = np_layer_grad_norms(grads)
  np.testing.assert_allclose(
      state.energy_ratio,
      [norms[l] / float(acts[l]) if l in acts else 0.0 for l in labels], rtol=1e-5)
  np.testing.assert_array_equal(state.energy_layer_clips, [1, 0, 0, 0])
  assert int(state.energy_clipped_steps) == 1
  # The clipped layer now sits exactly on its budget.
  clipped = np_layer_grad_norms(updates)["blocks/0"]
  np.testing.assert_allclose(clipped, 0.1 * float(acts["blocks/0"]), rtol=1e-5)


def test_layers_without_an_entry_are_untouched(setup):
  params, grads, acts = setup
  tx = energy_budget_clip(1e-6)
  updates, state = tx.update(grads, tx.init(params), activation_norms=acts)
  np.testing.assert_array_equal(updates["embed"], grads["embed"])
  jax.tree.map(np.testing.assert_array_equal, updates["blocks"][1], grads["blocks"][1])
  np.testing.assert_array_equal(np.asarray(state.energy_scale)[[1, 2]], [1.0, 1.0])
  np.testing.assert_array_equal(np.asarray(state.energy_ratio)[[1, 2]], [0.0, 0.0])
  # An empty mapping is allowed and is the identity.
  same, _ = tx.update(grads, tx.init(params), activation_norms={})
  jax.tree.map(np.testing.assert_array_equal, same, grads)


def test_custom_layer_labels():
  params = tiny_params(jax.random.PRNGKey(0))
  grads = random_like(params, 2)

  def two_groups(tree):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "body" if _layers.key_name(path[0]) == "blocks" else "ends",
        tree)

  tx = energy_budget_clip(0.1, layer_labels=two_groups)
  state = tx.init(params)
  assert state.energy_scale.shape == (2,)
  body = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2)
                     for x in jax.tree.leaves(grads["blocks"])))
  updates, state = tx.update(grads, state, activation_norms={"body": body})
  s = 0.1 * body / body
  jax.tree.map(lambda u, g: np.testing.assert_allclose(u, g * s, rtol=1e-5),
               updates["blocks"], grads["blocks"])
  np.testing.assert_array_equal(updates["embed"], grads["embed"])
  with pytest.raises(ValueError, match=r"\['blocks/0'\].*not layers"):
    tx.update(grads, state, activation_norms={"blocks/0": 1.0})
  # The monitor uses the same grouping.
  np.testing.assert_allclose(
      energy_ratios(grads, {"body": 2 * body}, layer_labels=two_groups)["body"], 0.5,
      rtol=1e-6)


def test_jit_traces_once_and_accepts_unknown_extra_args(setup):
  params, grads, acts = setup
  tx = energy_budget_clip(0.1)
  traces = []

  @jax.jit
  def step(grads, state, acts):
    traces.append(1)
    return tx.update(grads, state, params, activation_norms=acts, batch=None,
                     something_else=3)

  state = tx.init(params)
  for seed in range(3):
    g = random_like(params, 10 + seed)
    a = {k: v * (seed + 1) for k, v in acts.items()}
    updates, state = step(g, state, a)
    ref, _ = np_clip(g, {k: float(v) for k, v in a.items()}, 0.1)
    assert_tree_close(updates, ref, rtol=1e-5, atol=1e-7)
  assert len(traces) == 1
  assert int(state.energy_clipped_steps) == 3


def test_bfloat16_updates_keep_their_dtype_and_state_is_float32(setup):
  params, grads, acts = setup
  params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  grads16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), grads)
  tx = energy_budget_clip(0.1)
  state = tx.init(params16)
  updates, state = jax.jit(tx.update)(
      grads16, state, activation_norms={k: v.astype(jnp.bfloat16) for k, v in acts.items()})
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  assert state.energy_scale.dtype == jnp.float32
  assert state.energy_ratio.dtype == jnp.float32
  assert state.energy_layer_clips.dtype == jnp.int32
  assert state.energy_clipped_steps.dtype == jnp.int32
  ref, _ = np_clip(jax.tree.map(lambda x: np.asarray(x, np.float64), grads16),
                   {k: float(v.astype(jnp.bfloat16)) for k, v in acts.items()}, 0.1)
  assert_tree_close(updates, ref, rtol=2e-2, atol=1e-3)


@pytest.mark.parametrize("bad", [0.0, -3.0, np.inf, -np.inf, np.nan])
def test_bad_activation_norm_zeroes_the_layer_without_nan(setup, bad):
  params, grads, acts = setup
  # An inf gradient entry in the zeroed layer must not become NaN either.
  grads = {**grads, "lm_head": grads["lm_head"].at[0, 0].set(jnp.inf)}
  tx = energy_budget_clip(0.1)
  updates, state = jax.jit(tx.update)(
      grads, tx.init(params), activation_norms={**acts, "lm_head": jnp.float32(bad)})
  np.testing.assert_array_equal(updates["lm_head"], np.zeros_like(grads["lm_head"]))
  assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))
  assert float(state.energy_scale[3]) == 0.0
  assert np.isposinf(float(state.energy_ratio[3]))
  assert int(state.energy_layer_clips[3]) == 1
  # The other layers are clipped as usual.
  ref, _ = np_clip(grads, {"blocks/0": float(acts["blocks/0"])}, 0.1)
  assert_tree_close(updates["blocks"], ref["blocks"], rtol=1e-5, atol=1e-7)


def test_non_finite_gradient_with_a_budget_is_zeroed(setup):
  params, grads, acts = setup
  grads = {**grads, "lm_head": grads["lm_head"].at[1, 2].set(jnp.nan)}
  tx = energy_budget_clip(0.1)
  updates, state = tx.update(grads, tx.init(params), activation_norms=acts)
  np.testing.assert_array_equal(updates["lm_head"], np.zeros_like(grads["lm_head"]))
  assert float(state.energy_scale[3]) == 0.0


def test_zero_gradient_passes():
  params = tiny_params(jax.random.PRNGKey(0))
  zeros = jax.tree.map(jnp.zeros_like, params)
  tx = energy_budget_clip(0.1)
  updates, state = tx.update(zeros, tx.init(params),
                             activation_norms={l: 1.0 for l in LABELS})
  jax.tree.map(np.testing.assert_array_equal, updates, zeros)
  np.testing.assert_array_equal(state.energy_scale, np.ones(4))
  assert int(state.energy_clipped_steps) == 0


# --- errors ----------------------------------------------------------------------

@pytest.mark.parametrize("ratio", [0, 0.0, -0.1, float("inf"), float("nan"), "0.1", None])
def test_bad_ratio_is_rejected_at_construction(ratio):
  with pytest.raises(ValueError, match=r"ratio must be (in \(0, inf\)|a number)"):
    energy_budget_clip(ratio)


def test_update_errors_name_the_problem(setup):
  params, grads, acts = setup
  tx = energy_budget_clip()
  state = tx.init(params)
  with pytest.raises(ValueError, match="`activation_norms`"):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match="mapping"):
    tx.update(grads, state, activation_norms=[1.0, 2.0])
  with pytest.raises(ValueError, match=r"\['block/0', 'head'\].*not layers.*"
                                       r"'blocks/0'"):
    jax.jit(lambda g, s: tx.update(g, s, activation_norms={"block/0": 1.0,
                                                           "head": 1.0}))(grads, state)
  with pytest.raises(ValueError, match=r"activation_norms\['lm_head'\] must be a scalar"):
    tx.update(grads, state, activation_norms={"lm_head": jnp.ones(3)})
  with pytest.raises(ValueError, match="initialised for 4"):
    tx.update({"blocks": grads["blocks"]}, state, activation_norms={})
  with pytest.raises(ValueError, match="not layers"):
    energy_ratios(grads, {"nope": 1.0})
  with pytest.raises(ValueError, match="`activation_norms`"):
    energy_ratios(grads, None)


# --- in a chain, and the monitor ------------------------------------------------------

def forward_with_activations(params, tokens):
  """conftest's tiny model, also returning {label: activation norm}."""
  h = params["embed"][tokens]
  acts = {"embed": activation_norm(h)}
  for i, block in enumerate(params["blocks"]):
    acts[f"blocks/{i}"] = activation_norm(h)  # the block's input
    h = h + jnp.tanh(h @ block["w"] + block["b"])
  acts["lm_head"] = activation_norm(h)  # the head's input
  return h @ params["lm_head"], acts


def loss_and_acts(params, tokens):
  logits, acts = forward_with_activations(params, tokens)
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32))
  loss = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
  return loss, acts


@pytest.mark.parametrize("base", ["adam", "muon"])
def test_trains_in_a_chain_before_the_base_optimizer(base):
  params = tiny_params(jax.random.PRNGKey(0))
  batch = tiny_batch(jax.random.PRNGKey(1))
  opt = optax.adam(3e-2) if base == "adam" else optax.contrib.muon(3e-2)
  # A tight ratio so that clipping is active on this model.
  tx = optax.chain(energy_budget_clip(0.01), opt)
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    (loss, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(params, batch)
    ratios = energy_ratios(grads, acts)
    updates, state = tx.update(grads, state, params, activation_norms=acts)
    return optax.apply_updates(params, updates), state, loss, ratios

  first = None
  for _ in range(12):
    params, state, loss, ratios = step(params, state)
    first = float(loss) if first is None else first
  assert len(traces) == 1
  assert float(loss_and_acts(params, batch)[0]) < first - 0.1
  # Telemetry is readable by name, next to adam's / muon's own fields.
  scale = optax.tree.get(state, "energy_scale")
  assert scale.shape == (4,) and ((scale > 0) & (scale <= 1)).all()
  assert int(optax.tree.get(state, "energy_clipped_steps")) >= 1
  assert set(ratios) == set(LABELS)
  # The state's ratio is the monitor's value of the last step's gradient.
  np.testing.assert_allclose(optax.tree.get(state, "energy_ratio"),
                             [ratios[l] for l in LABELS], rtol=1e-5)


def test_monitor_matches_numpy_under_jit(setup):
  params, grads, acts = setup
  out = jax.jit(energy_ratios)(grads, acts)
  norms = np_layer_grad_norms(grads)
  assert set(out) == set(acts)
  for label, value in out.items():
    assert value.shape == () and value.dtype == jnp.float32
    np.testing.assert_allclose(value, norms[label] / float(acts[label]), rtol=1e-5)


def test_ratio_can_be_injected_as_a_hyperparameter(setup):
  params, grads, acts = setup
  tx = optax.inject_hyperparams(energy_budget_clip)(ratio=0.1)
  state = tx.init(params)
  updates, state = jax.jit(
      lambda g, s: tx.update(g, s, activation_norms=acts))(grads, state)
  ref, _ = np_clip(grads, {k: float(v) for k, v in acts.items()}, 0.1)
  assert_tree_close(updates, ref, rtol=1e-5, atol=1e-7)


def test_replicas_agree_with_a_single_device(setup):
  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  params, grads, acts = setup
  tx = energy_budget_clip(0.1)
  state = tx.init(params)
  single, _ = tx.update(grads, state, activation_norms=acts)
  rep = lambda t: jax.tree.map(lambda x: jnp.stack([x] * 8), t)
  multi, mstate = jax.pmap(
      lambda g, s, a: tx.update(g, s, activation_norms=a))(rep(grads), rep(state),
                                                           rep(acts))
  jax.tree.map(lambda m, s: np.testing.assert_allclose(m, np.stack([s] * 8), rtol=1e-6),
               multi, single)
  assert isinstance(mstate, EnergyBudgetClipState)
