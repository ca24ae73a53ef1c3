"""Bad input gets a clear error naming the parameter and the accepted range."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ebc_optax
from conftest import tiny_logits_fn

BAD_HYPERPARAMETERS = [
    ("target_kl", 0.0, r"target_kl must be in \(0"),
    ("target_kl", -1.0, r"target_kl must be in \(0"),
    ("target_kl", float("nan"), "target_kl"),
    ("update_every", 0, r"update_every must be in \[1"),
    ("update_every", 2.5, "update_every must be an int"),
    ("probe_layers", 0, r"probe_layers must be in \[1"),
    ("full_sweep_every", -1, r"full_sweep_every must be in \[0"),
    ("beta_ema", 1.0, r"beta_ema must be in \[0, 1\)"),
    ("beta_ema", -0.1, r"beta_ema must be in \[0, 1\)"),
    ("safety", 0.0, r"safety must be in \(0"),
    ("aggregate", "linf", r"aggregate must be one of \('l1', 'l2', 'exact'\)"),
    ("sensitivity", "vjp", r"sensitivity must be one of \('jvp', 'fd'\)"),
    ("huber_ratio", 0.5, r"huber_ratio must be in \[1"),
    ("fd_step", 0.0, r"fd_step must be in \(0"),
    ("probe_batch_size", 0, r"probe_batch_size must be in \[1"),
    ("controller", "pid", r"controller must be one of"),
    ("probe_every", -1, r"probe_every must be in \[0"),
    ("eps", 0.0, r"eps must be in \(0"),
    # A string where a number belongs is an error, not parsed.
    ("target_kl", "0.05", "target_kl must be a number, not a string"),
    ("safety", "1.05", "safety must be a number, not a string"),
    ("update_every", "20", "update_every must be a number, not a string"),
    ("beta_ema", b"0.9", "beta_ema must be a number, not a string"),
    ("probe_batch_size", "0.25", "probe_batch_size must be a number, not a string"),
    ("exact_every", "4", "exact_every must be a number, not a string"),
    ("full_sweep_every", "200", "full_sweep_every must be .auto. or an int"),
]


@pytest.mark.parametrize("name,value,message", BAD_HYPERPARAMETERS)
def test_bad_hyperparameter_raises_at_construction(name, value, message):
  with pytest.raises(ValueError, match=message):
    ebc_optax.ellipsotope_budget_clip(
        tiny_logits_fn, **{"controller": "pi", "target_kl": 0.05, name: value})


@pytest.mark.parametrize("kw,message", [
    (dict(kp=-1.0), r"kp must be in \[0"),
    (dict(half_life=0.0), r"half_life must be in \(0"),
    (dict(delta_min=0.0), r"delta_min must be in \(0"),
    (dict(delta_min=0.3, delta_max=0.1), "delta_max must be > delta_min"),
])
def test_bad_controller_arguments(kw, message):
  with pytest.raises(ValueError, match=message):
    ebc_optax.controllers.pi_controller(**kw)


def test_logits_without_vocab_axis_raise_at_trace_time(tiny):
  _, params, batch, _ = tiny
  for bad_fn in (lambda p, b: jnp.sum(tiny_logits_fn(p, b)),
                 lambda p, b: tiny_logits_fn(p, b)[0, 0]):
    tx = ebc_optax.ellipsotope_budget_clip(bad_fn, 0.05, controller="pi")
    with pytest.raises(ValueError, match=r"\[\.\.\., vocab\]"):
      jax.jit(lambda u, s: tx.update(u, s, params, batch=batch))(
          params, tx.init(params))


def test_labels_that_do_not_match_params_raise(tiny):
  _, params, batch, _ = tiny
  tx = ebc_optax.ellipsotope_budget_clip(
      tiny_logits_fn, 0.05, layer_labels=lambda p: {"blocks": "x"}, controller="pi")
  with pytest.raises(ValueError, match="structure"):
    tx.init(params)


def test_state_from_other_params_raises(tiny):
  _, params, batch, _ = tiny
  tx = ebc_optax.ellipsotope_budget_clip(tiny_logits_fn, 0.05, controller="pi")
  state = tx.init(params)
  fewer = dict(params, blocks=params["blocks"][:1])
  with pytest.raises(ValueError, match="budgeted layers"):
    tx.update(fewer, state, fewer, batch=batch)


def test_probe_batch_size_larger_than_batch_raises(tiny):
  _, params, batch, _ = tiny
  tx = ebc_optax.ellipsotope_budget_clip(tiny_logits_fn, 0.05,
                                         probe_batch_size=100, controller="pi")
  with pytest.raises(ValueError, match=r"probe_batch_size=100"):
    tx.update(params, tx.init(params), params, batch=batch)


def test_training_signature_loss_fn_is_a_clear_error(tiny):
  logits_fn, params, batch, next_token_loss = tiny  # loss(params, tokens)
  tx = ebc_optax.ellipsotope_budget_clip(
      logits_fn, controller="trust_region", loss_fn=next_token_loss,
      probe_every=1)
  grads = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(ValueError, match=r"loss_fn must be \(logits, batch\) -> "
                     r"scalar mean loss.*logits of shape \(2, 5, 11\)"):
    tx.update(grads, tx.init(params), params, batch=batch)


def test_non_scalar_loss_fn_is_a_clear_error(tiny):
  logits_fn, params, batch, _ = tiny
  tx = ebc_optax.ellipsotope_budget_clip(
      logits_fn, controller="trust_region", loss_fn=lambda z, b: z.sum(-1),
      probe_every=1)
  with pytest.raises(ValueError, match="must return a scalar"):
    tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params,
              batch=batch)


@pytest.mark.parametrize("aggregate", ["l1", "exact"])
def test_integer_leaf_in_a_block_is_left_out_of_the_budget(tiny, aggregate):
  # An integer leaf (a counter) is never part of a layer: the block is
  # budgeted without it and the step runs.
  logits_fn, params, batch, _ = tiny
  params = {**params, "blocks": [{**params["blocks"][0],
                                  "count": jnp.zeros((), jnp.int32)},
                                 params["blocks"][1]]}
  assert ebc_optax.layers.budget_layers(params) == ("blocks/0", "blocks/1")
  tx = ebc_optax.ellipsotope_budget_clip(logits_fn, aggregate=aggregate)
  grads = jax.tree.map(lambda x: jnp.ones_like(x, jnp.float32), params)
  _, state = tx.update(grads, tx.init(params), params, batch=batch)
  assert np.isfinite(float(ebc_optax.telemetry(state)["S"]))



def test_logits_fn_returning_a_tuple_or_no_vocab_axis_is_named(tiny):
  logits_fn, params, batch, _ = tiny
  grads = jax.tree.map(jnp.ones_like, params)
  as_tuple = ebc_optax.ellipsotope_budget_clip(
      lambda p, x: (logits_fn(p, x), jnp.zeros(())))
  with pytest.raises(ValueError, match="got a tuple of 2 items"):
    as_tuple.update(grads, as_tuple.init(params), params, batch=batch)
  # [B, T] tokens in, [B, T] out: per-token numbers, no vocab axis.
  no_vocab = ebc_optax.ellipsotope_budget_clip(
      lambda p, x: logits_fn(p, x).sum(-1))
  with pytest.raises(ValueError, match="vocab axis is missing"):
    no_vocab.update(grads, no_vocab.init(params), params, batch=batch)
