"""The documentation's code blocks, read by name, so that every snippet and command in the README
and the guides runs in some test.

A block is named by the marker line right above its fence:

    <!-- doc-test: NAME -->
    ```python
    ...
    ```

`doc_block("docs/own-model.md", "nnx-model")` returns that block's text. Blocks whose language
is in `UNTESTED_LANGUAGES` show output or a citation rather than code to run, and need no marker.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))

# The front page and the guides: every code block in them is tested.
def doc_pages() -> list[str]:
  """README.md and docs/*.md, as paths relative to the repository root."""
  guides = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
  return ["README.md"] + guides


# A program's printed output and a BibTeX entry are shown, not run.
UNTESTED_LANGUAGES = ("text", "bibtex")

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```\n", re.S | re.M)
_MARKER = re.compile(r"<!-- doc-test: ([\w-]+) -->\n$")


@dataclasses.dataclass(frozen=True)
class Block:
  page: str
  line: int          # 1-based line of the opening fence
  language: str
  name: str | None   # the marker's NAME, or None when the block has no marker
  text: str


def read_page(page: str) -> str:
  with open(os.path.join(ROOT, page), encoding="utf-8") as f:
    return f.read()


def blocks(page: str) -> list[Block]:
  """Every fenced code block of `page`, in order, with the name of its marker if it has one."""
  text = read_page(page)
  found = []
  for match in _FENCE.finditer(text):
    before = text[:match.start()]
    last_line = before[before.rstrip("\n").rfind("\n") + 1:]
    marker = _MARKER.search(last_line)
    found.append(Block(page, before.count("\n") + 1, match.group(1),
                       marker.group(1) if marker else None, match.group(2)))
  return found


def doc_block(page: str, name: str) -> str:
  """The code of the block marked `<!-- doc-test: name -->` in `page` (README.md or docs/X.md)."""
  named = [b for b in blocks(page) if b.name == name]
  assert len(named) == 1, f"{page} has {len(named)} blocks named '{name}' (want exactly one)"
  return named[0].text
