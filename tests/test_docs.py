"""The README's quick start, the demo entry point and every docstring example
run as written."""

import pathlib
import re

import pytest


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
  command = 'pip install -e ".[test,zoo]" && python -m pytest -q'
  assert command in text and command in ci
  assert 'pip install -e ".[experiments]" && ebc-optax ablate' in text


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


def _modules():
  import pkgutil
  import ebc_optax
  import ebc_optax.experiments
  names = ["ebc_optax"]
  for pkg in (ebc_optax, ebc_optax.experiments):
    names += [f"{pkg.__name__}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)
              if m.name != "__main__"]
  return sorted(set(names))


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples_run(name):
  """Every ``>>>`` example of the package's docstrings runs as written."""
  import doctest
  import importlib
  module = importlib.import_module(name)
  result = doctest.testmod(
      module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert result.failed == 0, f"{result.failed} docstring example(s) of {name} fail"
