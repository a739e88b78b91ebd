"""Test set-up: eight fake CPU devices for sharding tests (must precede the first jax import)."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if os.environ.get("MIXSKD_REQUIRE_TORCH"):
  import torch  # noqa: F401  (fail loudly instead of skipping the PyTorch comparisons)
