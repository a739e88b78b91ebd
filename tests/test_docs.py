"""The documentation holds together: the README stays a short front page with its set-up block
and its three uses up front, every guide says what its reader will have at the end, every code
block is tested by name, every link between pages arrives somewhere, and the config reference
lists every field with its real default."""

import ast
import glob
import json
import os
import re

import ml_collections
import pytest

from mixskd_jax.config.schema import base_config
from tests.doc_blocks import ROOT, UNTESTED_LANGUAGES, blocks, doc_pages, read_page

README_MAX_LINES = 200

# Pages whose links are checked: the front page, the guides, and the pages they send readers to.
LINKED_PAGES = doc_pages() + ["ARCHITECTURE.md", "experiments/SCALING.md",
                              "experiments/results/README.md"]


def without_code(text: str) -> str:
  """`text` with its fenced code blocks blanked to spaces (offsets kept, so a match here is a
  position in `text`): a `# comment` in a bash block is no heading, a link in a snippet no link."""
  return re.sub(r"^```.*?^```", lambda m: re.sub(r"[^\n]", " ", m.group(0)), text,
                flags=re.S | re.M)


def sections(text: str, level: int) -> list[tuple[str, str]]:
  """(heading, body) of every heading of exactly `level` #s, outside code."""
  marks = list(re.finditer(rf"^{'#' * level} (.+)$", without_code(text), re.M))
  ends = [m.start() for m in marks[1:]] + [len(text)]
  return [(m.group(1), text[m.end():end]) for m, end in zip(marks, ends)]


# ---------------------------------------------------------------------------------------------
# The front page.

def test_readme_is_a_short_front_page():
  lines = read_page("README.md").splitlines()
  assert len(lines) <= README_MAX_LINES, (
      f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail to docs/")


def test_readme_set_up_block_installs_trains_the_default_and_runs_the_ci_tests():
  """The two set-up commands keep their meaning: command 1 installs the package with its CPU
  builds into a venv and trains the offline default; command 2 installs the test requirements
  and runs the default tier exactly as CI runs it (CI adds only --slow and --durations)."""
  (_, body), = [s for s in sections(read_page("README.md"), 2) if s[0] == "Set up"]
  code = re.search(r"```bash\n(.*?)```", body, re.S).group(1).splitlines()
  assert len(code) == 4 and code[0].startswith("# 1. ") and code[2].startswith("# 2. ")
  install = code[1].split(" && ")
  assert "apt-get install -y python3-venv dataset-fashion-mnist" in install
  assert "python3 -m venv .venv" in install and ". .venv/bin/activate" in install
  assert 'python3 -m pip install -e ".[cpu]"' in install
  assert install[-1] == ("python3 -m mixskd_jax.main --config=configs/default.py "
                         "--workdir=/tmp/mixskd_default")
  pip, pytest_command = code[3].split(" && ")
  assert pip == "python3 -m pip install -r requirements-dev.txt"
  assert os.path.exists(os.path.join(ROOT, "requirements-dev.txt"))
  with open(os.path.join(ROOT, ".ci", "run")) as f:
    ci = [line for line in f if line.startswith("python3 -m pytest")]
  assert ci == [pytest_command + " --slow --durations=25\n"]


DEFAULT_RUN_MARKER = "<!-- default-run-result -->\n"


def default_run_paragraph() -> str:
  """The README's paragraph under its default-run marker, its lines joined by single spaces."""
  paragraph = read_page("README.md").split(DEFAULT_RUN_MARKER, 1)[1].split("\n\n", 1)[0]
  return " ".join(paragraph.split())


def test_readme_says_what_the_default_run_reaches_under_its_marker():
  assert read_page("README.md").count(DEFAULT_RUN_MARKER) == 1
  assert re.search(r"\d+\.\d+%", default_run_paragraph()), "the default run's figure is missing"


def test_the_default_runs_figure_is_the_committed_five_seed_suite():
  """The front page's mean, standard deviation and range are the `default` suite's
  (`python -m experiments.run --suite=default`), as its committed summary has them, and its
  fresh clone's figure is the committed run's, inside that range."""
  with open(os.path.join(ROOT, "experiments", "results", "default", "summary.json")) as f:
    row = json.load(f)["rows"]["mixskd_full"]
  finals = [seed["final_top1"] for seed in row["seeds"].values()]
  assert len(finals) >= 5
  paragraph = default_run_paragraph()
  assert f"{row['final_top1_mean']:.2f} ± {row['final_top1_std']:.2f}%" in paragraph
  assert f"{min(finals):.2f}-{max(finals):.2f}%" in paragraph
  assert f"{len(finals)} seeds" in paragraph
  # The acceptance: a fresh clone's run of command 1 lands inside that range.
  with open(os.path.join(ROOT, "experiments", "results", "default", "fresh_clone_d00b90d",
                         "results.json")) as f:
    fresh = json.load(f)["final"]["eval/top1/backbone"]
  assert min(finals) <= fresh <= max(finals)
  assert f"A fresh clone set up and run with command 1 ended at {fresh:.2f}%" in paragraph


def test_readme_shows_the_three_uses_with_a_snippet_and_a_guide_each_up_front():
  """A reader finds the three uses within the first screenful of sections: the section that
  holds them comes right after the set-up and the default run's result."""
  top = sections(read_page("README.md"), 2)
  headings = [h for h, _ in top]
  assert headings.index("Three ways to use it") <= 2, headings
  uses = sections(dict(top)["Three ways to use it"], 3)
  assert len(uses) == 3, [h for h, _ in uses]
  for heading, body in uses:
    assert "<!-- doc-test: " in body and "```" in body, heading
    assert re.search(r"\]\(docs/[\w-]+\.md", body), f"{heading}: no link to its guide"


def test_readme_links_every_guide_and_the_architecture():
  text = read_page("README.md")
  for page in doc_pages()[1:] + ["ARCHITECTURE.md"]:
    assert f"]({page}" in text, f"README does not link {page}"


def test_every_guide_opens_with_what_the_reader_will_have():
  for page in doc_pages()[1:]:
    lines = read_page(page).splitlines()
    assert lines[0].startswith("# ") and lines[1] == "", page
    assert lines[2].startswith("At the end of this "), (
        f"{page}: the first sentence says what the reader will have at the end")


# ---------------------------------------------------------------------------------------------
# Every code block is tested.

def _test_sources() -> dict[str, str]:
  sources = {}
  for path in glob.glob(os.path.join(ROOT, "tests", "*.py")):
    with open(path) as f:
      sources[os.path.basename(path)] = f.read()
  return sources


def is_set_up_block(block) -> bool:
  """The README's set-up commands: CI runs them, and the set-up test above reads them by their
  section, so the block stays exactly as readers and CI know it, without a marker."""
  return block.page == "README.md" and block.text.startswith("# 1. Install")


def test_every_code_block_has_a_marker_and_a_test_that_reads_it():
  """A block either shows output (```text) or a citation, or carries `<!-- doc-test: NAME -->`
  and some test file names both its page and NAME (that test runs or parses it)."""
  sources = _test_sources()
  for page in doc_pages():
    page_blocks = blocks(page)
    names = [b.name for b in page_blocks if b.name]
    assert len(names) == len(set(names)), f"{page}: a block name is used twice"
    for block in page_blocks:
      if block.language in UNTESTED_LANGUAGES or is_set_up_block(block):
        continue
      where = f"{page}:{block.line}"
      assert block.name, f"{where}: a code block without a <!-- doc-test: NAME --> marker"
      readers = [file for file, source in sources.items()
                 if file != "test_docs.py" and page in source and f'"{block.name}"' in source]
      assert readers, f"{where}: no test reads block '{block.name}'"


# ---------------------------------------------------------------------------------------------
# Links between pages.

def github_slug(heading: str) -> str:
  """The anchor GitHub gives a heading: the rendered text (code spans, links and emphasis
  unwrapped), lowercased, punctuation other than '-' and '_' dropped, spaces made '-'."""
  text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)
  text = text.replace("`", "").replace("*", "").strip().lower()
  text = re.sub(r"[^\w\- ]", "", text)
  return text.replace(" ", "-")


def anchors(page: str) -> set[str]:
  """Every heading's anchor in `page`, with GitHub's -1, -2 suffixes for repeated ones."""
  seen: dict[str, int] = {}
  found = set()
  for heading in re.findall(r"^#{1,6} (.+)$", without_code(read_page(page)), re.M):
    slug = github_slug(heading)
    found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
    seen[slug] = seen.get(slug, 0) + 1
  return found


def relative_links(page: str) -> list[str]:
  text = without_code(read_page(page))
  text = re.sub(r"`[^`\n]*`", "", text)  # a link written inside a code span is not a link
  targets = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", text)
  return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # no https:, mailto:


def test_github_slug_follows_githubs_rules():
  assert github_slug("2. The losses in your own Flax model (Linen or NNX)") == (
      "2-the-losses-in-your-own-flax-model-linen-or-nnx")
  assert github_slug("Transfer, measured fairly (suite `fashion_mnist_transfer_fair`)") == (
      "transfer-measured-fairly-suite-fashion_mnist_transfer_fair")
  assert github_slug("`baselines`: the other methods' hyperparameters") == (
      "baselines-the-other-methods-hyperparameters")


@pytest.mark.parametrize("page", LINKED_PAGES)
def test_every_relative_link_points_to_a_file_and_heading_that_exist(page):
  for target in relative_links(page):
    path, _, anchor = target.partition("#")
    resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
    assert os.path.exists(os.path.join(ROOT, resolved)), f"{page}: dead link {target}"
    if anchor and resolved.endswith(".md"):
      assert anchor in anchors(resolved), f"{page}: {target}: no such heading in {resolved}"


# ---------------------------------------------------------------------------------------------
# The config reference.

def schema_fields(config=None, prefix=""):
  """{dotted field: default} for every leaf of `base_config()`."""
  config = base_config() if config is None else config
  fields = {}
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      fields.update(schema_fields(value, f"{prefix}{key}."))
    else:
      fields[prefix + key] = value
  return fields


def documented_fields():
  """{dotted field: its default as written} from the tables of docs/config-fields.md."""
  rows = re.findall(r"^\| `([\w.]+)` \| `([^`]*)` \|", read_page("docs/config-fields.md"), re.M)
  return dict(rows)


def test_config_reference_lists_every_field_with_its_default():
  documented = documented_fields()
  fields = schema_fields()
  assert sorted(documented) == sorted(fields), (
      f"missing: {sorted(set(fields) - set(documented))}; "
      f"not fields: {sorted(set(documented) - set(fields))}")
  for name, default in fields.items():
    assert ast.literal_eval(documented[name]) == default, (
        f"docs/config-fields.md: {name} defaults to {default!r}, not {documented[name]}")
