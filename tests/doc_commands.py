"""The documentation's shell commands, checked against the real commands' flag parsers.

Running `python -m mixskd_jax.main --config=configs/cifar100_resnet18_mixskd.py ...` takes days;
what a test can check cheaply is that the command as written would start: the module exists, it
defines every flag the command passes, each value parses, and the config it builds passes the
config's one door (`mixskd_jax.config.validate`). `parse_command` does that in a subprocess (absl
flags are process-global) by running the module as `python -m` would, with `absl.app.run`
replaced by a parse that stops before `main` runs.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

from tests.doc_blocks import ROOT

# The training-config commands: their --config is a training config, which validate() checks.
TRAINING_CONFIG_MODULES = ("mixskd_jax.main", "mixskd_jax.benchmark", "mixskd_jax.aot")

_PARSE_ONLY = r"""
import json, runpy, sys
from absl import app, flags

module, validate, args = sys.argv[1], sys.argv[2] == "1", sys.argv[3:]


def parse_only(main, argv=None, **kwargs):
  del main, argv, kwargs
  FLAGS = flags.FLAGS
  FLAGS([module] + args)
  given = {name: FLAGS[name].value for name in FLAGS
           if FLAGS[name].present and not name.startswith("config.")}
  config = FLAGS["config"].value if "config" in FLAGS else None
  if config is not None and validate:
    from mixskd_jax import config as config_lib
    config_lib.validate(config)
  given.pop("config", None)
  print("PARSED " + json.dumps({"flags": given,
                                "config": None if config is None else config.to_dict()},
                               default=str))
  sys.exit(0)


app.run = parse_only
sys.argv = [module] + args
runpy.run_module(module, run_name="__main__", alter_sys=True)
raise SystemExit(module + " ended without calling absl.app.run")
"""


def shell_lines(block: str) -> list[str]:
  """The block's commands: continuation lines joined, comments and blank lines dropped."""
  joined = block.replace("\\\n", " ")
  lines = [line.split(" # ")[0].strip() for line in joined.splitlines()]
  return [line for line in lines if line and not line.startswith("#")]


def python_commands(block: str) -> list[list[str]]:
  """The words of each `python -m ...` command in the block (environment assignments before
  the command dropped)."""
  commands = []
  for line in shell_lines(block):
    words = shlex.split(line)
    while words and "=" in words[0] and not words[0].startswith("-"):
      words = words[1:]
    if words[:2] in (["python", "-m"], ["python3", "-m"]):
      commands.append(words)
  return commands


def parse_command(words: list[str], *, validate: bool | None = None) -> dict:
  """`python -m MODULE ARGS...` parsed by MODULE's own flags, stopping before its `main`.

  Returns {"flags": {flag: value, for the flags given}, "config": the config as a dict, or
  None}. Fails the calling test, with the command's stderr, when the module does not parse the
  command. `validate` defaults to whether MODULE takes a training config.
  """
  assert words[:2] in (["python", "-m"], ["python3", "-m"]), words
  module, args = words[2], words[3:]
  if validate is None:
    validate = module in TRAINING_CONFIG_MODULES
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  out = subprocess.run([sys.executable, "-c", _PARSE_ONLY, module, "1" if validate else "0",
                        *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  parsed = [line for line in out.stdout.splitlines() if line.startswith("PARSED ")]
  assert out.returncode == 0 and parsed, (
      f"{shlex.join(words)} does not parse:\n{out.stderr[-3000:]}")
  return json.loads(parsed[-1][len("PARSED "):])
