"""The experiment models: causality, dtypes, EBC grouping, purity, training."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

flax = pytest.importorskip("flax")
from flax import nnx  # noqa: E402

import ebc_optax  # noqa: E402
from ebc_optax.experiments import model as M  # noqa: E402

TINY = dict(num_blocks=2, d_embed=16, num_heads=2, seq_len=8)
VOCAB = 11


def tiny_gpt(positions="rope", param_dtype=jnp.float32, seed=0):
  return M.init_gpt(jax.random.PRNGKey(seed), VOCAB, positions=positions,
                    param_dtype=param_dtype, **TINY)


def tokens(seed=1, batch=3, seq=8):
  return jax.random.randint(jax.random.PRNGKey(seed), (batch, seq), 0, VOCAB)


def next_token_loss(apply_fn):
  def loss(params, batch):
    logp = jax.nn.log_softmax(apply_fn(params, batch)[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], -1))
  return loss


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_gpt_is_causal(positions):
  apply_fn, params = tiny_gpt(positions)
  apply_fn = jax.jit(apply_fn)
  x = tokens()
  base = np.asarray(apply_fn(params, x))
  for t in (0, 3, 6):
    changed = x.at[:, t + 1:].set((x[:, t + 1:] + 1 + t) % VOCAB)
    out = np.asarray(apply_fn(params, changed))
    np.testing.assert_allclose(out[:, :t + 1], base[:, :t + 1], atol=1e-5)
    assert not np.allclose(out[:, t + 1:], base[:, t + 1:])


@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_gpt_shapes_and_dtypes(param_dtype):
  apply_fn, params = tiny_gpt(param_dtype=param_dtype)
  assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {jnp.dtype(param_dtype)}
  out = jax.jit(apply_fn)(params, tokens())
  assert out.shape == (3, 8, VOCAB) and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()
  assert M.count_params(params) == sum(x.size for x in jax.tree.leaves(params))


def test_params_are_a_plain_dict_with_block_paths():
  _, params = tiny_gpt()
  assert isinstance(params, dict) and isinstance(params["blocks"], dict)
  assert params["blocks"][0]["attn"]["qkv"]["kernel"].shape == (16, 48)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(params))


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_ebc_default_grouping(positions):
  _, params = tiny_gpt(positions)
  assert ebc_optax.layers.budget_layers(params) == ("blocks/0", "blocks/1")
  labels = set(jax.tree.leaves(ebc_optax.layers.default_layer_labels(params)))
  groups = {"tok_embed", "lm_head"} | ({"pos_embed"} if positions == "learned" else set())
  assert labels == {"blocks/0", "blocks/1"} | groups
  assert all(ebc_optax.layers.is_embed_or_output(g) for g in groups)
  assert set(ebc_optax.layers.budget_layers(params, include_embed_out=True)) == labels


def test_jit_compiles_once_and_rope_takes_shorter_sequences():
  apply_fn, params = tiny_gpt()
  loss = next_token_loss(apply_fn)
  traces = []

  @jax.jit
  def step(params, batch):
    traces.append(1)
    return jax.value_and_grad(loss)(params, batch)

  for seed in range(3):
    value, grads = step(params, tokens(seed))
    assert np.isfinite(float(value))
  assert len(traces) == 1
  full = tokens()
  out = jax.jit(apply_fn)(params, full[:, :5])
  assert out.shape == (3, 5, VOCAB)
  # A prefix gives the same logits as the full sequence (causal + RoPE on the fly).
  np.testing.assert_allclose(out, jax.jit(apply_fn)(params, full)[:, :5], atol=1e-5)
  with pytest.raises(ValueError, match="seq_len"):
    apply_fn(params, tokens(seq=9))


def test_model_state_is_only_params_and_forward_is_pure():
  model = M.GPT(VOCAB, rngs=nnx.Rngs(0), **TINY)
  assert not jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))
  graphdef, params = M.split_model(model)
  model(tokens())
  graphdef_after, params_after = M.split_model(model)
  assert graphdef_after == graphdef
  jax.tree.map(np.testing.assert_array_equal, params_after, params)


def test_apply_fn_jvp_on_one_layer_matches_finite_difference():
  apply_fn, params = tiny_gpt()
  x = tokens()
  sub = params["blocks"][1]
  tangent = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(2), p.shape), sub)

  @jax.jit
  def f(layer):
    return apply_fn({**params, "blocks": {0: params["blocks"][0], 1: layer}}, x)

  _, dz = jax.jit(lambda s, t: jax.jvp(f, (s,), (t,)))(sub, tangent)
  h = 1e-3
  plus = f(jax.tree.map(lambda p, t: p + h * t, sub, tangent))
  minus = f(jax.tree.map(lambda p, t: p - h * t, sub, tangent))
  np.testing.assert_allclose(dz, (plus - minus) / (2 * h), rtol=1e-2, atol=1e-3)


def test_adam_with_ebc_reduces_loss_under_jit():
  apply_fn, params = tiny_gpt()
  loss = next_token_loss(apply_fn)
  batch = tokens(batch=4)
  tx = optax.chain(optax.adam(3e-3), ebc_optax.ellipsotope_budget_clip(apply_fn, 0.05, controller="pi"))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    value, grads = jax.value_and_grad(loss)(params, batch)
    updates, state = tx.update(grads, state, params, batch=batch)
    return optax.apply_updates(params, updates), state, value

  first = float(loss(params, batch))
  for _ in range(15):
    params, state, _ = step(params, state)
  last = float(loss(params, batch))
  assert last < first - 0.1
  stats = ebc_optax.telemetry(state)
  assert 0 < float(stats["c"]) <= 1


def test_mlp_shapes_labels_and_training():
  apply_fn, params = M.init_mlp(jax.random.PRNGKey(0), 2, 2, hidden=(16, 16))
  assert ebc_optax.layers.budget_layers(params) == ("blocks/0", "blocks/1")
  assert ebc_optax.layers.is_embed_or_output("head")
  x = jax.random.normal(jax.random.PRNGKey(1), (64, 2))
  y = (x[:, 0] + x[:, 1] > 0).astype(jnp.int32)
  logits = apply_fn(params, x)
  assert logits.shape == (64, 2) and logits.dtype == jnp.float32

  def loss(params):
    return optax.softmax_cross_entropy_with_integer_labels(apply_fn(params, x), y).mean()

  tx = optax.adam(3e-2)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(60):
    params, state = step(params, state)
  accuracy = float(jnp.mean(jnp.argmax(apply_fn(params, x), -1) == y))
  assert accuracy >= 0.95

  _, bf16 = M.init_mlp(jax.random.PRNGKey(0), 2, 3, param_dtype=jnp.bfloat16)
  assert {leaf.dtype for leaf in jax.tree.leaves(bf16)} == {jnp.dtype(jnp.bfloat16)}


def test_make_apply_fn_accepts_state_or_pure_dict():
  model = M.MLP(3, 2, hidden=(4,), rngs=nnx.Rngs(0))
  graphdef, params = M.split_model(model)
  x = jnp.ones((5, 3))
  from_state = M.make_apply_fn(graphdef, nnx.state(model, nnx.Param))(params, x)
  from_dict = M.make_apply_fn(graphdef, params)(params, x)
  np.testing.assert_allclose(from_state, model(x))
  np.testing.assert_allclose(from_dict, model(x))
  with pytest.raises(ValueError, match="structure"):
    M.make_apply_fn(graphdef, params)({"head": params["head"]}, x)


@pytest.mark.parametrize("kwargs, name", [
    (dict(d_embed=15, num_heads=2), "d_embed"),
    (dict(d_embed=12, num_heads=4), "head dim"),
    (dict(positions="alibi"), "positions"),
    (dict(param_dtype=jnp.float16), "param_dtype"),
    (dict(param_dtype="int8"), "param_dtype"),
    (dict(num_blocks=0), "num_blocks"),
    (dict(seq_len=-1), "seq_len"),
])
def test_gpt_invalid_arguments(kwargs, name):
  config = {**TINY, **kwargs}
  with pytest.raises(ValueError, match=name):
    M.GPT(VOCAB, rngs=nnx.Rngs(0), **config)


def test_mlp_invalid_arguments():
  with pytest.raises(ValueError, match="hidden"):
    M.MLP(2, 2, hidden=(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="num_classes"):
    M.MLP(2, 0, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="param_dtype"):
    M.MLP(2, 2, param_dtype=jnp.int32, rngs=nnx.Rngs(0))


# --- activation norms for energy-budget clipping ----------------------------------

def _np_activation_norm(x):
  x = np.asarray(x, np.float64)
  return np.sqrt(np.mean(np.sum(x.reshape(-1, x.shape[-1]) ** 2, axis=-1)))


def _dot_count(fn, *args):
  jaxpr = jax.make_jaxpr(fn)(*args)
  return str(jaxpr).count("dot_general")


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_gpt_activation_norms_come_from_the_same_forward_pass(positions):
  model = M.GPT(VOCAB, rngs=nnx.Rngs(0), positions=positions, **TINY)
  fns = M.functional(model)
  x = tokens()
  logits, norms = jax.jit(fns.apply_with_activations)(fns.params, x)
  np.testing.assert_allclose(logits, jax.jit(fns.apply_fn)(fns.params, x), atol=1e-6)
  # Labels are exactly the default layer labels of the params.
  assert set(norms) == set(jax.tree.leaves(ebc_optax.layers.default_layer_labels(fns.params)))
  assert all(v.shape == () and v.dtype == jnp.float32 for v in norms.values())
  # Brute force: run the modules by hand and take the documented activations.
  h = model.tok_embed(x)
  expected = {"tok_embed": _np_activation_norm(h)}
  if positions == "learned":
    pos = model.pos_embed(jnp.arange(x.shape[1]))[None]
    expected["pos_embed"] = _np_activation_norm(pos)
    h = h + pos
  for i, block in enumerate(model.blocks):
    expected[f"blocks/{i}"] = _np_activation_norm(h)  # the block's input
    h = block(h)
  expected["lm_head"] = _np_activation_norm(h)  # the head's input
  assert set(expected) == set(norms)
  for label, value in expected.items():
    np.testing.assert_allclose(norms[label], value, rtol=1e-5, err_msg=label)
  # One forward pass: no more matmuls than the plain forward.
  assert (_dot_count(fns.apply_with_activations, fns.params, x)
          == _dot_count(fns.apply_fn, fns.params, x))
  # The plain call still leaves nothing but Params on the module.
  model(x)
  assert not jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param)))


def test_activation_norms_as_aux_of_grad_jit_once_and_keep_bf16():
  fns = M.functional(M.GPT(VOCAB, rngs=nnx.Rngs(0), param_dtype=jnp.bfloat16, **TINY))
  traces = []

  def loss(params, batch):
    logits, norms = fns.apply_with_activations(params, batch)
    logp = jax.nn.log_softmax(logits[:, :-1])
    return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], -1)), norms

  @jax.jit
  def step(params, batch):
    traces.append(1)
    return jax.value_and_grad(loss, has_aux=True)(params, batch)

  for seed in range(3):
    (value, norms), grads = step(fns.params, tokens(seed))
    assert np.isfinite(float(value))
    assert all(v.dtype == jnp.float32 and float(v) > 0 for v in norms.values())
  assert len(traces) == 1
  assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.bfloat16)}


def test_mlp_activation_norms():
  model = M.MLP(3, 2, hidden=(4, 5), rngs=nnx.Rngs(0))
  fns = M.functional(model)
  x = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
  logits, norms = fns.apply_with_activations(fns.params, x)
  np.testing.assert_allclose(logits, model(x), atol=1e-6)
  h0 = x
  h1 = model.blocks[0](h0)
  h2 = model.blocks[1](h1)
  expected = {"blocks/0": h0, "blocks/1": h1, "head": h2}
  assert set(norms) == set(expected)
  for label, h in expected.items():
    np.testing.assert_allclose(norms[label], _np_activation_norm(h), rtol=1e-5)


def test_two_norms_in_one_group_are_an_error():
  with pytest.raises(ValueError, match="blocks/0"):
    M.activation_norms_by_label({"blocks": {0: {"a": jnp.ones(()), "b": jnp.ones(())}}})
