"""Lines of code of the core and the harness, revision by revision.

Counts, for each ``--revisions`` entry (read with ``git show``, not from the
work tree), the lines of the core (``ebc_optax/*.py``) and of the harness
(``ebc_optax/experiments/*.py``): all lines, and lines of code — the lines
holding a token other than a comment, with docstrings (module, class and
function) and blank lines set aside. With ``--modules`` it adds the code lines
of every harness module.

Run:  python benchmarks/lines.py --revisions da94842 HEAD --modules
"""

from __future__ import annotations

import argparse
import ast
import io
import pathlib
import subprocess
import tokenize

REPO = pathlib.Path(__file__).resolve().parents[1]
SKIPPED = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
           tokenize.DEDENT, tokenize.ENDMARKER)


def code_lines(source: str) -> int:
  """Lines holding code: no comment-only, blank or docstring lines."""
  docstrings = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef,
                         ast.ClassDef)) and node.body:
      first = node.body[0]
      if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
          and isinstance(first.value.value, str)):
        docstrings.update(range(first.lineno, first.end_lineno + 1))
  lines = set()
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type not in SKIPPED:
      lines.update(l for l in range(tok.start[0], tok.end[0] + 1)
                   if l not in docstrings)
  return len(lines)


def sources(rev: str, folder: str) -> dict[str, str]:
  """``{module file name: source}`` of the ``.py`` files directly in
  ``folder`` at ``rev``."""
  names = subprocess.run(["git", "ls-tree", "--name-only", f"{rev}:{folder}"],
                         cwd=REPO, check=True, capture_output=True,
                         text=True).stdout.split()
  return {n: subprocess.run(["git", "show", f"{rev}:{folder}/{n}"], cwd=REPO,
                            check=True, capture_output=True, text=True).stdout
          for n in names if n.endswith(".py")}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--revisions", nargs="+", default=["HEAD"])
  parser.add_argument("--modules", action="store_true",
                      help="also the code lines of every harness module")
  args = parser.parse_args()
  print("revision,part,files,lines,code_lines")
  per_module = {}
  for rev in args.revisions:
    for part, folder in (("core", "ebc_optax"), ("harness", "ebc_optax/experiments")):
      files = sources(rev, folder)
      code = {n: code_lines(s) for n, s in files.items()}
      lines = sum(len(s.splitlines()) for s in files.values())
      print(f"{rev},{part},{len(files)},{lines},{sum(code.values())}")
      if part == "harness":
        per_module[rev] = code
  if args.modules:
    print("module," + ",".join(args.revisions))
    for name in sorted(set().union(*per_module.values()),
                       key=lambda n: -per_module[args.revisions[-1]].get(n, 0)):
      print(name + "," + ",".join(str(per_module[r].get(name, "")) for r in args.revisions))


if __name__ == "__main__":
  main()
