"""Runs one training in a fresh process, for tests that need their own device count, several
processes (multi-host) or to kill a run: python tests/train_runner.py --help.

Prints `RESULTS <json>` and exits like `mixskd_jax.main`: 0, or PREEMPTED_EXIT_CODE (75) when
SIGTERM stopped the run early after saving its checkpoint."""

import argparse
import json
import os
import sys


def parse_args():
  parser = argparse.ArgumentParser()
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--devices", type=int, default=1, help="fake CPU devices of this process")
  parser.add_argument("--overrides", default="{}", help="JSON of dotted config fields")
  parser.add_argument("--dump", help="write the final params here (.npz), from every process")
  parser.add_argument("--dump_init", help="write the params before the first step here (.npz)")
  parser.add_argument("--dump_all", action="store_true",
                      help="dump the whole train state (optimizer state, step, ...), not only "
                           "the params")
  return parser.parse_args()


def main():
  args = parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from mixskd_jax.run.loop import Trainer  # pylint: disable=import-outside-toplevel
  from mixskd_jax.run.preemption import PREEMPTED_EXIT_CODE  # pylint: disable=import-outside-toplevel
  from tests.training_configs import tiny_config  # pylint: disable=import-outside-toplevel

  config = tiny_config(json.loads(args.overrides))
  trainer = Trainer(config, args.workdir)

  def dump(path, tree):
    np.savez(path, **{jax.tree_util.keystr(key): np.asarray(leaf.addressable_data(0))
                      for key, leaf in jax.tree_util.tree_leaves_with_path(tree)})

  if args.dump_init:
    dump(args.dump_init, trainer.state.params)
  results = trainer.run()
  if args.dump:
    dump(args.dump, trainer.state if args.dump_all else trainer.state.params)
  print("RESULTS", json.dumps({k: v for k, v in results.items() if k != "history"}), flush=True)
  sys.exit(PREEMPTED_EXIT_CODE if results["preempted"] else 0)


if __name__ == "__main__":
  main()
