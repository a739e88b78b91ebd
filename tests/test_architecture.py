"""The package's structure against ARCHITECTURE.md: the parts it lists are the package's, every
import (inside functions too) goes to a part its row allows, no import circle between files or
between parts, files of at most 300 lines and functions of at most 60; and the registries that
map a name to code hold exactly the names the config accepts (`config/choices.py`)."""

import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "mixskd_jax")
MAX_FILE_LINES = 300
MAX_FUNCTION_LINES = 60


def documented_parts() -> dict[str, set[str]]:
  """{part: the parts it may import}, from ARCHITECTURE.md's table of layers."""
  with open(os.path.join(REPO, "ARCHITECTURE.md")) as f:
    text = f.read()
  parts = {}
  for row in re.findall(r"^\| \d+ \| `(\w+)` \|[^|]*\|([^|]*)\|$", text, flags=re.M):
    parts[row[0]] = set(re.findall(r"`(\w+)`", row[1]))
  return parts


def module_files() -> dict[str, str]:
  """{dotted module name: path} of every file of the package."""
  found = {}
  for directory, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        dotted = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        found[dotted.removesuffix(".__init__")] = path
  return found


def imports_of(path: str, modules: dict[str, str]) -> set[str]:
  """The package's modules that `path` imports anywhere (top level, functions, TYPE_CHECKING),
  resolved to modules (`from mixskd_jax.method import objective` -> mixskd_jax.method.objective)."""
  found = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
               else node.module for a in node.names]
    else:
      continue
    found.update(n for n in names if n.split(".")[0] == "mixskd_jax")
  return found


def part_of(module: str) -> str:
  """mixskd_jax.run.loop -> run; mixskd_jax.main -> main; mixskd_jax -> __init__."""
  pieces = module.split(".")
  return pieces[1] if len(pieces) > 1 else "__init__"


def import_graph() -> dict[str, set[str]]:
  modules = module_files()
  return {m: imports_of(p, modules) - {m} for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one node (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(node):
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for nxt in graph.get(node, ()):
      if nxt not in index:
        visit(nxt)
        low[node] = min(low[node], low[nxt])
      elif nxt in on_stack:
        low[node] = min(low[node], index[nxt])
    if low[node] == index[node]:
      component = []
      while True:
        top = stack.pop()
        on_stack.discard(top)
        component.append(top)
        if top == node:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for node in graph:
    if node not in index:
      visit(node)
  return found


def test_the_documented_parts_are_the_packages():
  parts = documented_parts()
  actual = {part_of(m) for m in module_files()}
  assert set(parts) == actual
  for part, allowed in parts.items():
    assert allowed <= set(parts), (part, allowed - set(parts))


def test_every_import_is_one_its_part_may_make():
  parts = documented_parts()
  wrong = sorted(f"{m} imports {d}" for m, deps in import_graph().items() for d in deps
                 if part_of(d) != part_of(m) and part_of(d) not in parts[part_of(m)])
  assert not wrong, "\n".join(wrong)


def test_no_import_circle_between_files_or_parts():
  graph = import_graph()
  assert cycles(graph) == []
  between_parts = {}
  for module, deps in graph.items():
    between_parts.setdefault(part_of(module), set()).update(
        part_of(d) for d in deps if part_of(d) != part_of(module))
  assert cycles(between_parts) == []


def test_the_allowed_imports_point_down():
  """The table itself has no circle, so every allowed import points to a lower floor."""
  assert cycles(documented_parts()) == []


def test_files_and_functions_are_short():
  long = []
  for module, path in module_files().items():
    source = open(path).read()
    if source.count("\n") > MAX_FILE_LINES:
      long.append(f"{module}: {source.count(chr(10))} lines")
    for node in ast.walk(ast.parse(source)):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > MAX_FUNCTION_LINES:
          long.append(f"{module}.{node.name}: {length} lines")
  assert not long, "\n".join(long)


def test_the_checks_catch_a_circle_and_an_upward_import():
  """The helpers above find what they are for (a check that cannot fail proves nothing)."""
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []
  parts = documented_parts()
  assert "run" not in parts["method"] and "train" not in parts["config"]
  assert "models" not in parts["data"] and "run" not in parts["interop"]


@pytest.mark.parametrize("registry, names", [
    ("mixskd_jax.models.registry:SPECS", "MODELS"),
    ("mixskd_jax.models.registry:DTYPES", "DTYPES"),
])
def test_registries_hold_the_configs_names(registry, names):
  import importlib  # pylint: disable=import-outside-toplevel
  from mixskd_jax.config import choices  # pylint: disable=import-outside-toplevel
  module, attribute = registry.split(":")
  assert tuple(getattr(importlib.import_module(module), attribute)) == getattr(choices, names)
