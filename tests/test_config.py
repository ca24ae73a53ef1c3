"""from_config and the shipped defaults."""

import dataclasses
import json
import pathlib

import chex
import jax
import optax
import pytest

import ebc_optax
from conftest import next_token_loss, tiny_logits_fn

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
REFERENCE_KEYS = ("ebc_enable", "ebc_target_kl", "ebc_update_every",
                  "ebc_probe_layers", "ebc_beta_ema", "ebc_safety",
                  "ebc_aggregate", "ebc_center_logits", "ebc_include_embed_out")


def test_default_json_is_exactly_the_dataclass_defaults():
  shipped = json.loads((CONFIGS / "ebc_default.json").read_text())
  assert shipped == ebc_optax.EBCConfig().to_mapping()
  assert set(REFERENCE_KEYS) <= set(shipped)


def test_reference_defaults_match_the_seeds():
  cfg = ebc_optax.EBCConfig()
  assert (cfg.target_kl, cfg.update_every, cfg.probe_layers, cfg.beta_ema,
          cfg.safety, cfg.aggregate, cfg.center_logits,
          cfg.include_embed_out) == (0.05, 20, 2, 0.9, 1.05, "l1", True, False)


def test_unknown_key_is_an_error():
  with pytest.raises(ValueError, match="ebc_target_kll"):
    ebc_optax.from_config({"ebc_target_kll": 0.1}, tiny_logits_fn)


def test_bad_value_is_an_error_naming_the_key():
  with pytest.raises(ValueError, match="beta_ema"):
    ebc_optax.from_config({"ebc_beta_ema": 1.0}, tiny_logits_fn)
  with pytest.raises(ValueError, match="ebc_controller"):
    ebc_optax.from_config({"ebc_controller": "pid"}, tiny_logits_fn)


def test_from_config_equals_direct_construction(tiny):
  _, params, batch, _ = tiny
  cfg = {"ebc_target_kl": 0.02, "ebc_aggregate": "l2", "ebc_probe_every": 1,
         "ebc_controller": "none", "ebc_update_every": 1}
  a = ebc_optax.from_config(cfg, tiny_logits_fn)
  b = ebc_optax.ellipsotope_budget_clip(tiny_logits_fn, 0.02, aggregate="l2",
                                        probe_every=1, controller=None,
                                        update_every=1)
  grads = jax.grad(next_token_loss)(params, batch)
  ua, sa = a.update(grads, a.init(params), params, batch=batch)
  ub, sb = b.update(grads, b.init(params), params, batch=batch)
  chex.assert_trees_all_close((ua, sa), (ub, sb))


def test_disabled_is_identity_accepting_batch(tiny):
  _, params, batch, _ = tiny
  tx = ebc_optax.from_config({"ebc_enable": False}, tiny_logits_fn)
  tx = optax.chain(optax.sgd(1.0), tx)
  grads = jax.grad(next_token_loss)(params, batch)
  updates, _ = tx.update(grads, tx.init(params), params, batch=batch)
  chex.assert_trees_all_close(updates, jax.tree.map(lambda g: -g, grads))


def test_json_roundtrip(tmp_path):
  cfg = dataclasses.replace(ebc_optax.EBCConfig(), target_kl=0.1, guard=False)
  path = tmp_path / "c.json"
  path.write_text(json.dumps(cfg.to_mapping()))
  assert ebc_optax.EBCConfig.from_json(str(path)) == cfg


def _defaults(fn):
  import inspect
  return {name: p.default for name, p in inspect.signature(fn).parameters.items()
          if p.default is not inspect.Parameter.empty}


def test_the_front_door_and_the_controllers_default_to_ebc_config():
  """EBCConfig is the one source of the defaults: the front door's signature
  (``wrap`` passes its options through) and the controllers' agree with it."""
  cfg = dataclasses.asdict(ebc_optax.EBCConfig())
  front = _defaults(ebc_optax.ellipsotope_budget_clip)
  shared = sorted(set(front) & set(cfg) - {"target_kl"})
  assert len(shared) >= 20, shared
  assert {k: front[k] for k in shared} == {k: cfg[k] for k in shared}
  assert front["target_kl"] is None  # None: the default below
  assert cfg["target_kl"] == ebc_optax._transform.DEFAULT_TARGET_KL
  for prefix, fn in (("rel_", ebc_optax.controllers.relative_radius),
                     ("pi_", ebc_optax.controllers.pi_controller),
                     ("tr_", ebc_optax.controllers.trust_region_radius)):
    mine = {k[len(prefix):]: v for k, v in cfg.items() if k.startswith(prefix)}
    got = _defaults(fn)
    assert {k: got[k] for k in mine} == mine, prefix


def test_the_knob_table_is_every_config_field_with_its_default():
  """The configuration guide's table is generated from ``EBCConfig``: every
  field has a meaning, and every row shows the field's default."""
  from ebc_optax import _config
  fields = dataclasses.fields(ebc_optax.EBCConfig)
  assert set(_config.KNOB_HELP) == {f.name for f in fields}
  rows = _config.knob_table().splitlines()[2:]
  assert len(rows) == len(fields)
  for row, field in zip(rows, fields):
    cells = [c.strip() for c in row.strip("|").split(" | ")]
    assert cells[0] == f"`{field.name}`" and cells[1] == f"`ebc_{field.name}`"
    assert cells[2].strip("`").strip('"') == str(field.default), cells
  guide = (CONFIGS.parent / "docs" / "guides" / "configuration.md").read_text()
  assert "_generated/knobs.md" in guide
