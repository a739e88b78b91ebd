"""What the measuring commands (`mixskd_jax.benchmark`, `mixskd_jax.aot`) share on their
command line: the `--config` flag and the label their reports carry."""

from __future__ import annotations

import sys


def define_config_flag() -> None:
  """`--config=PATH[:tokens]` with its `--config.<field>` overrides (absl, ml_collections)."""
  # pylint: disable=import-outside-toplevel  (flags are defined only when a command runs)
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file(
      "config", None, "Path to a config file: configs/NAME.py in a checkout, or the one "
      "`python -m mixskd_jax.configs NAME` prints.", lock_config=True)
  flags.mark_flags_as_required(["config"])


def config_label(argv: list[str] | None = None) -> str:
  """The --config argument as given (path and ':tokens'), for a report's title."""
  for arg in (sys.argv if argv is None else argv)[1:]:
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
  return ""
