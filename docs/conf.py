"""Sphinx configuration: ``sphinx-build -W -b html docs docs/_build``."""

from __future__ import annotations

import pathlib
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
REPO = DOCS.parent
sys.path.insert(0, str(REPO))

import ebc_optax  # noqa: E402
from ebc_optax import _config  # noqa: E402  (the knob table is generated)

project = "ebc_optax"
author = "the ebc_optax authors"
release = ebc_optax.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "_generated", "README.md"]
myst_enable_extensions = ["dollarmath", "colon_fence"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # the tests execute the notebooks
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_ivar = True  # a NamedTuple's fields are documented once
html_theme = "sphinx_book_theme"
html_title = "ebc_optax"
nitpicky = False


def _generate() -> None:
  """Writes the pages made from code: the knob table and the notebooks."""
  out = DOCS / "_generated"
  out.mkdir(exist_ok=True)
  (out / "knobs.md").write_text(_config.knob_table() + "\n", encoding="utf-8")
  nb = DOCS / "notebooks"
  nb.mkdir(exist_ok=True)
  for src in sorted((REPO / "notebooks").glob("*.ipynb")):
    shutil.copyfile(src, nb / src.name)


_generate()
