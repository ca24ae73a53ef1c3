"""Every Python code block of README.md runs as written.

Blocks run top to bottom in one namespace, as a reader pastes them. A block
preceded by an HTML comment ``<!-- not run ...: reason -->`` is skipped, and
the test names the reason (e.g. several hosts).
"""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"(?:<!--(?P<skip>[^>]*)-->\s*\n)?```python\n(?P<code>.*?)```",
                    re.S)


def blocks():
  return [(m.group("code"), (m.group("skip") or "").strip())
          for m in _BLOCK.finditer(README.read_text(encoding="utf-8"))]


def test_readme_has_python_blocks_and_every_skip_says_why():
  found = blocks()
  assert len(found) >= 8
  for _, skip in found:
    assert not skip or ("not run" in skip and ":" in skip), skip


def test_every_python_block_runs(capsys):
  namespace: dict = {"__name__": "__readme__"}
  skipped = []
  for i, (code, skip) in enumerate(blocks()):
    if skip:
      skipped.append(skip)
      continue
    try:
      exec(compile(code, f"README.md block {i}", "exec"), namespace)
    except Exception as e:  # name the block
      pytest.fail(f"README.md python block {i} failed: {type(e).__name__}: {e}\n{code}")
  assert all("several hosts" in s for s in skipped), skipped
