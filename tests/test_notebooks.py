"""The notebooks run headless, at their smoke size, as a user would run them.

Executed with nbclient in a real Jupyter kernel (the kernel of this Python),
so magics, ``display`` and inline figures are exercised too; a notebook that
rots fails here. The committed notebooks carry no outputs.
"""

import json
import pathlib

import pytest

from conftest import TEST_XLA_FLAGS

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = pathlib.Path(__file__).resolve().parents[1] / "notebooks"


@pytest.mark.parametrize("name", ["experiment.ipynb", "quickstart.ipynb"])
def test_committed_without_outputs(name):
  nb = json.loads((NOTEBOOKS / name).read_text())
  for cell in nb["cells"]:
    if cell["cell_type"] == "code":
      assert not cell["outputs"] and cell.get("execution_count") is None, (
          f"{name}: commit notebooks with outputs stripped")


def test_experiment_notebook_executes_headless(tmp_path, monkeypatch):
  monkeypatch.setenv("EBC_NOTEBOOK_SMOKE", "1")
  # One device for the kernel (the tests' 8 simulated devices are not needed),
  # compiled as the rest of the suite is (conftest.TEST_XLA_FLAGS).
  monkeypatch.setenv("XLA_FLAGS", TEST_XLA_FLAGS)
  monkeypatch.setenv("MPLBACKEND", "agg")
  nb = nbformat.read(NOTEBOOKS / "experiment.ipynb", as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=600, kernel_name="python3",
      resources={"metadata": {"path": str(tmp_path)}})
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
  assert "smoke size" in text
  assert "baseline test accuracy" in text and "constrained test accuracy" in text
  assert "sample:" in text
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 2, "the warm-ups' figures were not displayed"
  run_dir = tmp_path / "outputs" / "experiment_notebook" / "shakespeare_ebc_smoke"
  summary = json.loads((run_dir / "summary.json").read_text())
  assert summary["status"] == "ok"
