"""The notebooks in experiments/notebooks run top to bottom (at their smoke settings) and report
what they claim: each ends with a `NOTEBOOK_RESULT {json}` line that is checked here.

Each notebook runs in a fresh python3 kernel of this interpreter, with MIXSKD_NOTEBOOK_SMOKE=1
and the Agg matplotlib backend, and makes `import mixskd_jax` work with its own install cell.
Most start outside the checkout, as on Colab, with mixskd_jax not importable: the install cell
pip installs a copy of the package (MIXSKD_SOURCE) into a temporary prefix, and the notebook
runs on that installed copy (configs included). load_checkpoint_predict.ipynb runs both there
and in the notebooks' folder of the checkout, as Jupyter would start it there, where the
install cell imports the checkout as it is and the notebook checks the conversion of an
official checkpoint against the checkout's PyTorch model (tests/torch_reference.py).
"""

import importlib.util
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from tests.doc_blocks import doc_block
from tests.doc_commands import shell_lines

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))
NOTEBOOK_DIR = os.path.join(REPO, "experiments", "notebooks")
NOTEBOOKS = ["quickstart.ipynb", "own_model_losses.ipynb", "load_checkpoint_predict.ipynb",
             "colab_own_backbone.ipynb"]
CELL_TIMEOUT_S = 300  # a hang guard: at smoke settings the slowest cell takes ~25 s on 2 cores
RESULT_MARKER = "NOTEBOOK_RESULT "


def _has_torch():
  """What load_checkpoint_predict.ipynb decides its stand-in format by."""
  return importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="module")
def kernel_dir(tmp_path_factory):
  """A kernels/ folder holding a `python3` kernelspec that runs this very interpreter.

  The kernelspec that `jupyter kernelspec list` finds first may belong to another Python
  (another virtualenv, a system install); writing our own makes the notebooks import the
  packages this test session has.
  """
  from ipykernel.kernelspec import write_kernel_spec  # pylint: disable=import-outside-toplevel
  kernels = tmp_path_factory.mktemp("jupyter") / "kernels"
  write_kernel_spec(path=str(kernels / "python3"))
  return str(kernels)


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """A JAX compilation cache shared by the notebooks' kernels: quickstart and
  load_checkpoint_predict train the same smoke config, so the second one skips recompiling
  the model's init, train and eval steps (~14 s of its ~24 s training cell on 2 cores)."""
  return str(tmp_path_factory.mktemp("jax_cache"))


def kernel_environment(output_dir, cache_dir, changes=None):
  """The kernel's environment: smoke settings, headless matplotlib (and, as a user's kernel,
  no path to the checkout: the notebooks' install cells make mixskd_jax importable).

  changes: variables to set on top (a value None removes the variable).
  """
  env = dict(os.environ)
  # conftest.py fakes 8 CPU devices for the sharding tests; a notebook should see the machine
  # as a user's kernel does (and 8 fake devices on 2 cores only slow it down).
  env.pop("XLA_FLAGS", None)
  # A real checkpoint or a forced stand-in format would change what the notebook checks.
  env.pop("MIXSKD_OFFICIAL_CHECKPOINT", None)
  env.pop("MIXSKD_NOTEBOOK_STAND_IN_FORMAT", None)
  env.update(MIXSKD_NOTEBOOK_SMOKE="1", MIXSKD_NOTEBOOK_OUTPUT_DIR=str(output_dir),
             MPLBACKEND="Agg", TF_CPP_MIN_LOG_LEVEL="2", JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  for key, value in (changes or {}).items():
    if value is None:
      env.pop(key, None)
    else:
      env[key] = value
  return env


def run_notebook(name, kernel_dir, cache_dir, output_dir, *, cwd=NOTEBOOK_DIR, env=None):
  """Executes a notebook and returns the JSON of its NOTEBOOK_RESULT line.

  cwd: the kernel's working directory. env: `kernel_environment`'s `changes`.
  """
  with open(os.path.join(NOTEBOOK_DIR, name)) as f:
    nb = nbformat.read(f, as_version=4)
  km = AsyncKernelManager(kernel_name="python3",
                          kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernel_dir]))
  client = nbclient.NotebookClient(nb, km=km, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": str(cwd)}})
  # Raises on a cell's error. cleanup_kc: nbclient leaves a kernel it was handed running (one
  # idle kernel of up to 2.5 GB per notebook until the test process ends); shut it down.
  client.execute(cleanup_kc=True, env=kernel_environment(output_dir, cache_dir, changes=env))
  # A cell's printed text may arrive as several stream outputs: join them before splitting.
  text = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                 for out in cell.get("outputs", []) if out.get("output_type") == "stream")
  lines = [line for line in text.splitlines() if line.startswith(RESULT_MARKER)]
  assert len(lines) == 1, f"{name} printed {len(lines)} {RESULT_MARKER!r} lines"
  return json.loads(lines[0][len(RESULT_MARKER):])


def assert_accuracy(value):
  assert 0.0 <= value <= 100.0, value


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_clean_valid_v4_with_a_smoke_parameter_cell(name):
  """Committed without outputs, valid nbformat v4, and the first code cell is the parameters
  cell that reads MIXSKD_NOTEBOOK_SMOKE (what makes this test fast)."""
  with open(os.path.join(NOTEBOOK_DIR, name)) as f:
    nb = nbformat.read(f, as_version=4)
  nbformat.validate(nb)
  assert nb.nbformat == 4
  code_cells = [c for c in nb.cells if c.cell_type == "code"]
  assert all(not c.outputs and c.execution_count is None for c in code_cells)
  assert "MIXSKD_NOTEBOOK_SMOKE" in code_cells[0].source
  assert "parameters" in code_cells[0].metadata.get("tags", [])


# What `pip install <source folder>` reads besides the package (pyproject.toml's readme and
# its dynamic dependencies files).
PACKAGE_FILES = ["pyproject.toml", "README.md", "requirements.txt", "requirements-cpu.txt",
                 "requirements-torch.txt"]


@pytest.fixture(scope="module")
def package_source(tmp_path_factory):
  """A copy of the package as a source folder for the install cells' `pip install`: pip builds
  a source folder in place (build/, *.egg-info), so it gets a copy instead of the checkout."""
  source = tmp_path_factory.mktemp("source")
  shutil.copytree(os.path.join(REPO, "mixskd_jax"), source / "mixskd_jax",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
  for name in PACKAGE_FILES:
    shutil.copy(os.path.join(REPO, name), source / name)
  return str(source)


def mixskd_jax_preinstalled(env, cwd):
  """Whether a kernel with this environment imports mixskd_jax before any install cell runs
  (e.g. after `pip install -e .`): then the install cell has nothing to do."""
  probe = subprocess.run([sys.executable, "-c", "import importlib.util as u; "
                          "print(u.find_spec('mixskd_jax') is not None)"],
                         cwd=cwd, env=env, check=True, capture_output=True, text=True)
  return probe.stdout.strip() != "False"


class Outside:
  """A kernel started outside the checkout (as on Colab), whose install cell pip installs
  `source` into a fresh temporary prefix instead of the environment.

  cwd: the kernel's working directory; env: `kernel_environment`'s changes; site: the prefix's
  site-packages (on the kernel's PYTHONPATH, empty until the install cell runs); preinstalled:
  mixskd_jax is importable anyway (this interpreter has it installed), so the install cell
  skips.
  """

  def __init__(self, tmp_path, source, cache_dir):
    # PIP_PREFIX, not PIP_TARGET: pip passes PIP_TARGET on to the subprocess that installs the
    # build requirements (build isolation), which then fails ("Cannot set --home and --prefix").
    prefix = tmp_path / "prefix"
    self.site = sysconfig.get_path("purelib", sysconfig.get_preferred_scheme("prefix"),  # pip's
                                   vars={"base": str(prefix), "platbase": str(prefix)})
    os.makedirs(self.site)
    self.cwd = tmp_path / "outside"  # the kernel's working directory: outside the checkout
    self.cwd.mkdir()
    self.env = {"MIXSKD_SOURCE": source, "PIP_PREFIX": str(prefix), "PYTHONPATH": self.site,
                "PYTHONNOUSERSITE": "1", "PIP_TARGET": None, "PIP_USER": None}
    self.preinstalled = mixskd_jax_preinstalled(
        kernel_environment(tmp_path, cache_dir, self.env), self.cwd)

  def assert_installed_here(self, path):
    """`path` (a module's file or folder) is in the package the install cell installed."""
    if not self.preinstalled:
      package = os.path.realpath(os.path.join(self.site, "mixskd_jax"))
      assert os.path.commonpath([os.path.realpath(path), package]) == package, path


@pytest.mark.slow
def test_quickstart(kernel_dir, compilation_cache, package_source, tmp_path):
  """From outside the checkout: the install cell installs the package with its dependencies,
  and the notebook trains the package's default config (12 smoke steps) to the end, reads its
  TensorBoard scalars and eval history, and reports every head's test top-1."""
  outside = Outside(tmp_path, package_source, compilation_cache)
  result = run_notebook("quickstart.ipynb", kernel_dir, compilation_cache, tmp_path,
                        cwd=outside.cwd, env=outside.env)
  outside.assert_installed_here(result["installed_from"])
  outside.assert_installed_here(result["config_file"])  # the configs come with the package
  assert os.path.basename(result["config_file"]) == "default.py"
  assert result["finished"] and result["steps"] == 12
  assert result["eval_points"] == 3  # 4 steps per epoch at smoke settings
  assert set(result["top1"]) == {"backbone", "branch1", "branch2", "self_teacher"}
  for value in result["top1"].values():
    assert_accuracy(value)
  assert math.isfinite(result["train_loss_first"]) and math.isfinite(result["train_loss_last"])


@pytest.mark.slow
def test_own_model_losses(kernel_dir, compilation_cache, package_source, tmp_path):
  """From outside the checkout, on the installed package: a model the library never saw
  trains with the MixSKD objective: every term is finite, the supervised terms go down, the
  heads beat chance, and the `full` variant's frozen discriminators do not move."""
  outside = Outside(tmp_path, package_source, compilation_cache)
  result = run_notebook("own_model_losses.ipynb", kernel_dir, compilation_cache, tmp_path,
                        cwd=outside.cwd, env=outside.env)
  outside.assert_installed_here(result["installed_from"])
  assert result["variant"] == "full"
  for window in ("first", "last"):
    assert all(math.isfinite(v) for v in result[window].values()), result[window]
  for term in ("loss", "clean_ce", "mixup_ce", "self_teacher_ce"):
    assert result["last"][term] < result["first"][term], term
  for value in result["accuracy"].values():
    assert_accuracy(value)
  assert result["accuracy"]["main"] > 30.0  # chance is 10%
  assert result["discriminators_unchanged"] and not result["network_unchanged"]


@pytest.mark.slow
@pytest.mark.parametrize("where", ["checkout", "outside"])
def test_load_checkpoint_predict(where, kernel_dir, compilation_cache, package_source,
                                 tmp_path):
  """(a) The restored Orbax checkpoint is the trained state: same step, same test accuracy,
  and its exported backbone predicts what the MixSKD backbone head predicts. (b) The official
  layout file converts, and our converted model's logits (every head and the self-teacher, in
  eval mode) equal an independent PyTorch model's, or, without PyTorch or without a checkout
  (where the notebook has no tests/torch_reference.py: the `outside` run, as on Colab), the
  weights the .npz stand-in was made from.

  `checkout`: Jupyter started in the notebooks' folder of a checkout that is not installed;
  the install cell imports the checkout."""
  if where == "outside":
    outside = Outside(tmp_path, package_source, compilation_cache)
    cwd, env = outside.cwd, outside.env
  else:
    cwd, env = NOTEBOOK_DIR, None
  result = run_notebook("load_checkpoint_predict.ipynb", kernel_dir, compilation_cache,
                        tmp_path, cwd=cwd, env=env)
  if where == "outside":
    outside.assert_installed_here(result["installed_from"])
  elif not mixskd_jax_preinstalled(kernel_environment(tmp_path, compilation_cache), tmp_path):
    assert os.path.realpath(result["installed_from"]) == os.path.realpath(
        os.path.join(REPO, "mixskd_jax"))
  assert result["restored_step"] == result["trained_step"] == 8
  assert result["restored_top1"] == pytest.approx(result["results_top1"], abs=1e-6)
  assert_accuracy(result["restored_top1"])
  assert_accuracy(result["batch_top1"])
  assert result["backbone_export_max_abs_diff"] <= 1e-5
  assert result["stand_in"] and result["num_heads_compared"] == 5
  if _has_torch() and where == "checkout":
    assert result["torch_reference"]
    assert (result["stand_in_format"], result["reference"]) == ("pth", "pytorch")
    assert result["max_rel_diff"] <= 1e-4
  else:
    assert not result["torch_reference"]
    assert (result["stand_in_format"], result["reference"]) == ("npz", "flax_roundtrip")
    assert result["max_rel_diff"] == 0.0
  assert len(result["predicted_classes"]) == 8
  assert all(0 <= c < 100 for c in result["predicted_classes"])  # CIFAR-100 classes


@pytest.fixture(scope="module")
def package_wheel(package_source, tmp_path_factory):
  """The wheel the notebooks' install cell tells a Colab user to build and upload, built from a
  copy of the checkout by the command docs/notebooks.md gives (`pip wheel . --no-deps -w dist`),
  into a temporary folder instead of dist/."""
  dist = tmp_path_factory.mktemp("dist")
  words = shlex.split(shell_lines(doc_block("docs/notebooks.md", "wheel"))[0])
  assert words[:2] == ["pip", "wheel"] and words[words.index("-w") + 1] == "dist", words
  words[words.index("-w") + 1] = str(dist)
  subprocess.run([sys.executable, "-m", *words, "-q"],
                 cwd=package_source, check=True, capture_output=True, text=True, timeout=600)
  wheels = [name for name in os.listdir(dist) if name.endswith(".whl")]
  assert len(wheels) == 1 and wheels[0].startswith("mixskd_jax-"), wheels
  return str(dist / wheels[0])


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_install_cell_without_mixskd_source_stops_with_one_error_naming_it(
    name, kernel_dir, compilation_cache, tmp_path):
  """Outside a checkout, mixskd_jax not importable and MIXSKD_SOURCE unset: the install cell
  tries no made-up URL; it raises one error that names MIXSKD_SOURCE and its three forms."""
  outside = Outside(tmp_path, "unused", compilation_cache)
  if outside.preinstalled:
    pytest.skip("mixskd_jax is installed in this interpreter, so the install cell skips.")
  with pytest.raises(nbclient.exceptions.CellExecutionError) as raised:
    run_notebook(name, kernel_dir, compilation_cache, tmp_path, cwd=outside.cwd,
                 env={**outside.env, "MIXSKD_SOURCE": None})
  # The error itself (the exception's string also quotes the cell's source).
  assert raised.value.ename == "RuntimeError"
  message = raised.value.evalue
  assert message.startswith("mixskd_jax is not installed here. Set MIXSKD_SOURCE")
  for form in ("a git URL", "pip wheel . --no-deps -w dist", "google.colab.files.upload()",
               "source folder"):
    assert form in message, form
  assert not os.listdir(outside.site)  # nothing was installed


@pytest.mark.slow
def test_colab_notebook_installs_and_trains_outside_the_checkout(kernel_dir, compilation_cache,
                                                                 package_wheel, tmp_path):
  """colab_own_backbone.ipynb from a runtime without mixskd_jax: its install cell runs
  `pip install --no-deps $MIXSKD_SOURCE`, here the wheel built as the cell says (into a
  temporary prefix instead of the environment; the other notebooks install a source folder),
  then it trains a ConvNet of its own with MixSKD: the loss goes down, every head and the
  self-teacher beat chance on Fashion-MNIST, and the `full` variant's frozen discriminators do
  not move."""
  outside = Outside(tmp_path, package_wheel, compilation_cache)
  if outside.preinstalled:
    pytest.skip("mixskd_jax is installed in this interpreter (e.g. `pip install -e .`), so the "
                "notebook would not install it: this test needs an environment without it.")

  result = run_notebook("colab_own_backbone.ipynb", kernel_dir, compilation_cache, tmp_path,
                        cwd=outside.cwd, env=outside.env)

  # The kernel imported the package that its install cell had just put under the prefix.
  assert os.path.realpath(result["installed_from"]) == os.path.realpath(
      os.path.join(outside.site, "mixskd_jax"))
  assert result["steps"] == 30
  assert result["loss_last"] < result["loss_first"]
  assert set(result["accuracy"]) == {"branch1", "branch2", "backbone", "self_teacher"}
  for value in result["accuracy"].values():
    assert_accuracy(value)
    if result["data"] != "synthetic":
      assert value > 20.0  # chance is 10%; ~50% after the 30 smoke steps
  assert result["discriminators_unchanged"] and not result["backbone_unchanged"]
