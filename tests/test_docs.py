"""The README's quick start and the demo entry point run as written."""

import pathlib
import re

import ebc_optax
from ebc_optax import __main__ as demo

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs(capsys):
  text = README.read_text()
  block = re.search(r"## Quick start\n\n```python\n(.*?)```", text, re.S).group(1)
  namespace = {}
  exec(compile(block, "README quick start", "exec"), namespace)
  stats = namespace["stats"]
  assert 0 < float(stats["c"]) <= 1 and int(stats["step"]) == 1


def test_readme_test_command_is_what_ci_runs():
  text = README.read_text()
  ci = (README.parent / ".ci" / "run").read_text()
  command = 'pip install -e ".[test]" && python -m pytest -q'
  assert command in text and command in ci


def test_demo_prints_one_csv_line_per_run(capsys):
  demo.main(["--steps", "3"])
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[1] == "optimizer,ebc,lr,final_loss,loss_minus_floor,avg_c,wall_s"
  rows = [line.split(",") for line in lines[2:]]
  assert len(rows) == 6 and {r[1] for r in rows} == {"0", "1"}
  floor = float(re.search(r"entropy floor ([0-9.]+)", lines[0]).group(1))
  assert all(float(r[3]) > floor for r in rows)  # no loss below the exact floor


def test_markov_entropy_rate_matches_monte_carlo():
  import jax
  import numpy as np
  trans, floor = demo.markov_chain(3, vocab=16, support=3)
  tokens = np.asarray(demo.sample(trans, jax.random.PRNGKey(0), 64, 400))[:, 50:]
  p = np.asarray(trans)[tokens[:, :-1], tokens[:, 1:]]
  np.testing.assert_allclose(-np.log(p).mean(), floor, rtol=0.03)


def test_quickstart_notebook_runs(monkeypatch, capsys):
  import json
  monkeypatch.setenv("EBC_NOTEBOOK_STEPS", "6")
  nb = json.loads((README.parent / "notebooks" / "quickstart.ipynb").read_text())
  namespace = {}
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      assert not cell["outputs"], "commit notebooks with outputs stripped"
      exec(compile("".join(cell["source"]), "quickstart.ipynb", "exec"), namespace)
  assert "clipped_steps" in capsys.readouterr().out
