r"""Evaluate a pre-trained backbone with the fair transfer protocol.

  python -m mixskd_jax.transfer --init_from=/tmp/mixskd_default --workdir=/tmp/transfer

--init_from is a training workdir of ours (its newest checkpoint), one of its
`checkpoints/<N>` directories, or a directory `python -m mixskd_jax.interop` wrote. The
protocol (`mixskd_jax/transfer/config.py`, overridable with --config.FIELD=VALUE): a linear
probe, fine-tuning and segmentation on Fashion-MNIST classes 5-9 from 50 labels per class,
each with its learning rate and BatchNorm mode chosen on validation, then measured once on
test. Writes `<workdir>/<task>.json`, `diagnostics.json` and `results.json`; a task already
written is not run again. Bad input (a missing or unreadable --init_from, a backbone that does
not fit the data, a dataset that is not there offline, a config field out of range) ends with one line on stderr and exit status 2.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

if __name__ == "__main__":  # before anything imports TensorFlow (tfds): a quiet start-up
  from mixskd_jax.run import progress as _progress
  _progress.quiet_tensorflow_startup()

# pylint: disable=wrong-import-position
from mixskd_jax import backends
from mixskd_jax.data.sources import DatasetUnavailableError
from mixskd_jax.interop.pretrained import PretrainedError
from mixskd_jax.run import progress
# pylint: enable=wrong-import-position

USAGE_ERROR_EXIT_CODE = 2
_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "config.py")

FLAGS = flags.FLAGS
flags.DEFINE_string("init_from", None, "the pre-trained run's workdir (or a checkpoint step, or "
                    "a converted checkpoint); sets --config.init_from.path")
flags.DEFINE_string("workdir", None, "results go here")
flags.mark_flags_as_required(["workdir"])
config_flags.DEFINE_config_file("config", _CONFIG, "the transfer protocol's config file")


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  progress.configure_console()
  backends.start()  # before the first array: no libtpu lines on a CPU host
  from mixskd_jax.transfer import run  # pylint: disable=import-outside-toplevel
  config = FLAGS.config
  if FLAGS.init_from:
    config.init_from.path = FLAGS.init_from
  try:
    results = run.run_transfer(config, FLAGS.workdir, log=absl_logging.info)
  except (run.TransferConfigError, PretrainedError, DatasetUnavailableError) as e:
    print(str(e).splitlines()[0], file=sys.stderr, flush=True)
    return USAGE_ERROR_EXIT_CODE
  print(run.summary_line(results))
  print(f"Results: {os.path.join(FLAGS.workdir, run.RESULTS_FILE)}")
  return 0


if __name__ == "__main__":
  sys.exit(app.run(main))
