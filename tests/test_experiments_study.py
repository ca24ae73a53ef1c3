"""The study and the spike suite on tiny sizes: peers, bursts, tables,
resumption, parallel runs, and the burst kinds themselves."""

import csv
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ebc_optax.experiments import bursts
from ebc_optax.experiments import cli
from ebc_optax.experiments import config as config_lib
from ebc_optax.experiments import optim
from ebc_optax.experiments import spikes
from ebc_optax.experiments import study
from ebc_optax.experiments import study_design
from ebc_optax.experiments import study_stats
from ebc_optax.experiments import sweeps
from ebc_optax.experiments import train as train_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.json"


def _base(steps=6, **train):
  base = json.loads(SMOKE.read_text())
  base["optim"]["clip"] = "none"
  base["train"].update(steps=steps, eval_interval=steps, checkpoint_every=0,
                       **train)
  return base


# --- bursts ----------------------------------------------------------------------

def test_burst_kinds_corrupt_as_documented():
  key = jax.random.PRNGKey(0)
  inputs = jax.random.randint(key, (4, 9), 0, 20)
  targets = jnp.roll(inputs, -1, axis=1)
  i, t = bursts.corrupt_batch("repeat", inputs, targets, key, 20)
  assert len(np.unique(np.asarray(i))) == 1 and (i == t).all()
  i, t = bursts.corrupt_batch("random", inputs, targets, key, 20)
  assert i.shape == (4, 9) and (i[:, 1:] == t[:, :-1]).all()
  assert not (i == inputs).all()
  i, t = bursts.corrupt_batch("shuffle", inputs, targets, key, 20)
  assert (i == inputs).all() and not (t == targets).all()
  np.testing.assert_array_equal(np.sort(t, axis=1), np.sort(targets, axis=1))
  other = jnp.asarray(bursts.other_distribution(20, 500))
  i, t = bursts.corrupt_batch("markov", inputs, targets, key, 20, other)
  assert (i[:, 1:] == t[:, :-1]).all() and int(i.max()) < 20
  with pytest.raises(ValueError, match="kind must be one of"):
    bursts.corrupt_batch("lr", inputs, targets, key, 20)


def test_burst_window_and_lr_schedule():
  steps = jnp.arange(10)
  np.testing.assert_array_equal(bursts.in_burst(steps, 3, 2),
                                [s in (3, 4) for s in range(10)])
  clean = jnp.zeros((2, 3), jnp.int32)
  for step in range(6):
    i, _ = bursts.burst_batch("repeat", jnp.int32(step), clean + 7, clean + 7,
                              jax.random.PRNGKey(1), start=2, steps=2,
                              vocab_size=5)
    assert bool((i == 7).all()) == (step not in (2, 3))
  lr = bursts.learning_rate(0.1, "lr", start=2, steps=2, factor=30.0)
  assert [float(lr(c)) for c in range(5)] == pytest.approx(
      [0.1, 0.1, 3.0, 3.0, 0.1])
  assert bursts.learning_rate(0.1, "random", start=2, steps=2, factor=30.0) == 0.1


def test_long_recurring_and_quarter_kinds():
  """The kinds that break median and z-score detectors: their own lengths,
  one bad batch every 50 steps, a quarter of the rows."""
  assert [bursts.burst_length(k, 10) for k in ("random", "long20", "long50",
                                               "recurring", "quarter")] == [
      10, 20, 50, 451, 100]
  assert bursts.bad_steps("recurring", 100, 451) == list(range(100, 551, 50))
  assert bursts.bad_steps("long20", 5, 20) == list(range(5, 25))
  key = jax.random.PRNGKey(0)
  inputs = jax.random.randint(key, (8, 9), 0, 20)
  targets = jnp.roll(inputs, -1, axis=1)
  i, t = bursts.corrupt_batch("quarter", inputs, targets, key, 20)
  assert (i[2:] == inputs[2:]).all() and (t[2:] == targets[2:]).all()
  assert not (i[:2] == inputs[:2]).all() and (i[:2, 1:] == t[:2, :-1]).all()
  clean = jnp.zeros((2, 3), jnp.int32) + 7
  hits = [s for s in range(0, 200)
          if not bool((bursts.burst_batch("recurring", jnp.int32(s), clean, clean,
                                           key, start=20, steps=451,
                                           vocab_size=5)[0] == 7).all())]
  assert hits == [20, 70, 120, 170]
  # Evaluations: before, inside (after each bad batch) and after the last one.
  pts = bursts.eval_points("recurring", 20, 10, (0, 10), 1000)
  assert pts == (19, 20, 70, 120, 170, 220, 270, 320, 370, 420, 470, 480)
  assert bursts.eval_points("quarter", 20, 10, (0, 10), 1000) == (
      19, 44, 69, 94, 119, 129)
  union = bursts.all_eval_points(20, 10, (0, 10), 1000)
  assert set(pts) <= set(union) and set(
      bursts.eval_points("lr", 20, 10, (0, 10), 1000)) <= set(union)
  cfg = config_lib.load(SMOKE, ['train.burst="long50"', "train.steps=100",
                                "train.burst_start=10"])
  assert cfg.train.burst_window == (10, 50)
  with pytest.raises(ValueError, match="inside the run"):
    config_lib.load(SMOKE, ['train.burst="quarter"', "train.steps=100",
                            "train.burst_start=10"])


def test_burst_metrics_count_the_guards_decisions():
  run = {"evals": [[4, 1.0], [5, 1.5], [10, 1.2], [14, 1.0]], "val_loss": 1.0,
         "burst_decisions": [2, 0, 0, 0, 0, 1]}
  ref = {"evals": [[4, 1.0], [5, 1.0], [10, 1.0], [14, 1.0]], "val_loss": 1.0}
  m = spikes.burst_metrics(run, ref, start=5, steps=6, offsets=(0, 4),
                           kind="long20")
  assert m["peak"] == pytest.approx(0.5) and m["jump"] == pytest.approx(0.2)
  assert m["bad_skipped"] == (1, 6) and m["bad_clipped"] == (1, 6)
  assert spikes.run_length([2, 2, 0, 1]) == "2×2 0×1 1×1"


def test_burst_config_is_validated():
  with pytest.raises(ValueError, match="train.burst must be one of"):
    config_lib.load(SMOKE, ['train.burst="nan"'])
  with pytest.raises(ValueError, match="inside the run"):
    config_lib.load(SMOKE, ['train.burst="repeat"', "train.burst_start=29",
                            "train.burst_steps=5"])
  with pytest.raises(ValueError, match="eval_steps"):
    config_lib.load(SMOKE, ['train.eval_steps="3"'])
  cfg = config_lib.load(SMOKE, ['train.burst="lr"', "train.eval_steps=[9, 3, 3]"])
  assert cfg.train.burst_window == (15, 10) and cfg.train.eval_steps == (3, 9)


def test_schedule_free_is_evaluated_at_its_average_and_ebc_clips_its_z_step():
  cfg = config_lib.load(SMOKE, ['optim.optimizer="schedule_free"'])
  run = train_lib.build_run(cfg)
  state = run.tx.init(run.params)
  step = train_lib.make_train_step(run)
  params, state, _ = step(run.params, state, jnp.int32(0))
  params, state, _ = step(params, state, jnp.int32(1))
  sf = [s for s in jax.tree.leaves(
      state, is_leaf=lambda x: isinstance(x, optax.contrib.ScheduleFreeState))
        if isinstance(s, optax.contrib.ScheduleFreeState)][0]
  x = optim.eval_params(state, params)
  want = optax.contrib.schedule_free_eval_params(sf, params)
  jax.tree.map(np.testing.assert_array_equal, x, want)
  assert not all(np.array_equal(a, b) for a, b in
                 zip(jax.tree.leaves(x), jax.tree.leaves(params)))
  # EBC sits inside schedule_free, on the step of its z sequence.
  tx = optim.build_optimizer(
      config_lib.load(SMOKE, ['optim.optimizer="schedule_free"']), run.apply_fn)
  inner = tx.init(run.params).base_optimizer_state
  assert type(inner).__name__ == "WrapState"


def test_an_lr_burst_hits_the_step_and_the_average_on_the_same_steps():
  """schedule_free calls its LR with a count that starts at 1: shifted."""
  cfg = config_lib.load(SMOKE, ['optim.optimizer="schedule_free"',
                                'train.burst="lr"', "train.burst_start=3",
                                "train.burst_steps=1", "train.steps=8"])
  clean = config_lib.load(SMOKE, ['optim.optimizer="schedule_free"',
                                  "train.steps=8"])
  out = []
  for c in (cfg, clean):
    run = train_lib.build_run(c)
    step = train_lib.make_train_step(run)
    params, state = run.params, run.tx.init(run.params)
    points = []
    for s in range(5):
      params, state, _ = step(params, state, jnp.int32(s))
      points.append(optim.eval_params(state, params))
    out.append(points)
  for s in range(5):
    # (A schedule is float32 where a float LR is not: equal to rounding.)
    same = all(np.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(
        jax.tree.leaves(out[0][s]), jax.tree.leaves(out[1][s])))
    assert same == (s < 3), s


# --- study ------------------------------------------------------------------------

def test_study_runs_every_stage_resumes_and_reports(tmp_path):
  out = tmp_path / "study"
  kw = dict(base=_base(), seeds=(0,), tune_lrs=(1e-3, 3e-3), lr_scales=(1.0, 8.0),
            only=("adam", "prodigy", "fisher_prodigy_d0.01", "fisher_d0.01",
                  "fisher_tr_d0.01", "fisher_pi"),
            tune_extensions=0, progress=False)
  result = study.run_study(out, **kw)
  lrs = result["lrs"]
  assert lrs["adam"] in (1e-3, 3e-3) and lrs["prodigy"] == 1.0
  arms = {(r["arm"], r["lr_scale"]) for r in result["rows"]}
  assert {("adam", 1.0), ("adam", 8.0), ("prodigy", 8.0), ("fisher_pi", 1.0),
          ("fisher_prodigy_d0.01", 8.0), ("fisher_tr_d0.01", 8.0)} <= arms
  for r in result["rows"]:
    assert r["lr"] == pytest.approx(lrs[r["base"]] * r["lr_scale"])
  text = (out / "study.md").read_text()
  for heading in ("## LR tuning (adam", "## Arms", "Against bar (a)",
                  "| prodigy | prodigy |", "Δ vs Adam ×1",
                  "## Trust-region radius vs the best fixed δ (‖J ΔW‖ every step"):
    assert heading in text
  for name in ("val_vs_lr.png", "curves_x2.png", "curves_x4.png", "tr_delta.png"):
    assert (out / name).stat().st_size > 0
  with open(out / "study.csv") as f:
    assert len(list(csv.DictReader(f))) == len(result["rows"]) + 2
  # study.json keeps the keys it has always had (noise_floor: None with one seed).
  saved = json.loads((out / "study.json").read_text())
  assert set(saved) == {"lrs", "baseline", "noise_floor", "summary"}
  assert saved["lrs"] == lrs and saved["noise_floor"] is None
  # A rerun trains nothing: every run is read back from its summary.json.
  stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
  again = study.run_study(out, **kw)
  assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == stamps
  assert again["summary"] == result["summary"]
  # The directory is tied to its settings.
  with pytest.raises(ValueError, match="different config.*train.steps"):
    study.run_study(out, **{**kw, "steps": 7})
  with pytest.raises(ValueError, match="unknown study arm"):
    study.run_study(out, **{**kw, "only": ("adamw",)})


def test_paired_differences_and_seeds_per_cell():
  rows = [{"arm": a, "lr_scale": x, "seed": s, "val_loss": v, "burst": "none"}
          for a, x, s, v in [("adam", 1.0, 0, 2.0), ("adam", 1.0, 1, 1.0),
                             ("b", 1.0, 0, 2.5), ("b", 1.0, 1, 1.1),
                             ("b", 8.0, 0, float("nan"))]]
  got = study_stats.paired_differences(rows, "adam")
  mean, sd, n = got[("b", 1.0)]
  assert (mean, n) == (pytest.approx(0.3), 2)
  assert sd == pytest.approx(np.std([0.5, 0.1], ddof=1))
  assert got[("b", 8.0)][0] == float("inf")  # not finite: a miss
  assert study.seeds_for(1.0, None) == (0, 1, 2)
  assert study.seeds_for(2.0, None) == (0, 1)
  assert study.seeds_for(8.0, (5,)) == (5,)


def test_tuning_extends_a_grid_whose_edge_holds_the_best(monkeypatch, tmp_path):
  """Val loss minimal at LR 0.01: the grid 1e-3…4e-3 grows past its top."""
  seen = []

  def fake_run_arms(arms, out_dir, **kw):
    seen.append([a.cfg.optim.lr for a in arms])
    return [{"lr": a.cfg.optim.lr, "val_loss": (np.log(a.cfg.optim.lr / 0.01)) ** 2}
            for a in arms]

  monkeypatch.setattr(sweeps, "run_arms", fake_run_arms)
  cfg = config_lib.load(SMOKE)
  lrs, rows = study.tune(cfg, tmp_path, {"adam"}, (1e-3, 2e-3, 4e-3))
  assert lrs["adam"] == pytest.approx(0.011)
  assert seen[-1][-1] > lrs["adam"]  # a worse neighbour above the best
  lrs, _ = study.tune(cfg, tmp_path, {"adam"}, (1e-3, 2e-3, 4e-3), extensions=1)
  assert lrs["adam"] == pytest.approx(0.0057)  # stopped: at most one extension


def test_study_command_line(tmp_path, monkeypatch, capsys):
  seen = {}

  def fake_run_study(out, **kw):
    seen.update(kw, out=out)
    (out / "study.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "study.md").write_text("# Study\n")
    return {"figures": []}

  monkeypatch.setattr(study, "run_study", fake_run_study)
  assert cli.main(["study", "--out", str(tmp_path / "s"), "--steps", "6",
                   "--seeds", "0", "--lr_scales", "1,8", "--only", "adam,energy",
                   "--legacy", "--workers", "2", "--no-progress"]) == 0
  assert "# Study" in capsys.readouterr().out
  assert seen == dict(out=tmp_path / "s", steps=6, seeds=[0], lr_scales=[1.0, 8.0],
                      only=["adam", "energy"], legacy=True, progress=False,
                      workers=2)


# --- spikes -----------------------------------------------------------------------

def _spike_base():
  return _base(steps=12, burst_start=5, burst_steps=2, eval_steps=[4, 6, 7, 8, 10])


def test_spike_suite_measures_jumps_resumes_and_runs_in_parallel(tmp_path,
                                                                 monkeypatch):
  monkeypatch.setattr(study_design, "BURST_EVAL_OFFSETS", (0, 1, 2, 4))
  out = tmp_path / "spikes"
  kw = dict(base=_spike_base(), arms=("adam", "ebc_adam"), kinds=("repeat", "lr"),
            seeds=(0,), tune_lrs=(3e-3,), tune_extensions=0, progress=False)
  result = spikes.run_spikes(out, workers=2, **kw)
  table = {(t["arm"], t["kind"]): t for t in result["table"]}
  assert set(table) == {(a, k) for a in ("adam", "ebc_adam")
                        for k in ("repeat", "lr")}
  # Recomputed by hand from the runs' evaluations: the jump is paired.
  rows = {(r["arm"], r.get("burst", "none")): r for r in result["rows"]}
  for (arm, kind), t in table.items():
    got = dict(map(tuple, rows[(arm, kind)]["evals"]))
    ref = dict(map(tuple, rows[(arm, "none")]["evals"]))
    assert t["jump"][0] == pytest.approx(got[6] - ref[6])
    assert t["before"] == pytest.approx(got[4])
    assert ref[4] == pytest.approx(got[4])  # nothing differs before the burst
  assert table[("adam", "repeat")]["peak_vs_adam"] == pytest.approx(1.0)
  text = (out / "spikes.md").read_text()
  assert "| repeat | adam |" in text and "vs Adam" in text
  assert (out / "spikes.png").stat().st_size > 0
  # The burst runs share the study's names and its no-burst runs.
  assert (out / "adam_x1_s0" / "summary.json").exists()
  assert (out / "adam_x1_s0_repeat" / "summary.json").exists()
  # Sequential rerun: nothing is trained again, same table.
  stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")}
  again = spikes.run_spikes(out, **kw)
  assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == stamps
  assert again["table"] == result["table"]
  # finished_only: a seed never run is left out, nothing is trained.
  only = spikes.run_spikes(out, **{**kw, "seeds": (0, 1)}, finished_only=True)
  assert {p: p.stat().st_mtime_ns for p in out.glob("*/summary.json")} == stamps
  assert only["table"] == result["table"]
  with pytest.raises(ValueError, match="no finished run"):
    spikes.run_spikes(out, **{**kw, "seeds": (1,)}, finished_only=True)


def test_spikes_command_line(tmp_path, monkeypatch, capsys):
  seen = {}

  def fake(out, **kw):
    seen.update(kw)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spikes.md").write_text("# Spike suite\n")
    return {"figure": None}

  monkeypatch.setattr(spikes, "run_spikes", fake)
  assert cli.main(["spikes", "--out", str(tmp_path), "--arms", "adam,ebc_adam",
                   "--kinds", "repeat", "--seeds", "0,1", "--no-progress"]) == 0
  assert "# Spike suite" in capsys.readouterr().out
  assert seen == dict(steps=None, arms=["adam", "ebc_adam"], kinds=["repeat"],
                      seeds=[0, 1], progress=False, workers=1,
                      finished_only=False)
  assert cli.main(["spikes", "--out", str(tmp_path), "--finished-only"]) == 0
  assert seen["finished_only"] is True


def test_a_run_without_ebc_survives_a_change_of_the_ebc_defaults(tmp_path):
  # A study made before the library's EBC defaults changed stays usable: the
  # runs that never built EBC are reused; an EBC run's settings still count.
  def saved(clip, controller):
    cfg = config_lib.merge(config_lib.Config(), {
        "optim": {"clip": clip}, "ebc": {"controller": controller}})
    run = tmp_path / f"{clip}_{controller}"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config_lib.to_dict(cfg)))
    return run

  def arm(clip):
    return sweeps.Arm(clip, config_lib.merge(
        config_lib.Config(), {"optim": {"clip": clip}}), labels={})

  sweeps._check_same_config(arm("none"), saved("none", "pi"))
  sweeps._check_same_config(arm("global"), saved("global", "pi"))
  with pytest.raises(ValueError, match="different config.*ebc.controller"):
    sweeps._check_same_config(arm("ebc"), saved("ebc", "pi"))
  with pytest.raises(ValueError, match="different config.*optim.clip"):
    sweeps._check_same_config(arm("ebc"), saved("none", "relative"))


def test_vs_adam_pairs_the_seeds_and_the_best_peer_verdict_uses_seed_noise():
  def cell(arm, kind, peaks):
    ps = list(peaks.values())
    return {"arm": arm, "kind": kind, "peaks": peaks,
            "peak": (float(np.mean(ps)), 0.0), "peak_vs_adam": None}
  table = [cell("adam", "random", {0: 1.0, 1: 2.0, 2: 3.0}),
           cell("ebc_default", "random", {0: 0.10, 1: 0.20, 2: 0.30}),
           cell("zclip", "random", {0: 0.50, 1: 0.50, 2: 0.50}),
           cell("skipstep_leftout", "random", {0: 0.08, 1: 0.12, 2: 0.22}),
           cell("ebc_radius", "random", {0: 0.0, 1: 0.0, 2: 0.0}),
           cell("ebc_default", "lr", {0: 0.3, 1: 0.3}),
           cell("agc", "lr", {0: 0.1})]  # one seed in common
  assert spikes.vs_adam(table[3]["peaks"], table[0]["peaks"]) == pytest.approx(
      0.42 / 6.0)
  assert spikes.vs_adam({1: 0.2}, table[0]["peaks"]) == pytest.approx(0.1)
  assert spikes.vs_adam({5: 0.2}, table[0]["peaks"]) is None
  rows = {r["kind"]: r for r in spikes.versus_best_peer(table)}
  # EBC arms and Adam are not peers: the best is skipstep_leftout.
  r = rows["random"]
  assert r["peer"] == "skipstep_leftout" and r["seeds"] == 3
  assert r["diff"] == pytest.approx(np.mean([0.02, 0.08, 0.08]))
  assert r["noise"] == pytest.approx(max(np.std([.1, .2, .3], ddof=1),
                                         np.std([.08, .12, .22], ddof=1)))
  assert r["verdict"] == "tie (within noise)"
  assert rows["lr"]["seeds"] == 1 and rows["lr"]["noise"] == 0.0
  assert rows["lr"]["verdict"] == "worse"
  table[1]["peaks"] = {0: 0.08, 1: 0.12, 2: 0.2}
  assert spikes.versus_best_peer(table)[0]["verdict"] == "better or equal"
  assert "| random | — | skipstep_leftout |" in spikes.versus_markdown(
      spikes.versus_best_peer(table))


def test_bar_b_table_judges_the_worst_kind():
  def cell(arm, kind, peak, vs, final=0.0):
    return {"arm": arm, "kind": kind, "peak": (peak, 0.0), "peak_vs_adam": vs,
            "final_excess": (final, 0.0)}
  table = [cell("adam", "repeat", 2.0, 1.0), cell("adam", "lr", 3.0, 1.0),
           cell("a", "repeat", 0.04, 0.02), cell("a", "lr", 0.09, 0.03),
           cell("b", "repeat", 0.04, 0.02), cell("b", "lr", 0.3, 0.1),
           cell("c", "repeat", 0.01, 0.005), cell("c", "lr", math.inf, None),
           cell("d", "repeat", 0.01, 0.005),
           cell("e", "repeat", 0.01, 0.005), cell("e", "lr", None, None, math.inf)]
  rows = {line.split(" | ")[0].lstrip("| "): line
          for line in spikes.bar_b_markdown(table).splitlines()
          if line.startswith("| ") and not line.startswith("| arm")}
  assert rows["a"].endswith("| 2.0% | 3.0% | 3.0% | yes |")
  assert rows["b"].endswith("| 10.0% | no |")
  assert rows["c"].endswith("| div. | div. | no |")
  assert rows["d"].endswith("| — | 0.5% | — |")  # a kind not measured yet
  assert rows["e"].endswith("| div. | div. | no |")  # diverged, no peak
  assert "adam" not in rows
