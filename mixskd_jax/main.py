r"""Train from a config: python -m mixskd_jax.main --config=configs/default.py --workdir=DIR

Any field can be overridden: --config.batch_size=256 --config.objective.variant=reference_cifar
A config file accepts ':smoke' for a tiny run: --config=configs/default.py:smoke

The terminal shows a progress line every config.log_every_steps steps (and at least every
minute), an evaluation line per evaluation, and at the end a short summary: test top-1 of
every head and where results.json, the checkpoints and the TensorBoard logs are.

Before anything is loaded or compiled, the command checks that every --config.* field exists,
that the config file exists, that the workdir can be written and that the dataset is
prepared or can be downloaded (mixskd_jax/train/preflight.py).

Exit status: 0 when the run is finished; 2 when one of those checks fails (one line on
stderr says what to fix); 75 (EX_TEMPFAIL, "temporary failure, retry") when SIGTERM stopped it
early after saving a checkpoint: rerun the same command to resume (on several processes,
rerun all of them). Anything else is an error (with its traceback).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

# None of these imports TensorFlow: `run` quiets its start-up before it is imported.
from mixskd_jax.train import preflight, progress
from mixskd_jax.train.preemption import PREEMPTED_EXIT_CODE

USAGE_ERROR_EXIT_CODE = 2

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.json.")
flags.mark_flags_as_required(["workdir"])
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file: configs/NAME.py in a checkout, or the one "
    "`python -m mixskd_jax.configs NAME` prints.", lock_config=True)


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
  """The one-line error for a missing config file or an unknown --config.* field; None when
  the command line is fine as far as these checks go (absl reports everything else)."""
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
  from mixskd_jax import config_schema  # pylint: disable=import-outside-toplevel
  try:
    config = _load_config(path, arg)
  except Exception:  # pylint: disable=broad-except  (config_flags raises it again, traceback and all)
    return None
  for dotted in overrides:
    message = config_schema.unknown_field_error(config, dotted)
    if message:
      return message
  return None


def _fail(message: str) -> int:
  sys.stderr.flush()
  print(message, file=sys.stderr, flush=True)
  return USAGE_ERROR_EXIT_CODE


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  progress.configure_console()
  if FLAGS.config is None:
    return _fail("--config=PATH is required, e.g. --config=configs/default.py")
  try:
    created = preflight.check_workdir(FLAGS.workdir)
  except (preflight.PreflightError, ValueError) as e:
    return _fail(str(e))
  # TensorFlow, JAX's backends and the data pipeline load here, after the cheap checks.
  from mixskd_jax.train.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
  try:
    results = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except preflight.PreflightError as e:
    preflight.remove_if_empty(created)
    return _fail(str(e))
  progress.print_lines(progress.summary_lines(results, FLAGS.workdir))
  if results["preempted"]:
    return PREEMPTED_EXIT_CODE  # app.run exits with it: a supervisor reruns the command
  return 0


def run() -> None:
  """The command: the command-line checks, then absl's flag parsing and `main`."""
  message = check_command_line(sys.argv)
  if message:
    sys.exit(_fail(message))
  progress.quiet_tensorflow_startup()  # before clu, tfds or the data package import it
  app.run(main)


if __name__ == "__main__":
  run()
