"""The command line's own checks, before absl parses the flags: a missing config file, or an
unknown `--config.*` field (`check_command_line`), each answered in one line."""

from __future__ import annotations

import os

from mixskd_jax import config as config_lib


def _flag_values(argv: list[str]) -> tuple[str | None, list[str]]:
  """(the --config value, the dotted names of the --config.* overrides) in `argv`, read the
  way absl reads them: --name=value, --name value, --noname for booleans, up to `--`."""
  config, overrides = None, []
  args = iter(argv)
  for arg in args:
    if arg == "--":
      break
    if not arg.startswith("-"):
      continue
    name, has_value, value = arg.lstrip("-").partition("=")
    if name == "config":
      config = value if has_value else next(args, None)
    elif name.startswith("config."):
      overrides.append(name[len("config."):])
    elif name.startswith("noconfig."):
      overrides.append(name[len("noconfig."):])
  return config, overrides


def _load_config(path: str, arg: str):
  """The config `path:arg` stands for, loaded as ml_collections will load it."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location("mixskd_preflight_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def check_command_line(argv: list[str]) -> str | None:
  """The one-line error for a missing config file or an unknown --config.* field in a
  `mixskd_jax.main` command line (`sys.argv`), checked before absl parses the flags; None when
  it is fine as far as these checks go (absl reports everything else)."""
  value, overrides = _flag_values(argv[1:])
  if not value:
    return None  # absl says --config is missing
  path, _, arg = value.partition(":")
  if not os.path.isfile(path):
    where = ("an absolute path" if os.path.isabs(path)
             else f"resolved against the current directory {os.getcwd()}")
    return f"Config file not found: {path} ({where})"
  if not overrides:
    return None
  try:
    config = _load_config(path, arg)
  # config_flags raises it again, with its traceback.
  except Exception:  # pylint: disable=broad-except
    return None
  for dotted in overrides:
    message = config_lib.unknown_field_error(config, dotted)
    if message:
      return message
  return None
