r"""Copies a suite's report tables into experiments/results/README.md, replacing the quoted
versions there, so the README quotes the committed tables verbatim after every rerun.

  python -m experiments.quote_tables --suite=fashion_mnist_transfer_fair

A README table is the quote of a report table when both have the same header row and the
same first column (the same rows, e.g. the same pre-training sources, in any order): the
numbers may differ, the layout may not. A report table quoted more than once is an error that
names it, and nothing is written; one quoted nowhere (or only in part, with other rows) is left
out and named in the command's output. The prose around the tables is left as it is: it is the
author's to update.
"""

from __future__ import annotations

import os
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class QuoteError(ValueError):
  """A report table has no quote in the README (`matches` 0), or more than one."""

  def __init__(self, message: str, matches: int):
    super().__init__(message)
    self.matches = matches


def tables(text: str) -> list[tuple[int, int]]:
  """(start, end) line indices of each table of `text`: runs of lines starting with '|'."""
  lines, found, start = text.split("\n"), [], None
  for i, line in enumerate(lines + [""]):
    if line.startswith("|") and start is None:
      start = i
    elif not line.startswith("|") and start is not None:
      found.append((start, i))
      start = None
  return found


def _signature(rows: list[str]) -> tuple[str, frozenset]:
  """A table's header row and the set of its first column below the separator."""
  keys = frozenset(r.split("|")[1].strip() for r in rows[2:])
  return rows[0], keys


def requote(readme: str, table_lines: list[str], name: str = "table") -> str:
  """`readme` with the one table quoting `table_lines` replaced by them.

  Raises:
    QuoteError: no table of `readme` quotes it, or several do.
  """
  lines = readme.split("\n")
  wanted = _signature(table_lines)
  matches = [(s, e) for s, e in tables(readme) if _signature(lines[s:e]) == wanted]
  if len(matches) != 1:
    raise QuoteError(f"{name}: {len(matches)} tables of the README have its header and rows "
                     "(need exactly 1); quote it once by hand, then rerun.", len(matches))
  start, end = matches[0]
  return "\n".join(lines[:start] + table_lines + lines[end:])


def requote_suite(suite: str, readme_path: str = os.path.join(RESULTS, "README.md")
                  ) -> tuple[int, list[str]]:
  """Requotes every table of `suite`'s report folder (its .md files) that the README quotes.

  Returns:
    (tables replaced, the files of the tables the README does not quote).
  """
  folder = os.path.join(os.path.dirname(readme_path), suite)
  with open(readme_path) as f:
    text = f.read()
  replaced, unquoted = 0, []
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".md"):
      continue
    with open(os.path.join(folder, name)) as f:
      report_lines = f.read().split("\n")
    for start, end in tables("\n".join(report_lines)):
      try:
        text = requote(text, report_lines[start:end], f"{suite}/{name}")
        replaced += 1
      except QuoteError as e:
        if e.matches == 0:
          unquoted.append(name)
        else:
          raise
  with open(readme_path, "w") as f:
    f.write(text)
  return replaced, unquoted


def main(argv: list[str]) -> int:
  suites = [a.split("=", 1)[1] for a in argv[1:] if a.startswith("--suite=")]
  if len(suites) != 1:
    print("usage: python -m experiments.quote_tables --suite=NAME", file=sys.stderr)
    return 2
  try:
    count, unquoted = requote_suite(suites[0])
  except (QuoteError, FileNotFoundError) as e:
    print(e, file=sys.stderr)
    return 2
  print(f"{count} tables of {suites[0]} requoted in experiments/results/README.md"
        + (f"; not quoted there: {', '.join(unquoted)}" if unquoted else ""))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
