"""The one door for a config: `validate(config)` checks that every field exists
(`field_names`), holds a value of its type and range (`field_rules.RULES`) and that the fields
agree with each other (`cross_rules.CROSS_RULES`). It imports neither JAX nor TensorFlow, so the
command line answers a bad value in one line before either is loaded:

  config.batch_size = 0: must be an int >= 1 (the global clean batch), or -1 (with
  config.per_device_batch_size set).

Only the checks that need the device count wait for JAX (`train/layout.py`, which raises the
same `ConfigValueError`).
"""

from __future__ import annotations

from typing import Any, Iterator

import ml_collections

from mixskd_jax.config.cross_rules import CROSS_RULES
from mixskd_jax.config.errors import ConfigFieldError, ConfigValueError
from mixskd_jax.config.field_names import all_fields, unknown_field_error
from mixskd_jax.config.field_rules import RULES
from mixskd_jax.config.schema import base_config


def leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """(dotted path, value) of every field of `node` that is not itself a group of fields."""
  for key, value in node.items():
    if isinstance(value, (ml_collections.ConfigDict, dict)):
      yield from leaves(value, f"{prefix}{key}.")
    else:
      yield prefix + key, value


def _value_text(value: Any) -> str:
  """The value as the message shows it: repr, with the type where it is not obvious."""
  shown = repr(value)
  if isinstance(value, (str, bool, int, float, tuple, list)) or value is None:
    return shown
  return f"{shown} (a {type(value).__name__})"


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every field of `config`: names, then each value, then the rules between fields.

  A field that `config` lacks is checked at its `base_config()` value.

  Raises:
    ConfigFieldError: the first field the schema does not have, naming the closest valid one.
    ConfigValueError: the first field whose value breaks its rule, else the first broken rule
      between fields; one line naming the field, the value, what is allowed and what to set.
  """
  schema = base_config()
  for dotted in all_fields(config):
    message = unknown_field_error(schema, dotted)
    if message:
      raise ConfigFieldError(message)
  groups = {path.rsplit(".", 1)[0] for path in RULES if "." in path}
  values = dict(leaves(schema))
  for path, value in leaves(config):
    if path in groups:  # a group of fields replaced by a plain value
      raise ConfigValueError(f"config.{path} = {_value_text(value)}: must be a group of "
                             f"fields (config.{path}.*), as in config.base_config().")
    values[path] = value
  for path, rule in RULES.items():
    why = rule.error(values[path])
    if why:
      raise ConfigValueError(f"config.{path} = {_value_text(values[path])}: {why}.")
  for cross in CROSS_RULES:
    message = cross(values)
    if message:
      raise ConfigValueError(message)
