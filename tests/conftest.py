"""Test set-up: eight fake CPU devices for sharding tests (must precede the first jax import),
and the two tiers: tests marked `slow` (end-to-end training, multi-process, notebooks,
subprocess compiles, live PyTorch comparisons) run only with `--slow` or MIXSKD_SLOW_TESTS=1."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

if os.environ.get("MIXSKD_REQUIRE_TORCH"):
  import torch  # noqa: F401  (fail loudly instead of skipping the PyTorch comparisons)


import pytest  # noqa: E402  (after the environment set-up above)

SLOW_ENV = "MIXSKD_SLOW_TESTS"


def pytest_addoption(parser):
  parser.addoption("--slow", action="store_true", default=False,
                   help=f"also run the slow tier (tests marked slow); same as {SLOW_ENV}=1")


def _run_slow(config) -> bool:
  return config.getoption("--slow") or os.environ.get(SLOW_ENV, "") not in ("", "0")


def pytest_collection_modifyitems(config, items):
  if _run_slow(config):
    return
  skip = pytest.mark.skip(reason="slow tier: run with --slow")
  for item in items:
    if item.get_closest_marker("slow") is not None:
      item.add_marker(skip)


@pytest.fixture(scope="session")
def subprocess_compile_cache(tmp_path_factory):
  """JAX's persistent compilation cache for the training processes a test starts (set in the
  environment they inherit; this process's JAX read its settings at import): processes that
  compile the same programs compile them once, ~5 s saved each. A cached executable computes
  exactly what a fresh compile does: the bit-identical resume comparisons hold either way."""
  previous = os.environ.get("JAX_COMPILATION_CACHE_DIR")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = str(tmp_path_factory.mktemp("jax_cache"))
  yield os.environ["JAX_COMPILATION_CACHE_DIR"]
  if previous is None:
    del os.environ["JAX_COMPILATION_CACHE_DIR"]
  else:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = previous


@pytest.fixture
def fashion_mnist_offline(tmp_path, monkeypatch):
  """No tfds download, an empty tfds data_dir and an empty IDX folder: returns both paths."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  def no_network(self, *args, **kwargs):
    raise ConnectionError("no network in this test")
  monkeypatch.setattr(tfds.image_classification.FashionMNIST, "download_and_prepare", no_network)
  empty = tmp_path / "idx"
  empty.mkdir()
  return str(tmp_path / "tfds"), str(empty)
