"""experiments/quote_tables.py: a report table replaces its quote in the results README (same
header, same first column), the prose stays, and an ambiguous quote is refused untouched."""

import pytest

from experiments import quote_tables

HEADER = "| source | top-1 % | vs CE |"
SEPARATOR = "|---|---|---|"


def table(*rows):
  return [HEADER, SEPARATOR, *rows]


README = "\n".join([
    "# Results", "", "Prose that says 80.1.", "",
    *table("| ce | 80.1 (1) |  |", "| full | 80.7 (1) | +0.6 |"),
    "", "Other suite:", "",
    *table("| ce | 70.0 |  |", "| mixup | 71.0 | +1.0 |"),
    ""])


def test_the_matching_table_is_replaced_and_nothing_else():
  new = table("| ce | 80.5 ± 0.2 (3) |  |", "| full | 81.0 ± 0.4 (3) | +0.5 (p 0.2) |")
  text = quote_tables.requote(README, new)
  assert "\n".join(new) in text
  assert "| full | 80.7 (1) | +0.6 |" not in text
  assert "Prose that says 80.1." in text  # the prose is the author's
  assert "| mixup | 71.0 | +1.0 |" in text  # the other suite's table, same header, untouched
  assert text.count(HEADER) == 2


def test_rows_in_another_order_still_match():
  new = table("| full | 1 | 2 |", "| ce | 3 |  |")
  assert quote_tables.requote(README, new).count("| full | 1 | 2 |") == 1


def test_no_quote_and_two_quotes_are_refused():
  with pytest.raises(quote_tables.QuoteError) as error:
    quote_tables.requote(README, table("| ce | 1 |  |", "| cutmix | 2 | 3 |"), "x/table.md")
  assert error.value.matches == 0 and str(error.value).startswith("x/table.md: 0 tables")
  again = "\n".join(table("| ce | 9 |  |", "| full | 9 | 9 |"))
  twice = README + "\nMore prose.\n\n" + again + "\n"
  with pytest.raises(quote_tables.QuoteError) as error:
    quote_tables.requote(twice, table("| ce | 1 |  |", "| full | 2 | 3 |"))
  assert error.value.matches == 2


def test_a_suite_folder_is_requoted_in_the_file(tmp_path):
  (tmp_path / "suite").mkdir()
  (tmp_path / "suite" / "transfer.md").write_text(
      "# Title\n\n" + "\n".join(table("| ce | 80.5 |  |", "| full | 81.0 | +0.5 |")) + "\n")
  (tmp_path / "suite" / "choices.md").write_text("| a | b |\n|---|---|\n| 1 | 2 |\n")
  (tmp_path / "suite" / "RUN.md").write_text("no table\n")
  readme = tmp_path / "README.md"
  readme.write_text(README)
  assert quote_tables.requote_suite("suite", str(readme)) == (1, ["choices.md"])
  text = readme.read_text()
  assert "| full | 81.0 | +0.5 |" in text and "| mixup | 71.0 | +1.0 |" in text
