"""The tests' name for `mixskd_jax.interop.torch_reference` (the independent PyTorch model and
objective), kept for `from tests import torch_reference` and the notebook that loads this file
from a checkout."""

from mixskd_jax.interop.torch_reference import *  # noqa: F401,F403
from mixskd_jax.interop.torch_reference import __all__  # noqa: F401
