r"""Train from a config: python -m mixskd_jax.main --config=configs/default.py --workdir=DIR

Any field can be overridden: --config.batch_size=256 --config.objective.variant=reference_cifar
A config file accepts ':smoke' for a tiny run: --config=configs/default.py:smoke

Exit status: 0 when the run is finished; 75 (EX_TEMPFAIL, "temporary failure, retry") when
SIGTERM stopped it early after saving a checkpoint: rerun the same command to resume (on
several processes, rerun all of them). Anything else is an error.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from mixskd_jax.train.loop import train_and_evaluate
from mixskd_jax.train.preemption import PREEMPTED_EXIT_CODE

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.json.")
flags.mark_flags_as_required(["workdir"])
config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/*.py).",
                                lock_config=True)


class _QuietLibraries:
  """Drops INFO lines from orbax, which logs every checkpoint's internals at that level."""

  def filter(self, record):
    return record.levelno > logging.converter.STANDARD_INFO or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  results = train_and_evaluate(FLAGS.config, FLAGS.workdir)
  logging.info("Done: %s", {k: v for k, v in results.items() if k != "history"})
  if results["preempted"]:
    return PREEMPTED_EXIT_CODE  # app.run exits with it: a supervisor reruns the command
  return 0


if __name__ == "__main__":
  app.run(main)
