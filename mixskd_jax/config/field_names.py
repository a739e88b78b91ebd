"""Field names: `all_fields(config)` and `unknown_field_error`, the one-line answer to a
misspelt field (`--config.optimizer.lr=...`, or `config.batchsize = ...` in Python, which
ml_collections would otherwise accept or reject without a suggestion)."""

from __future__ import annotations

import difflib
from typing import Any, Iterator

import ml_collections


def all_fields(node: Any, prefix: str = "") -> Iterator[str]:
  """Every dotted path of `node`, groups of fields included ("optimizer", "optimizer.momentum")."""
  for key, value in node.items():
    yield prefix + key
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from all_fields(value, f"{prefix}{key}.")


def unknown_field_error(config: ml_collections.ConfigDict, dotted: str) -> str | None:
  """Checks that `dotted` (e.g. "optimizer.learning_rate") names a field of `config`.

  Returns None when it does (or when it reaches into a value that is not a group of fields,
  which ml_collections judges itself), else one line naming the unknown field, the closest
  valid name and the valid names at that level:

    Unknown config field 'batchsize'; did you mean 'batch_size'? (valid fields of config: ...)

  The closest name: the same name elsewhere in the config (`learning_rate` ->
  `optimizer.learning_rate`), else a near spelling (difflib), the initials of a name (`lr` ->
  `learning_rate`) or a name it starts.
  """
  node, parents = config, []
  for name in dotted.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
      return None  # indexing into a value: ml_collections' own error
    if name in node:
      node = node[name]
      parents.append(name)
      continue
    names = list(node.keys())
    prefix = "".join(p + "." for p in parents)
    everywhere = list(all_fields(config))
    same_name = [f for f in everywhere if f.rsplit(".", 1)[-1] == name]
    initials = [n for n in names if "".join(w[:1] for w in n.split("_")) == name.lower()]
    starts = [n for n in names if len(name) >= 2 and n.startswith(name.lower())]
    near = (difflib.get_close_matches(name.lower(), names, 1, 0.6) or initials or starts
            or difflib.get_close_matches(name.lower(), names, 1, 0.4))
    if same_name:
      suggestion = same_name[0]
    elif near:
      suggestion = prefix + near[0]
    else:  # a near spelling of a field in another group
      leaf = {f.rsplit(".", 1)[-1]: f for f in everywhere}
      close = difflib.get_close_matches(name.lower(), list(leaf), 1, 0.75)
      suggestion = leaf[close[0]] if close else None
    unknown = prefix + name
    hint = f"; did you mean '{suggestion}'?" if suggestion else ""
    group = "config" + "".join("." + p for p in parents)
    return (f"Unknown config field '{unknown}'{hint} (valid fields of {group}: "
            f"{', '.join(names)})")
  return None
