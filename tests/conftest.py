"""Test set-up: eight fake CPU devices for sharding tests (must precede the first jax import),
and the two tiers: tests marked `slow` (end-to-end training, multi-process, notebooks,
subprocess compiles, live PyTorch comparisons) run only with `--slow` or MIXSKD_SLOW_TESTS=1."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# One persistent JAX compilation cache for the whole run: the pytest processes (with -n 2, the
# controller makes it and both workers inherit it) and every training process a test starts
# compile a program once. The suite is CPU-bound on 2 cores and much of it is compiling the
# same small models. A cached executable computes exactly what a fresh compile does.
CACHE_ENV = "MIXSKD_TEST_COMPILE_CACHE"
if CACHE_ENV not in os.environ:
  os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="mixskd_test_jax_cache_")
  _OWNS_CACHE = True
else:
  _OWNS_CACHE = False
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ[CACHE_ENV])

if os.environ.get("MIXSKD_REQUIRE_TORCH"):
  import torch  # noqa: F401  (fail loudly instead of skipping the PyTorch comparisons)


import pytest  # noqa: E402  (after the environment set-up above)

from mixskd_jax import backends  # noqa: E402

# JAX's backends start here, once per test process: with libtpu installed (a test requirement)
# its start-up lines would otherwise reach the test logs (mixskd_jax/backends.py).
backends.start()

SLOW_ENV = "MIXSKD_SLOW_TESTS"


def pytest_addoption(parser):
  parser.addoption("--slow", action="store_true", default=False,
                   help=f"also run the slow tier (tests marked slow); same as {SLOW_ENV}=1")


def _run_slow(config) -> bool:
  return config.getoption("--slow") or os.environ.get(SLOW_ENV, "") not in ("", "0")


# The files with the longest slow tier (multi-process runs, kill-and-resume chains), heaviest
# first (each file's summed --durations in a full --slow run, December 2026). With `-n 2
# --dist loadfile` a file is one unit of work, handed to whichever process is free, in
# collection order: starting the long files first keeps one process from running a
# three-minute file alone at the end. xdist would otherwise order files by their number of
# tests (`--loadscope-reorder`), which puts these last.
HEAVIEST_FILES = ("test_reliability.py", "test_multihost.py", "test_resume.py",
                  "test_benchmark.py", "test_interop.py", "test_staged.py", "test_experiments.py",
                  "test_notebooks.py", "test_transfer_protocol.py", "test_sharding.py",
                  "test_doc_commands.py", "test_data_faults.py", "test_models.py",
                  "test_configs.py", "test_aot.py", "test_communication.py", "test_breakdown.py",
                  "test_train_loop.py", "test_loss_api.py", "test_signals.py")


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False  # keep the order below (pytest-xdist)


def _heaviest_first(item) -> int:
  name = os.path.basename(str(item.fspath))
  return HEAVIEST_FILES.index(name) if name in HEAVIEST_FILES else len(HEAVIEST_FILES)


def pytest_collection_modifyitems(config, items):
  items.sort(key=_heaviest_first)  # stable: each file keeps its own order
  if _run_slow(config):
    return
  skip = pytest.mark.skip(reason="slow tier: run with --slow")
  for item in items:
    if item.get_closest_marker("slow") is not None:
      item.add_marker(skip)


def pytest_unconfigure(config):
  del config
  if _OWNS_CACHE:
    shutil.rmtree(os.environ[CACHE_ENV], ignore_errors=True)


@pytest.fixture(scope="session")
def subprocess_compile_cache():
  """The run's persistent compilation cache (above), which the training processes a test
  starts inherit: processes that compile the same programs compile them once, ~5 s saved
  each, and the bit-identical resume comparisons hold either way."""
  return os.environ["JAX_COMPILATION_CACHE_DIR"]


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
