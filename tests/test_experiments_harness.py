"""The harness end to end on tiny sizes: config, trainer, resume, sample, sweeps."""

import csv
import json
import math
import pathlib

import jax
import numpy as np
import pytest

from ebc_optax.experiments import cli
from ebc_optax.experiments import config as config_lib
from ebc_optax.experiments import sweeps
from ebc_optax.experiments import train as train_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SMOKE = ROOT / "configs" / "smoke.json"


def smoke(*sets):
  return config_lib.load(SMOKE, sets)


# --- config --------------------------------------------------------------------

def test_shipped_configs_load_and_match_the_spec():
  gpu = config_lib.load(ROOT / "configs" / "shakespeare_char.json")
  assert (gpu.model.num_blocks, gpu.model.d_embed, gpu.model.num_heads,
          gpu.model.seq_len, gpu.train.batch_size, gpu.train.steps,
          gpu.optim.optimizer, gpu.optim.lr, gpu.model.param_dtype) == (
              3, 128, 4, 256, 64, 2000, "adam", 2e-3, "bfloat16")
  cpu = config_lib.load(ROOT / "configs" / "shakespeare_char_cpu.json")
  assert cpu.model == config_lib.dataclasses.replace(
      gpu.model, seq_len=cpu.model.seq_len, param_dtype="float32")
  smoke()


def test_unknown_keys_and_bad_values_are_errors(tmp_path):
  with pytest.raises(ValueError, match="Unknown key"):
    config_lib.load(None, ["model.depth=3"])
  with pytest.raises(ValueError, match="Unknown config section"):
    config_lib.load(None, ["modle.num_blocks=3"])
  with pytest.raises(ValueError, match=r"optim.optimizer must be one of"):
    config_lib.load(None, ["optim.optimizer=\"lion\""])
  with pytest.raises(ValueError, match="Unknown EBC config|Unknown key"):
    config_lib.load(None, ["ebc.target=0.1"])
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"train": {"stepz": 3}}))
  with pytest.raises(ValueError, match="stepz"):
    config_lib.load(bad)


def test_set_overrides_parse_json_values():
  cfg = config_lib.load(SMOKE, ["optim.lr=0.01", "model.positions=learned",
                                "ebc.controller=none"])
  assert cfg.optim.lr == 0.01 and cfg.model.positions == "learned"
  assert cfg.ebc.controller == "none"


# --- trainer -------------------------------------------------------------------

def test_training_with_ebc_reduces_loss_and_logs_everything(tmp_path):
  cfg = smoke("train.steps=40", "optim.lr=0.01")
  summary = train_lib.train(cfg, tmp_path / "run")
  records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert summary["status"] == "ok" and summary["steps"] == 40
  assert records[-1]["train_loss"] < records[0]["train_loss"]
  for key in ("train_loss", "train_acc", "c", "S", "tau", "delta", "applied_kl",
              "rho", "beta", "contribution", "eta_eff", "tokens_per_s",
              "probe_fraction"):
    assert key in records[-1], key
  assert any("val_ppl" in r for r in records)
  assert len(records[-1]["beta"]) == cfg.model.num_blocks
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert config_lib.from_dict(saved) == cfg
  for key in ("val_loss", "val_ppl", "accept_rate", "avg_c", "c_p10", "c_p50",
              "c_p90", "eta_eff_mean", "applied_kl_mean", "tokens_per_s",
              "probe_fraction", "entropy_floor"):
    assert summary[key] is not None, key
  assert summary["val_loss"] > summary["entropy_floor"]


def test_resume_after_kill_reaches_the_uninterrupted_parameters(tmp_path):
  cfg = smoke("train.steps=24", "train.checkpoint_every=10")
  full = train_lib.train(cfg, tmp_path / "full")
  # "Kill" after 13 steps (the checkpoint at step 10 is the last one written
  # before the kill, plus the final-of-segment one), then resume.
  part = train_lib.train(cfg, tmp_path / "part", stop_after=13)
  assert part["status"] == "stopped"
  resumed = train_lib.train(cfg, tmp_path / "part", resume=True)
  assert resumed["steps"] == full["steps"] == 24

  def final_params(run_dir):
    run = train_lib.build_run(cfg)
    ckpt = train_lib.latest_checkpoint(run_dir)
    return train_lib.restore_checkpoint(ckpt, run.params, run.tx.init(run.params))[:2]

  (p_full, s_full), (p_res, s_res) = final_params(tmp_path / "full"), final_params(tmp_path / "part")
  jax.tree.map(np.testing.assert_array_equal, p_full, p_res)
  jax.tree.map(np.testing.assert_array_equal, s_full, s_res)
  assert full["val_loss"] == resumed["val_loss"]
  steps = [json.loads(l)["step"] for l in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()]
  assert steps == sorted(set(steps))  # append-only, no duplicates after resume


def test_sample_prints_text(tmp_path, capsys):
  cfg = smoke("train.steps=5")
  train_lib.train(cfg, tmp_path / "run")
  assert cli.main(["sample", "--checkpoint", str(tmp_path / "run"),
                   "--prompt", "abc", "--length", "20"]) == 0
  out = capsys.readouterr().out.strip()
  assert out.startswith("abc") and len(out) == 23


def test_diverging_run_is_marked_and_the_sweep_continues(tmp_path):
  base = smoke("train.steps=25", "train.diverge_loss=6.0", "optim.optimizer=\"sgd\"",
               "optim.lr=300.0", "train.checkpoint_every=0")
  arms = [
      sweeps.Arm("huge_lr_baseline", sweeps.with_values(base, optim={"clip": "none"}), {"ebc": 0}),
      sweeps.Arm("huge_lr_ebc", sweeps.with_values(
          base, optim={"clip": "ebc"}, ebc={"target_kl": 0.01}), {"ebc": 1}),
  ]
  rows = sweeps.run_arms(arms, tmp_path, progress=False)
  assert rows[0]["status"] == "diverged" and rows[0]["diverged"]
  assert rows[1]["status"] == "ok"
  assert math.isfinite(rows[1]["val_loss"]) and rows[1]["val_loss"] < 6.0


# --- commands ------------------------------------------------------------------

def test_ablate_prints_the_reference_columns(tmp_path, capsys):
  assert cli.main(["ablate", "--steps", "3", "--out", str(tmp_path),
                   "--set", "model.d_embed=16", "--set", "model.num_heads=2",
                   "--set", "model.seq_len=16"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith("optimizer,ebc,spectral,final_loss,final_acc,ebc_c")
  rows = [l.split(",") for l in lines[1:]]
  assert len(rows) == 8
  assert {(r[0], r[1], r[2]) for r in rows} == {
      (o, e, s) for o in ("adam", "muon") for e in ("0", "1") for s in ("none", "spec")}


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="shared tinyshakespeare.txt missing")
def test_shakespeare_ablation_writes_every_promised_file(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("EBC_OPTAX_DATA", str(SHAKESPEARE))
  out = tmp_path / "sweep"
  argv = ["shakespeare-ablation", "--steps", "4", "--batch_size", "4", "--seq_len", "16",
          "--num_blocks", "2", "--d_embed", "16", "--num_heads", "2",
          "--optimizers", "adam", "--spectral", "none", "--ebc", "off,on",
          "--deltas", "0.05", "--aggregates", "l1", "--out", str(out), "--no-progress",
          "--set", "train.eval_batches=1"]
  assert cli.main(argv) == 0
  for name in ("summary.csv", "results.json", "pareto_ppl_vs_avgc.png",
               "adam_none_baseline_loss.png", "adam_none_ebc_d0.05_l1_loss.png",
               "adam_none_ebc_d0.05_l1_clip.png"):
    assert (out / name).exists(), name
  with open(out / "summary.csv") as f:
    rows = list(csv.DictReader(f))
  assert {r["run"] for r in rows} == {"adam_none_baseline", "adam_none_ebc_d0.05_l1"}
  for col in ("wall_s", "val_loss", "val_acc", "val_ppl", "accept_rate", "avg_c",
              "c_p10", "c_p50", "c_p90", "applied_kl_mean", "target_kl",
              "eta_eff_mean", "tokens_per_s", "probe_fraction", "diverged"):
    assert col in rows[0], col
  # Rerunning the same sweep skips finished runs (resumable).
  mtime = (out / "adam_none_baseline" / "summary.json").stat().st_mtime
  assert cli.main(argv) == 0
  assert (out / "adam_none_baseline" / "summary.json").stat().st_mtime == mtime
  assert cli.main(["plot", str(out)]) == 0


def test_cli_errors_are_clear(capsys):
  assert cli.main(["train", "--set", "optim.clip=\"sometimes\""]) == 2
  assert "optim.clip must be one of" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    cli.main(["--help"])


def test_autopilot_runs_every_stage_and_resumes(tmp_path, capsys):
  out = tmp_path / "auto"
  argv = ["autopilot", "--config", str(SMOKE), "--set", "train.steps=6",
          "--set", "train.checkpoint_every=0", "--warmup_steps", "3",
          "--lr_multipliers", "0.5,1", "--deltas", "0.05", "--lr_scales", "2",
          "--seeds", "0", "--out", str(out), "--no-progress"]
  assert cli.main(argv) == 0
  decisions = json.loads((out / "auto_decisions.json").read_text())
  assert set(decisions) >= {"stage1", "stage2", "stage2b", "stage3"}
  assert decisions["stage2"]["delta"] == 0.05 and decisions["stage2b"]["lr_scale"] == 2.0
  for name in ("summary_final.csv", "results_final.json"):
    assert (out / name).exists(), name
  assert len(list((out / "final").glob("*_loss.png"))) == 2
  stage_runs = {p.parent.name for p in out.glob("*/*/summary.json")}
  assert len(stage_runs) == 2 + 1 + 3 + 2
  # A rerun resumes: nothing is trained again.
  mtimes = {p: p.stat().st_mtime for p in out.glob("*/*/summary.json")}
  assert cli.main(argv) == 0
  assert all(p.stat().st_mtime == t for p, t in mtimes.items())
