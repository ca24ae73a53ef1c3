"""Every Python code block of README.md and of the documentation runs as
written.

Blocks run top to bottom in one namespace, as a reader pastes them: the
README's first, then the pages in the order of the site's tables of contents
(``docs/index.md``). A block preceded by an HTML comment
``<!-- not run ...: reason -->`` is skipped, and the test names the reason
(e.g. several hosts).
"""

import pathlib
import re

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = REPO / "docs"
_BLOCK = re.compile(r"(?:<!--(?P<skip>[^>]*)-->\s*\n)?```python\n(?P<code>.*?)```",
                    re.S)
_TOCTREE = re.compile(r"```\{toctree\}\n(.*?)```", re.S)


def pages() -> list[pathlib.Path]:
  """README.md, then every page of the site in its tables' order."""
  found = []
  for tree in _TOCTREE.findall((DOCS / "index.md").read_text(encoding="utf-8")):
    found += [DOCS / f"{line.strip()}.md" for line in tree.splitlines()
              if line.strip() and not line.startswith(":")]
  return [README] + [p for p in found if p.exists()]


def blocks(path: pathlib.Path):
  return [(m.group("code"), (m.group("skip") or "").strip())
          for m in _BLOCK.finditer(path.read_text(encoding="utf-8"))]


def test_every_page_is_in_the_tables_of_contents():
  listed = {p.relative_to(DOCS) for p in pages()[1:]}
  on_disk = {p.relative_to(DOCS) for p in DOCS.rglob("*.md")
             if not p.relative_to(DOCS).parts[0].startswith("_")
             and p.name != "index.md"}
  assert on_disk <= listed, on_disk - listed


def test_pages_have_python_blocks_and_every_skip_says_why():
  found = [b for page in pages() for b in blocks(page)]
  assert len(blocks(README)) >= 2 and len(found) >= 10
  for _, skip in found:
    assert not skip or ("not run" in skip and ":" in skip), skip


def test_every_python_block_runs(capsys):
  namespace: dict = {"__name__": "__readme__"}
  skipped = []
  for page in pages():
    for i, (code, skip) in enumerate(blocks(page)):
      if skip:
        skipped.append(skip)
        continue
      where = f"{page.relative_to(REPO)} block {i}"
      try:
        exec(compile(code, where, "exec"), namespace)
      except Exception as e:  # name the block
        pytest.fail(f"{where} failed: {type(e).__name__}: {e}\n{code}")
  assert all("several hosts" in s for s in skipped), skipped
