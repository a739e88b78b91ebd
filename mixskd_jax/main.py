r"""Train from a config: python -m mixskd_jax.main --config=configs/default.py --workdir=DIR

Any field can be overridden: --config.batch_size=256 --config.objective.variant=reference_cifar
A config file accepts ':smoke' for a tiny run: --config=configs/default.py:smoke

The terminal shows a progress line every config.log_every_steps steps (and at least every
minute), an evaluation line per evaluation, and at the end a short summary: test top-1 of
every head and where results.json, the checkpoints and the TensorBoard logs are.

Before anything is loaded or compiled, the command checks that the config file exists, that
the config passes its one door (`mixskd_jax.config.validate`: every field exists, holds a value
of its type and range, and agrees with the others; before JAX or TensorFlow is imported), that
the workdir can be written and that the dataset is prepared or can be downloaded
(mixskd_jax/run/preflight.py). The rules that need the device count follow once JAX is up.

Exit status: 0 when the run is finished; 2 when one of those checks fails (one line on
stderr says what to fix); 75 (EX_TEMPFAIL, "temporary failure, retry") when SIGTERM stopped it
early after saving a checkpoint: rerun the same command to resume (on several processes,
rerun all of them). Ctrl-C during training is the same as SIGTERM (one line says so): the run
stops after the current step, saves it and exits with 75 (on several processes, all of them).
A second Ctrl-C, or in one process one before the first step is done (start-up, data loading,
the first compile), ends the command at once with 130 and one line: rerunning resumes from the
latest checkpoint. Anything else is an error (with its traceback).
"""

import sys

from absl import app, flags
from ml_collections import config_flags

# None of these imports JAX or TensorFlow: `run` quiets TensorFlow's start-up before it loads.
from mixskd_jax.config.errors import PreflightError
from mixskd_jax.run import command_line, preflight, progress
from mixskd_jax.run.interrupt import PREEMPTED_EXIT_CODE, install_exit_on_interrupt
from mixskd_jax.store.workdir import remove_if_empty

USAGE_ERROR_EXIT_CODE = 2
FAILED_EXIT_CODE = 1  # diverged, or no checkpoint fits: rerunning alone would not help
IO_ERROR_EXIT_CODE = 74  # EX_IOERR (sysexits.h): a checkpoint could not be written

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.json.")
flags.mark_flags_as_required(["workdir"])
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file: configs/NAME.py in a checkout, or the one "
    "`python -m mixskd_jax.configs NAME` prints.", lock_config=True)


def _fail(message: str, code: int = USAGE_ERROR_EXIT_CODE) -> int:
  sys.stderr.flush()
  print(message, file=sys.stderr, flush=True)
  return code


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  progress.configure_console()
  if FLAGS.config is None:
    return _fail("--config=PATH is required, e.g. --config=configs/default.py")
  try:  # the config's one door first: a bad value answers before JAX or TensorFlow loads
    created = preflight.check_run(FLAGS.config, FLAGS.workdir,
                                  before_dataset=progress.quiet_tensorflow_startup)
  except (PreflightError, ValueError) as e:  # ValueError: a workdir URI scheme we cannot write
    return _fail(str(e))
  # JAX's backends and the data pipeline load here, after the checks.
  from mixskd_jax.run.loop import train_checked  # pylint: disable=import-outside-toplevel
  # pylint: disable=import-outside-toplevel
  from mixskd_jax.store.checkpoint import CheckpointError, CheckpointWriteError
  from mixskd_jax.run.divergence import DivergenceError
  try:
    results = train_checked(FLAGS.config, FLAGS.workdir)
  except PreflightError as e:  # the workdir's owner, the device-count rules, init_from
    remove_if_empty(created)
    return _fail(str(e))
  except CheckpointWriteError as e:  # disk full, read-only: the older checkpoints are intact
    return _fail(str(e), IO_ERROR_EXIT_CODE)
  except (DivergenceError, CheckpointError) as e:
    return _fail(str(e), FAILED_EXIT_CODE)
  progress.print_lines(progress.summary_lines(results, FLAGS.workdir))
  if results["preempted"]:
    return PREEMPTED_EXIT_CODE  # app.run exits with it: a supervisor reruns the command
  return 0


def run() -> None:
  """The command: the command-line checks, then absl's flag parsing and `main`."""
  # Ctrl-C ends the command at once with status 130 (the training loop makes the first one a
  # SIGTERM): never the KeyboardInterrupt that crashes the exit under a running compile.
  install_exit_on_interrupt()
  message = command_line.check_command_line(sys.argv)
  if message:
    sys.exit(_fail(message))
  app.run(main)


if __name__ == "__main__":
  run()
