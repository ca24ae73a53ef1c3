"""EBC's defaults on a zoo of real models: no refusals of healthy runs, the
base optimizer's loss, one compile per arm, and a random-token burst refused.

Every model is built by its own library (Hugging Face Flax GPT-2 and llama,
``eqx.nn``, linen auto-named / named / ``nn.scan``, NNX ``nnx.List`` /
``nnx.scan``, the repository's GPT), trained 300 steps per arm on identical
batches of a Markov language (``ebc_optax.experiments.zoo.compare``). Each
``compare`` runs once per session (memoised here), and all bases and the
burst run of a model share its two compiled programs, so the whole file costs
about one EBC compile per model.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest

from ebc_optax.experiments import data as data_lib
from ebc_optax.experiments import zoo
from conftest import next_token_loss, tiny_batch, tiny_params

STEPS = 300
MAX_REFUSED = 3  # 1% of STEPS
MAX_LOSS_RATIO = 1.01
BURST = (150, 10)
MIN_REFUSED_IN_BURST = 8
BASE_NAMES = ("adam", "adam_warmup", "prodigy")

# The library each model needs beyond flax.
NEEDS = {"hf_gpt2": "transformers", "hf_llama": "transformers",
         "equinox": "equinox"}

# Each model's blocks, as budget_layers names them.
BLOCK_LABELS = {
    "hf_gpt2": "transformer/h/{}",
    "hf_llama": "model/layers/{}",
    "equinox": "blocks/{}",
    "linen_auto": "params/Block_{}",
    "linen_named": "params/block_{}",
    "linen_scan": "params/ScanBlock_0/{}",
    "nnx_list": "blocks/{}",
    "nnx_scan": "blocks/{}",
    "repo_gpt": "blocks/{}",
}
# The rest of what each model budgets: its final norm (repo_gpt keeps it in
# its head). Embeddings and heads — named, or auto-named like linen's
# Dense_0 and told by their vocab-sized axis — are left out.
FINAL_NORM = {
    "hf_gpt2": ("transformer/ln_f",), "hf_llama": ("model/norm",),
    "equinox": ("ln_f",), "linen_auto": ("params/LayerNorm_0",),
    "linen_named": ("params/ln_f",), "linen_scan": ("params/ln_f",),
    "nnx_list": ("ln_f",), "nnx_scan": ("ln_f",), "repo_gpt": (),
}
MODEL_NAMES = tuple(zoo.MODELS)
GRID = [(m, b) for m in MODEL_NAMES for b in BASE_NAMES]
GRID_IDS = [f"{m}-{b}" for m, b in GRID]


def _skip_without_library(model_name):
  if model_name in NEEDS:
    pytest.importorskip(NEEDS[model_name])


@functools.cache
def _compare(model_name, base_name, burst=None):
  return zoo.compare(model_name, base_name, steps=STEPS, burst=burst)


def run(model_name, base_name, burst=None):
  _skip_without_library(model_name)
  return _compare(model_name, base_name, burst)


def _describe(r):
  return (f"{r['model']} × {r['base']}: refused {r['refused']} at "
          f"{r['refused_steps'][:20]}, cut {r['cut']}, loss EBC "
          f"{r['ebc_final']:.4f} / base {r['base_final']:.4f} = "
          f"{r['loss_ratio']:.4f}, rho [{r['rho_min']:.3g}, "
          f"{r['rho_max']:.3g}]")


# --- the models ---------------------------------------------------------------

def test_every_model_has_its_block_labels():
  assert set(BLOCK_LABELS) == set(FINAL_NORM) == set(zoo.MODELS)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_blocks_are_budgeted_one_layer_each(model_name):
  _skip_without_library(model_name)
  layers = zoo.budgeted_layers(model_name)
  blocks = tuple(BLOCK_LABELS[model_name].format(i)
                 for i in range(zoo.NUM_BLOCKS))
  assert sorted(layers) == sorted(blocks + FINAL_NORM[model_name]), layers


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_logits_have_the_zoo_shape(model_name):
  _skip_without_library(model_name)
  model = zoo.build(model_name)
  windows = zoo.training_windows(1)[0]
  logits = jax.jit(model.logits_fn)(model.params, windows[:, :-1])
  assert logits.shape == (zoo.BATCH_SIZE, zoo.SEQ_LEN, zoo.VOCAB_SIZE)
  assert np.all(np.isfinite(np.asarray(logits)))


# --- data and bases -----------------------------------------------------------

def test_windows_are_fixed_by_seed_and_burst_only_replaces_its_steps():
  a = zoo.training_windows(20, seed=0)
  b = zoo.training_windows(20, seed=0, burst=(5, 3))
  np.testing.assert_array_equal(a, zoo.training_windows(20, seed=0))
  assert not np.array_equal(a, zoo.training_windows(20, seed=1))
  same = np.all(a == b, axis=(1, 2))
  assert same.tolist() == [not 5 <= s < 8 for s in range(20)]
  assert a.dtype == np.int32 and a.min() >= 0 and a.max() < zoo.VOCAB_SIZE
  # Clean windows follow the language's transitions; random tokens do not.
  trans = data_lib.markov_language(seed=0, vocab_size=zoo.VOCAB_SIZE).transition
  allowed = trans[b[..., :-1], b[..., 1:]] > 0
  assert allowed[same].all() and not allowed[~same].all()


@pytest.mark.parametrize("base_name", BASE_NAMES)
def test_switched_base_is_the_base_alone(base_name):
  """``all_bases`` at a base's index computes what that base alone computes."""
  params = tiny_params(jax.random.PRNGKey(0))
  batch = tiny_batch(jax.random.PRNGKey(1))
  base = zoo.BASES[base_name]
  alone = optax.with_extra_args_support(base.optimizer())
  switched = zoo.all_bases()
  index = np.int32(zoo.family_index(base_name))

  def train(tx, **extra):
    @jax.jit
    def step(p, state, learning_rate):
      g = jax.grad(next_token_loss)(p, batch)
      u, state = tx.update(g, state, p, learning_rate=learning_rate, **extra)
      return optax.apply_updates(p, u), state

    p, state = params, tx.init(params)
    for s in range(5):
      p, state = step(p, state, np.float32(base.learning_rate(s)))
    return p

  # Equal up to rounding (the two programs fuse differently).
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5,
                                                       atol=1e-8),
               train(alone), train(switched, optimizer_index=index))


def test_unknown_names_are_errors_listing_the_choices():
  with pytest.raises(ValueError, match="adam_warmup"):
    zoo.compare("repo_gpt", "sgd", steps=1)
  with pytest.raises(ValueError, match="nnx_scan"):
    zoo.build("resnet")


# --- EBC's defaults against the base alone, 300 steps -------------------------

@pytest.mark.parametrize("model_name,base_name", GRID, ids=GRID_IDS)
def test_default_refuses_at_most_one_percent_of_healthy_steps(model_name,
                                                              base_name):
  r = run(model_name, base_name)
  assert r["refused"] <= MAX_REFUSED, _describe(r)


@pytest.mark.parametrize("model_name,base_name", GRID, ids=GRID_IDS)
def test_default_final_loss_within_one_percent_of_the_base(model_name,
                                                           base_name):
  r = run(model_name, base_name)
  assert np.isfinite(r["base_final"]) and np.isfinite(r["ebc_final"])
  assert abs(r["loss_ratio"] - 1.0) <= MAX_LOSS_RATIO - 1.0, _describe(r)


@pytest.mark.parametrize("model_name,base_name", GRID, ids=GRID_IDS)
def test_one_compile_per_arm(model_name, base_name):
  r = run(model_name, base_name)
  assert (r["compiles_base"], r["compiles_ebc"]) == (1, 1)


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_random_token_burst_is_refused(model_name):
  r = run(model_name, "adam", burst=BURST)
  start, length = BURST
  assert r["refused_in_burst"] >= MIN_REFUSED_IN_BURST, (
      f"{r['refused_in_burst']} of the {length} burst steps refused; "
      f"c in the burst {np.round(r['c'][start:start + length], 3).tolist()}; "
      + _describe(r))
  assert (r["compiles_base"], r["compiles_ebc"]) == (1, 1)


def test_spike_compare_pairs_each_guard_with_its_clean_run():
  """A 5-step burst once the loss has settled (the skip-step is warm): the
  left-out skip-step refuses it whole and is damaged far less than Adam; the
  clean runs skip nothing; the table pairs seeds and ratios to Adam; one
  program per guard serves every run."""
  rows = zoo.spike_compare("linen_auto", ("adam", "skipstep_leftout"),
                           bursts={"random": (195, 5)}, seeds=(0,), steps=220)
  by = {r["guard"]: r for r in rows}
  assert set(by) == {"adam", "skipstep_leftout"}
  assert by["skipstep_leftout"]["skipped_in_burst"] == 1.0
  assert by["adam"]["skipped_in_burst"] == 0.0
  assert by["skipstep_leftout"]["clean_skipped"] == 0
  assert by["skipstep_leftout"]["peak"] < 0.2 * by["adam"]["peak"]
  table = {t["guard"]: t for t in zoo.spike_table(rows)}
  assert table["adam"]["vs_adam"] == pytest.approx(1.0)
  assert table["skipstep_leftout"]["vs_adam"] == pytest.approx(
      by["skipstep_leftout"]["peak"] / by["adam"]["peak"])
  assert zoo.guard_arm("linen_auto", "skipstep_leftout").traces == [1]
  with pytest.raises(ValueError, match="guard must be one of"):
    zoo.guard_arm("linen_auto", "nope")
