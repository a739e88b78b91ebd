"""Compiles configs' train steps ahead of time on N fake CPU devices, in a fresh process (the
device count is fixed at start-up), and prints what the compiled step communicates:
python tests/compile_runner.py DEVICES CONFIG_PATH[:ARGS] ..."""

import json
import os
import sys


def main():
  devices, paths = int(sys.argv[1]), sys.argv[2:]
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  root = os.path.join(os.path.dirname(__file__), os.pardir)
  sys.path.insert(0, root)
  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags
  from mixskd_jax import benchmark
  out = {}
  for path in paths:
    config = config_flags.config_flags._ConfigFileParser(name="config").parse(  # pylint: disable=protected-access
        os.path.join(root, path))
    step = benchmark.measure_step(config, steps=0)
    out[path] = {k: step[k] for k in ("communication", "parameter_bytes", "batch_size",
                                      "devices", "mix_groups", "batchnorm_groups", "memory",
                                      "flops_per_step_per_device")}
  print("COMPILED", json.dumps(out))


if __name__ == "__main__":
  main()
