"""The harness end to end on tiny sizes: config, trainer, resume, sample, sweeps."""

import csv
import json
import math
import os
import pathlib
import time

import jax
import numpy as np
import pytest

from ebc_optax.experiments import cli
from ebc_optax.experiments import config as config_lib
from ebc_optax.experiments import optim as optim_lib
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

def test_training_with_ebc_reduces_loss_and_logs_everything(tmp_path, capsys):
  cfg = smoke("train.steps=40", "optim.lr=0.01", "log.progress=true")
  summary = train_lib.train(cfg, tmp_path / "run", progress_prefix="smoke ")
  bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
  assert any(l.startswith("smoke: 100%") and "40/40" in l and "loss " in l
             for l in bar), bar[-3:]
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


def _tensorboard_scalars(log_dir: pathlib.Path) -> dict[str, dict[int, float]]:
  """Every scalar of the TensorBoard event files under ``log_dir``, read
  straight from their TFRecord framing (length, crc, event, crc)."""
  import struct
  from tensorboardX.proto import event_pb2
  out: dict[str, dict[int, float]] = {}
  for path in sorted(log_dir.glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 16 + length
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = v.simple_value
  return out


def test_metrics_are_also_written_for_tensorboard_when_asked(tmp_path):
  cfg = smoke("train.steps=20", "log.log_interval=5", "log.tensorboard=true")
  train_lib.train(cfg, tmp_path / "run")
  records = [json.loads(l) for l in
             (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  tb = _tensorboard_scalars(tmp_path / "run" / "tensorboard")
  assert {r["step"] for r in records} == set(tb["train_loss"])
  for r in records:
    assert tb["train_loss"][r["step"]] == pytest.approx(r["train_loss"], rel=1e-6)
    assert tb["beta/0"][r["step"]] == pytest.approx(r["beta"][0], rel=1e-6)
  assert not (tmp_path / "plain").exists()
  train_lib.train(smoke("train.steps=5"), tmp_path / "plain")
  assert not (tmp_path / "plain" / "tensorboard").exists()


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
          base, optim={"clip": "ebc"}, ebc={"target_kl": 0.01, "controller": "pi"}),
          {"ebc": 1}),
  ]
  rows = sweeps.run_arms(arms, tmp_path, progress=False)
  assert rows[0]["status"] == "diverged" and rows[0]["diverged"]
  assert rows[1]["status"] == "ok"
  assert math.isfinite(rows[1]["val_loss"]) and rows[1]["val_loss"] < 6.0


# --- commands ------------------------------------------------------------------

def test_ablate_prints_the_reference_columns(tmp_path, capsys):
  assert cli.main(["ablate", "--steps", "3", "--out", str(tmp_path),
                   "--set", "model.d_embed=16", "--set", "model.num_heads=2",
                   "--set", "model.seq_len=16", "--set", "model.num_blocks=1"]) == 0
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


# --- energy-budget clipping arm ------------------------------------------------

def test_energy_arm_config_and_chain():
  assert "energy" in optim_lib.CLIP_ARMS
  cfg = smoke("optim.clip=\"energy\"", "optim.energy_ratio=0.05")
  assert cfg.optim.energy_ratio == 0.05 and config_lib.Config().optim.energy_ratio == 0.1
  for bad in ("0", "-0.1", "\"x\"", "true"):
    with pytest.raises(ValueError, match=r"optim.energy_ratio must be in \(0, inf\)"):
      smoke("optim.clip=\"energy\"", f"optim.energy_ratio={bad}")
  from ebc_optax._energy import EnergyBudgetClipState
  run = train_lib.build_run(cfg)
  state = run.tx.init(run.params)
  # The energy clip comes first in the chain, before the base optimizer.
  assert isinstance(state[0], EnergyBudgetClipState)
  assert state[0].energy_scale.shape == (len(run.energy_layers),)
  assert set(run.energy_layers) == set(
      jax.tree.leaves(train_lib.ebc_optax.layers.default_layer_labels(run.params)))


def test_training_with_energy_clip_logs_the_ratios(tmp_path):
  cfg = smoke("optim.clip=\"energy\"", "train.steps=30", "optim.lr=0.01",
              "optim.energy_ratio=0.05")
  summary = train_lib.train(cfg, tmp_path / "run")
  records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert summary["status"] == "ok" and summary["steps"] == 30
  assert records[-1]["train_loss"] < records[0]["train_loss"]
  layers = {"tok_embed", "blocks/0", "blocks/1", "lm_head"}
  for r in records:
    assert set(r["energy_ratios"]) == layers and set(r["energy_scale"]) == layers
    finite = [v for v in r["energy_ratios"].values() if v is not None]
    assert r["energy_ratio_max"] == pytest.approx(max(finite))
    assert all(0 < s <= 1 for s in r["energy_scale"].values())
    # A layer was clipped exactly when its ratio exceeded the budget.
    for label, ratio in r["energy_ratios"].items():
      assert (r["energy_scale"][label] < 1) == (ratio > 0.05), (label, r)
    assert "c" not in r  # no EBC telemetry in this arm
  assert records[-1]["energy_clipped_steps"] >= 1
  assert 0 < summary["energy_clip_rate"] <= 1
  assert summary["energy_ratio"] == 0.05 and summary["energy_ratio_max_median"] > 0
  # Resuming an energy run works like any other (the state is in the checkpoint).
  assert train_lib.train(cfg, tmp_path / "run", resume=True)["steps"] == 30


def test_runners_accept_the_clip_arms(tmp_path):
  base = smoke()
  grid = dict(optimizers=["adam"], spectral=["none"], deltas=[0.05],
              aggregates=["l1"], lrs=[0.003], lr_scales=[1.0], seeds=[0],
              controller="on")
  arms = sweeps.shakespeare_arms(base, clips=["none", "global", "ebc", "energy"],
                                 energy_ratios=[0.1, 0.2], **grid)
  assert [a.name for a in arms] == [
      "adam_none_baseline", "adam_none_global1", "adam_none_ebc_d0.05_l1",
      "adam_none_energy_r0.1", "adam_none_energy_r0.2"]
  assert [a.cfg.optim.clip for a in arms] == ["none", "global", "ebc", "energy", "energy"]
  assert [a.labels["energy_ratio"] for a in arms] == [None, None, None, 0.1, 0.2]
  assert arms[3].cfg.optim.energy_ratio == 0.1
  # The older --ebc off,on still gives the same arms as --clips none,ebc.
  legacy = sweeps.shakespeare_arms(base, ebc=["off", "on"], **grid)
  assert [a.name for a in legacy] == [a.name for a in sweeps.shakespeare_arms(
      base, clips=["none", "ebc"], **grid)] == ["adam_none_baseline",
                                                "adam_none_ebc_d0.05_l1"]
  assert [a.name for a in sweeps.shakespeare_arms(base, **grid)] == [a.name for a in legacy]
  with pytest.raises(ValueError, match="give one of them"):
    sweeps.shakespeare_arms(base, ebc=["on"], clips=["energy"], **grid)
  with pytest.raises(ValueError, match="--clips values must be in"):
    sweeps.shakespeare_arms(base, clips=["spectral"], **grid)
  with pytest.raises(ValueError, match="--ebc values must be 'off' or 'on'"):
    sweeps.shakespeare_arms(base, ebc=["maybe"], **grid)


def test_shakespeare_ablation_runs_global_and_energy_arms(tmp_path, capsys):
  text = tmp_path / "corpus.txt"
  rng = np.random.default_rng(0)
  text.write_text("".join(rng.choice(list("abcdefgh \n"), size=20_000)))
  out = tmp_path / "sweep"
  argv = ["shakespeare-ablation", "--data-path", str(text), "--steps", "4",
          "--batch_size", "4", "--seq_len", "16", "--num_blocks", "2",
          "--d_embed", "16", "--num_heads", "2", "--optimizers", "adam",
          "--spectral", "none", "--clips", "global,energy", "--out", str(out),
          "--no-progress", "--set", "train.eval_batches=1",
          "--set", "train.checkpoint_every=0"]
  assert cli.main(argv) == 0
  with open(out / "summary.csv") as f:
    rows = {r["run"]: r for r in csv.DictReader(f)}
  assert set(rows) == {"adam_none_global1", "adam_none_energy_r0.1"}
  energy = rows["adam_none_energy_r0.1"]
  assert energy["clip"] == "energy" and energy["energy_ratio"] == "0.1"
  assert energy["status"] == "ok" and float(energy["energy_ratio_max_median"]) > 0
  assert rows["adam_none_global1"]["clip"] == "global"
  # --ebc and --clips together are refused with a clear message.
  assert cli.main(argv + ["--ebc", "on"]) == 2
  assert "give one of them" in capsys.readouterr().err


def test_ablate_takes_the_energy_arm(tmp_path, monkeypatch, capsys):
  # The ablate grid itself is exercised by test_ablate_prints_the_reference_columns;
  # here only the arms it builds (training is stubbed out).
  seen = []

  def fake_run_arms(arms, out_dir, progress=False):
    seen.extend(arms)
    return [{"val_loss": 1.0, "val_acc": 0.5, "avg_c": 1.0, "entropy_floor": 0.5}
            for _ in arms]

  monkeypatch.setattr(sweeps, "run_arms", fake_run_arms)
  assert cli.main(["ablate", "--steps", "2", "--out", str(tmp_path),
                   "--clips", "none,energy"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith("optimizer,ebc,spectral,final_loss,final_acc,ebc_c")
  assert lines[0].endswith(",clip")
  rows = {(r[0], r[1], r[2], r[-1]) for r in (l.split(",") for l in lines[1:])}
  assert rows == {(o, "0", s, c) for o in ("adam", "muon") for s in ("none", "spec")
                  for c in ("none", "energy")}
  assert {a.name for a in seen} >= {"adam_ebc0_none", "adam_energy_none",
                                    "muon_energy_spec"}
  assert {a.cfg.optim.clip for a in seen} == {"none", "energy"}
  assert cli.main(["ablate", "--clips", "clip_everything", "--out", str(tmp_path)]) == 2
  assert "--clips values must be in" in capsys.readouterr().err


# --- trust-region arm and the study ----------------------------------------------

def test_training_with_the_trust_region_radius_logs_its_decisions(tmp_path):
  cfg = smoke("ebc.controller=\"trust_region\"", "ebc.aggregate=\"exact\"",
              "ebc.kl=\"fisher\"", "ebc.target_kl=0.001", "ebc.probe_every=2",
              "optim.lr=0.01")
  summary = train_lib.train(cfg, tmp_path / "run")
  assert summary["status"] == "ok"
  records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").open()]
  last = records[-1]
  assert last["tr_shrunk"] + last["tr_grown"] >= 1
  assert last["probe_count"] == 15
  deltas = {r["delta"] for r in records}
  assert len(deltas) > 1  # the radius moved from its start
  # The applied KL is compared with the δ in use, not with the start value.
  assert summary["applied_kl_ref_mean"] != pytest.approx(0.001)
  assert 0 <= summary["applied_kl_within_30pct"] <= 1


def test_next_token_loss_is_the_training_loss_within_the_inputs():
  from ebc_optax.experiments import optim
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 7, (3, 9))
  logits = rng.normal(size=(3, 9, 7)).astype(np.float32)
  logp = logits[:, :-1] - np.log(np.exp(logits[:, :-1]).sum(-1, keepdims=True))
  want = -np.mean(np.take_along_axis(logp, tokens[:, 1:, None], -1))
  assert float(optim.next_token_loss(logits, tokens)) == pytest.approx(want, rel=1e-5)


# --- scanned blocks ------------------------------------------------------------

def _first_steps(cfg, steps):
  run = train_lib.build_run(cfg)
  train_step = train_lib.make_train_step(run)
  params, state = run.params, run.tx.init(run.params)
  losses, first = [], None
  for step in range(steps):
    params, state, metrics = train_step(params, state, step)
    losses.append(float(metrics["loss"]))
    if step == 0:
      first = {k: np.asarray(v) for k, v in metrics.items()}
  return run, losses, first


@pytest.mark.parametrize("clip", ["ebc", "energy"])
def test_scanned_and_unrolled_gpt_train_alike(clip):
  """Same seed, scan_layers on and off: same budgeted layers, β, c, losses."""
  sets = ("optim.lr=0.01", f"optim.clip=\"{clip}\"", "ebc.target_kl=0.001",
          "ebc.controller=\"none\"")
  run_u, loss_u, first_u = _first_steps(smoke(*sets), 6)
  run_s, loss_s, first_s = _first_steps(smoke(*sets, "model.scan_layers=true"), 6)
  assert run_s.layers == run_u.layers
  assert run_s.energy_layers == run_u.energy_layers
  assert np.asarray(run_s.params["blocks"]["attn"]["qkv"]["kernel"]).shape[0] == (
      run_u.cfg.model.num_blocks)
  keys = ("beta", "c") if clip == "ebc" else ("energy_ratio", "energy_scale")
  for key in keys:
    np.testing.assert_allclose(first_s[key], first_u[key], rtol=1e-4, atol=1e-7)
  if clip == "ebc":
    assert float(first_u["c"]) < 1 and first_u["beta"].shape == (
        run_u.cfg.model.num_blocks,)
  np.testing.assert_allclose(loss_s, loss_u, rtol=1e-4)
  assert np.all(np.isfinite(loss_u)) and len(set(loss_u)) == len(loss_u)


def test_scan_layers_with_a_spectral_projection_is_an_error():
  with pytest.raises(ValueError, match="scan_layers"):
    smoke("model.scan_layers=true", "optim.spectral=\"hard_cap\"")


def test_run_of_rejected_gradients_ends_as_stalled(tmp_path, monkeypatch):
  """Finite loss, NaN gradients: wrap rejects each, the run ends 'stalled'."""
  import jax.numpy as jnp

  @jax.custom_jvp
  def nan_gradient(x):
    return x

  nan_gradient.defjvp(lambda primals, tangents: (primals[0],
                                                 tangents[0] * jnp.nan))
  original = train_lib.cross_entropy
  monkeypatch.setattr(train_lib, "cross_entropy",
                      lambda logits, targets: original(nan_gradient(logits), targets))
  cfg = smoke("train.steps=30", "train.stall_steps=4")
  summary = train_lib.train(cfg, tmp_path / "run")
  assert summary["status"] == "stalled" and summary["stalled"]
  assert summary["rejected_gradients"] == 4 and summary["steps"] == 4
  assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "stalled"


def test_help_shows_each_default_once_and_version(capsys):
  import ebc_optax
  parser = cli.build_parser()
  sub = next(a for a in parser._actions if a.dest == "command")
  for name, p in sub.choices.items():
    fmt = p._get_formatter()
    for action in p._actions:
      shown = fmt._get_help_string(action) or ""
      assert shown.count("(default:") <= 1, (name, action.dest, shown)
      assert "['" not in shown and "[0" not in shown, (name, action.dest, shown)
  ablate = sub.choices["ablate"]
  clips = next(a for a in ablate._actions if a.dest == "clips")
  assert ablate._get_formatter()._get_help_string(clips).endswith(
      "(default: none,ebc)")
  with pytest.raises(SystemExit) as e:
    cli.main(["--version"])
  assert e.value.code == 0
  assert capsys.readouterr().out.strip() == f"ebc-optax {ebc_optax.__version__}"


def test_kill_during_a_checkpoint_write_resumes_to_the_uninterrupted_run(
    tmp_path, monkeypatch):
  """The process dies half-way through writing the step-20 checkpoint: the
  partial one is ignored, the run resumes from step 10 and ends where an
  uninterrupted run ends."""
  cfg = smoke("train.steps=24", "train.checkpoint_every=10")
  full = train_lib.train(cfg, tmp_path / "full")
  real_save = train_lib.save_checkpoint

  class Killed(BaseException):
    pass

  def dying_save(run_dir, step, params, opt_state, host_state):
    if step < 20:
      return real_save(run_dir, step, params, opt_state, host_state)
    real_save(run_dir, step, params, opt_state, host_state)  # the arrays land ...
    (run_dir / "checkpoints" / f"{step:08d}" / "host_state.json").unlink()
    raise Killed  # ... and the process dies before the checkpoint is complete

  monkeypatch.setattr(train_lib, "save_checkpoint", dying_save)
  with pytest.raises(Killed):
    train_lib.train(cfg, tmp_path / "part")
  monkeypatch.setattr(train_lib, "save_checkpoint", real_save)
  assert train_lib.latest_checkpoint(tmp_path / "part").name == f"{10:08d}"
  resumed = train_lib.train(cfg, tmp_path / "part", resume=True)
  assert resumed["steps"] == 24 and resumed["val_loss"] == full["val_loss"]
  run = train_lib.build_run(cfg)
  template = (run.params, run.tx.init(run.params))
  got = train_lib.restore_checkpoint(train_lib.latest_checkpoint(tmp_path / "part"),
                                     *template)[:2]
  want = train_lib.restore_checkpoint(train_lib.latest_checkpoint(tmp_path / "full"),
                                      *template)[:2]
  jax.tree.map(np.testing.assert_array_equal, got, want)


# --- the spike guards -------------------------------------------------------------

@pytest.mark.parametrize("sets", [
    ['optim.clip="skip_step"', "optim.skip_keep_skipped=false"],
    ['optim.clip="zclip"'], ['optim.clip="agc"'], ['optim.clip="update_clip"'],
    ['optim.clip="global"'], ['optim.optimizer="spam"'],
    ['optim.optimizer="stable_adamw"'],
    ['optim.clip="ebc"', "optim.ebc_skip_refused=false"]])
def test_every_spike_guard_trains_and_counts_its_decisions(tmp_path, sets):
  cfg = smoke(*sets, "train.steps=30", 'train.burst="random"',
              "train.burst_start=12", "train.burst_steps=3")
  summary = train_lib.train(cfg, tmp_path / "run")
  assert summary["status"] == "ok" and summary["steps"] == 30
  assert math.isfinite(summary["val_loss"])
  assert len(summary["burst_decisions"]) == 3
  assert set(summary["burst_decisions"]) <= {0, 1, 2}
  assert 0 <= summary["guard_skipped"] + summary["guard_clipped"] <= 30


def test_peer_guards_are_validated_against_the_schedule_free_base():
  with pytest.raises(ValueError, match="not built around the schedule-free"):
    smoke('optim.optimizer="schedule_free"', 'optim.clip="zclip"')


def test_a_killed_sweeps_workers_exit_with_it():
  """A worker pool's parent killed mid-run (SIGKILL: no cleanup runs) takes
  its workers with it: none is left training, holding a core and memory."""
  import subprocess
  import sys
  parent = subprocess.Popen([sys.executable, "-c", """
import concurrent.futures, multiprocessing, os, sys, time
from ebc_optax.experiments import sweeps
ctx = multiprocessing.get_context("spawn")
pool = concurrent.futures.ProcessPoolExecutor(
    1, mp_context=ctx, initializer=sweeps._pin_worker,
    initargs=(ctx.Value("i", 0), [], os.getpid()))
print(pool.submit(os.getpid).result(), flush=True)
pool.submit(time.sleep, 120)
time.sleep(120)
"""], stdout=subprocess.PIPE, text=True)
  worker = int(parent.stdout.readline())
  os.kill(worker, 0)  # alive
  parent.kill()
  parent.wait()
  deadline = time.monotonic() + 20
  while time.monotonic() < deadline:
    if not _running(worker):
      return
    time.sleep(0.2)
  os.kill(worker, 9)
  raise AssertionError("the worker outlived its killed parent")


def _running(pid: int) -> bool:
  """Whether ``pid`` exists and is not a zombie (an exited process the
  container's init has not reaped yet)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  stat = pathlib.Path(f"/proc/{pid}/stat")
  try:
    return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:  # gone since, or no /proc at all (macOS): it exists
    return not pathlib.Path("/proc").is_dir()
