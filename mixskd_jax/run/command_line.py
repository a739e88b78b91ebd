"""The command line's own checks, before absl parses the flags: a missing config file, one that
does not load, or an unknown `--config.*` field (`check_command_line`), each answered in one
line."""

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


def _line_in(error: BaseException, path: str) -> str:
  """', line N' of the innermost frame of `error`'s traceback in the file `path`, or ''."""
  import traceback  # pylint: disable=import-outside-toplevel
  lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
           if os.path.abspath(frame.filename) == os.path.abspath(path)]
  return f", line {lines[-1]}" if lines else ""


def check_command_line(argv: list[str]) -> str | None:
  """The one-line error for a missing config file, one that does not load (a syntax error: the
  file, the line and the error; anything its code raises: the file, the line and the
  exception), or an unknown --config.* field in a `mixskd_jax.main` command line
  (`sys.argv`), checked before absl parses the flags; None when it is fine as far as these
  checks go (absl reports everything else)."""
  value, overrides = _flag_values(argv[1:])
  if not value:
    return None  # absl says --config is missing
  path, _, arg = value.partition(":")
  if not os.path.isfile(path):
    where = ("an absolute path" if os.path.isabs(path)
             else f"resolved against the current directory {os.getcwd()}")
    return f"Config file not found: {path} ({where})"
  try:
    config = _load_config(path, arg)
  except SyntaxError as e:  # the file's own line, not the loader's stack
    where = f"{e.filename or path}, line {e.lineno}"
    text = f": {e.text.strip()}" if e.text and e.text.strip() else ""
    return f"Config file {where}: {type(e).__name__}: {e.msg}{text}"
  except Exception as e:  # pylint: disable=broad-except  (whatever the file's code raises)
    return f"Config file {path}{_line_in(e, path)} failed to load: {type(e).__name__}: {e}"
  for dotted in overrides:
    message = config_lib.unknown_field_error(config, dotted)
    if message:
      return message
  return None
