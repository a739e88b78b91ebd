"""`dotted.field=value` overrides of a config, as the experiment commands' --set flags give them."""

from __future__ import annotations

import json
import re

from mixskd_jax import config as config_lib


def apply_override(config, assignment: str) -> None:
  """`a.b=value` -> config.a.b = value, parsed as the field's current type."""
  if "=" not in assignment:
    raise ValueError(f"--set={assignment!r} must look like dotted.field=value.")
  dotted, text = assignment.split("=", 1)
  unknown = config_lib.unknown_field_error(config, dotted)
  if unknown:  # "Unknown config field 'a.b'; did you mean 'a.c'? (valid fields of ...)"
    missing = re.search(r"field '([^']+)'", unknown).group(1)
    suggestion = re.search(r"did you mean '([^']+)'", unknown)
    raise ValueError(f"--set={assignment!r}: the config has no field {missing!r}"
                     + (f"; did you mean {suggestion.group(1)!r}?" if suggestion else "."))
  *parents, leaf = dotted.split(".")
  node = config
  for name in parents:
    node = node[name]
  if leaf not in node:
    raise ValueError(f"--set={assignment!r}: the config has no field {dotted!r}.")
  current = node[leaf]
  if current is None and text.lower() != "none":
    # A placeholder: parse the text as the field's declared type (int, float, bool, str, ...).
    kind = node.get_type(leaf)
    if kind in (int, float):
      node[leaf] = kind(text)
      return
    if kind is bool:
      node[leaf] = text.lower() in ("1", "true", "yes")
      return
    if kind in (tuple, list):
      node[leaf] = kind(json.loads(text))
      return
  if isinstance(current, bool):
    value = text.lower() in ("1", "true", "yes")
  elif isinstance(current, (int, float)) and not isinstance(current, bool):
    value = type(current)(text)
  elif current is None or isinstance(current, str):
    value = None if text.lower() == "none" else text
  else:
    value = json.loads(text)
  node[leaf] = value
