"""The API's tiers: every public name is documented, and nothing outside a
module's own package imports a private module."""

import importlib
import json
import pathlib
import re

import pytest

import ebc_optax

REPO = pathlib.Path(__file__).resolve().parents[1]
API = REPO / "docs" / "api.md"
# The public modules: the front door and its extension and composition tiers.
PUBLIC = ("ebc_optax", "ebc_optax.controllers", "ebc_optax.formulas",
          "ebc_optax.cadence", "ebc_optax.layers", "ebc_optax.advanced")


def _documented() -> set[str]:
  """Fully qualified names the API page documents."""
  text = API.read_text(encoding="utf-8")
  names = set(re.findall(r"\.\. auto(?:function|class|data):: ([\w.]+)", text))
  for module in re.findall(r"\.\. automodule:: ([\w.]+)", text):
    names.add(module)
    names |= {f"{module}.{n}" for n in importlib.import_module(module).__all__}
  return names


def test_the_public_modules_are_the_package_s_non_private_modules():
  on_disk = {f"ebc_optax.{p.stem}" for p in (REPO / "ebc_optax").glob("*.py")
             if not p.stem.startswith("_")}
  assert on_disk == set(PUBLIC) - {"ebc_optax"}


@pytest.mark.parametrize("module", PUBLIC)
def test_every_public_name_is_documented(module):
  names = importlib.import_module(module).__all__
  missing = sorted(set(f"{module}.{n}" for n in names) - _documented())
  assert not missing, f"public names missing from docs/api.md: {missing}"


@pytest.mark.parametrize("module", PUBLIC)
def test_all_lists_names_that_exist_once(module):
  mod = importlib.import_module(module)
  assert len(set(mod.__all__)) == len(mod.__all__)
  for name in mod.__all__:
    assert hasattr(mod, name), f"{module}.__all__ names {name}, which is absent"


def _sources():
  """Code outside the core's private modules: harness, benchmarks, docs,
  notebooks, README (tests may test private modules; they are not users)."""
  for path in sorted((REPO / "ebc_optax" / "experiments").rglob("*.py")):
    yield path, path.read_text(encoding="utf-8")
  for path in sorted((REPO / "benchmarks").rglob("*.py")):
    yield path, path.read_text(encoding="utf-8")
  pages = [p for p in sorted((REPO / "docs").rglob("*.md"))
           if not any(part.startswith("_") for part in p.parts)]
  for path in [REPO / "README.md", *pages]:
    yield path, path.read_text(encoding="utf-8")
  for path in sorted((REPO / "notebooks").glob("*.ipynb")):
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    yield path, "\n".join("".join(c["source"]) for c in cells)


_PRIVATE = re.compile(r"from ebc_optax(?:\.experiments)? import (_\w+)"
                      r"|(?:from|import) ebc_optax(?:\.experiments)?\.(_\w+)"
                      r"|ebc_optax\.(_\w+)")


def test_nothing_outside_the_core_imports_a_private_module():
  found = [f"{path.relative_to(REPO)}: {m.group(0)}"
           for path, text in _sources() for m in _PRIVATE.finditer(text)
           if "_version" not in m.group(0) and "__" not in m.group(0)]
  assert not found, "private modules used outside the core:\n" + "\n".join(found)
