"""Installing the package keeps a runtime's own JAX and TensorFlow (Colab's accelerator builds):
the base requirements force neither CPU build; the `cpu` extra adds them for CPU machines."""

import json
import os
import shutil
import subprocess
import venv

import pytest

REPO = os.path.join(os.path.dirname(__file__), os.pardir)
PACKAGE_FILES = ["pyproject.toml", "README.md", "requirements.txt", "requirements-cpu.txt",
                 "requirements-torch.txt", "requirements-tpu.txt"]


@pytest.mark.slow
def test_install_keeps_the_runtimes_jax_and_tensorflow(tmp_path):
  """In a fresh venv that sees this environment's JAX (as a runtime with its own build),
  `pip install <package>` would install neither jax/jaxlib nor any TensorFlow, and the
  package's metadata asks for the CPU builds only under the `cpu` extra."""
  source = tmp_path / "source"
  shutil.copytree(os.path.join(REPO, "mixskd_jax"), source / "mixskd_jax",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
  for name in PACKAGE_FILES:
    shutil.copy(os.path.join(REPO, name), source / name)
  env_dir = tmp_path / "venv"
  venv.create(env_dir, system_site_packages=True, with_pip=True)
  python = str(env_dir / "bin" / "python")
  report = tmp_path / "report.json"
  subprocess.run([python, "-m", "pip", "install", "--dry-run", "--quiet", "--no-build-isolation",
                  "--report", str(report), str(source)], check=True, timeout=300,
                 env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
  items = json.loads(report.read_text())["install"]
  names = {item["metadata"]["name"].lower() for item in items}
  assert "mixskd-jax" in names
  assert not names & {"jax", "jaxlib", "tensorflow", "tensorflow-cpu"}, names
  ours = next(i for i in items if i["metadata"]["name"].lower() == "mixskd-jax")
  requires = ours["metadata"]["requires_dist"]
  base = [r for r in requires if "extra ==" not in r]
  assert any(r.startswith("jax") and "[cpu]" not in r for r in base)
  assert not any(r.startswith(("tensorflow-cpu", "jax[cpu]")) for r in base)
  cpu = [r.split(";")[0].strip() for r in requires if 'extra == "cpu"' in r]
  assert sorted(cpu) == ["jax[cpu]>=0.6", "tensorflow-cpu>=2.16"]
  # libtpu only under the `tpu` extra, through JAX's own `tpu` extra (which pins the
  # libtpu release the installed jax expects).
  tpu = [r for r in requires if 'extra == "tpu"' in r]
  assert len(tpu) == 1 and tpu[0].startswith("jax[tpu]>=0.6"), tpu
  assert not any("libtpu" in r for r in requires), requires
