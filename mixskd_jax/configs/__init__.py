"""The experiment configs, shipped with the package: one module per config, each an ordinary
`ml_collections` config file whose `get_config(arg)` builds the config and whose docstring gives
its command, expected result and cost.

From Python (a notebook, Colab), no checkout needed:

  from mixskd_jax.configs import default
  config = default.get_config("smoke")   # what --config=...default.py:smoke gives

On the command line `--config=` takes a file: in a checkout, `configs/NAME.py` (thin modules
that re-export these); anywhere the package is installed, `path(NAME)`, which
`python -m mixskd_jax.configs NAME` prints:

  python -m mixskd_jax.main --config="$(python -m mixskd_jax.configs default):smoke" \
      --workdir=/tmp/smoke

Importing this package imports none of the configs.
"""

import os

_DIR = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
  """The configs' names, e.g. ['cifar100_resnet18_ce', ..., 'default', ...]."""
  return sorted(f[:-3] for f in os.listdir(_DIR) if f.endswith(".py") and not f.startswith("_"))


def path(name: str) -> str:
  """The file of config `name` ('default' or 'default.py'), for `--config=PATH[:ARGS]`."""
  name = name[:-3] if name.endswith(".py") else name
  if name not in names():
    raise ValueError(f"Unknown config {name!r}; the configs are: {', '.join(names())}")
  return os.path.join(_DIR, name + ".py")
