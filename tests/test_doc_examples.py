"""The guides' Python examples run as written and do what they say: the own-model examples
train what they should, the official-checkpoint recipe reproduces the official step (a new
user's check of the port), and the smaller examples (a run from Python, the benchmark from
Python, a method's config, an mmdetection backbone entry) work."""

import shlex

import jax
import numpy as np
import pytest

from tests.doc_blocks import doc_block
from tests.doc_commands import python_commands

OWN_MODEL = "docs/own-model.md"
CHECKPOINTS = "docs/checkpoints.md"


def run_block(page, name, namespace=None, replace=()):
  """Executes block `name` of `page` in `namespace` (after the textual `replace` pairs)."""
  namespace = {} if namespace is None else namespace
  code = doc_block(page, name)
  for old, new in replace:
    assert old in code, f"{page} {name}: '{old}' is gone"
    code = code.replace(old, new)
  exec(compile(code, f"{page} {name}", "exec"), namespace)
  return namespace


@pytest.mark.slow
def test_own_model_example_trains(capsys):
  """The 'Any multi-head model' example runs and takes a step that
  changes the network and the self-teacher but not the (frozen) discriminators."""
  namespace = run_block(OWN_MODEL, "own-model")
  terms = namespace["terms"]
  assert np.isfinite(float(terms["loss"])) and float(terms["self_teacher_ce"]) > 0
  before = namespace["network_vars"]["params"]
  after = namespace["params"]["network"]
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)))
  assert "clean_ce" in capsys.readouterr().out


@pytest.mark.slow
def test_staged_backbone_example_trains(capsys):
  """'Linen: your backbone, branches built for you': two steps (adamw with weight decay, through
  mixskd.optimizer) change the backbone, the branches and the self-teacher but not the
  (frozen) discriminators; the plain network reads the backbone's params and BatchNorm
  statistics, and its stages (which take `train`) ran in eval mode."""
  namespace = run_block(OWN_MODEL, "staged-backbone")
  model, images = namespace["model"], namespace["images"]
  before = model.init(jax.random.key(1), images)["params"]
  after = namespace["variables"]["params"]
  changed = lambda name: any(not np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(before[name]), jax.tree_util.tree_leaves(after[name])))
  assert set(after) == {"backbone", "branches_0", "branches_1", "self_teacher",
                        "discriminators"}
  assert all(changed(n) for n in ("backbone", "branches_0", "branches_1", "self_teacher"))
  assert not changed("discriminators")
  assert np.isfinite(float(namespace["terms"]["loss"])) and "clean_ce" in capsys.readouterr().out
  trained = namespace["variables"]
  np.testing.assert_allclose(namespace["logits"], model.apply(trained, images).logits[-1],
                             rtol=1e-5)
  # Eval mode: the plain network reads the running statistics (other statistics, other logits).
  stats = trained["batch_stats"]["backbone"]
  other = {"params": trained["params"]["backbone"],
           "batch_stats": jax.tree_util.tree_map(lambda v: v + 1.0, stats)}
  assert not np.allclose(namespace["plain"].apply(other, images).logits[0], namespace["logits"],
                         atol=1e-3)


@pytest.mark.slow
def test_official_checkpoint_recipe_reproduces_official_step(tmp_path, monkeypatch):
  """Convert (the guide's command), load, apply in train mode with a given lam and permutation:
  the terms equal the official computation's (rel. 1e-4); with the discriminators added as
  the guide shows, the discriminator term matches too."""
  torch = pytest.importorskip("torch")
  from mixskd_jax.method import objective
  from mixskd_jax.interop.__main__ import main as convert_main
  from tests import torch_reference as tr

  monkeypatch.chdir(tmp_path)
  torch.manual_seed(0)
  net = tr.build_cifar_mixskd(18, 100)
  discs = tr.make_discriminators(512)
  tr.save_official_checkpoint(net, "resnet18.pth.tar")
  x = torch.randn(4, 3, 32, 32)
  y = torch.tensor([5, 1, 99, 5])
  ref = tr.reference_terms(net, discs, x, y, 0.3, torch.tensor([2, 0, 3, 1]), T=3.0)

  command = shlex.split(doc_block(CHECKPOINTS, "convert"))
  assert command[:3] == ["python", "-m", "mixskd_jax.interop"]
  convert_main(command[3:])
  namespace = {"images": x.permute(0, 2, 3, 1).numpy(), "labels": y.numpy()}
  run_block(CHECKPOINTS, "reproduce", namespace)
  rel = lambda a, b: abs(float(a) - b.item()) / abs(b.item())
  for name in objective.TERMS:
    if name != "discriminator":  # random discriminators: the official file has none
      assert rel(namespace["terms"][name], ref[name]) <= 1e-4, name

  namespace["official_discriminators"] = discs
  run_block(CHECKPOINTS, "discriminators", namespace)
  run_block(CHECKPOINTS, "reproduce", namespace, replace=[(
      'model, variables = load_converted("converted_r18")',
      'model, _ = load_converted("converted_r18")')])
  for name in objective.TERMS:
    assert rel(namespace["terms"][name], ref[name]) <= 1e-4, name
  assert rel(namespace["loss"], ref["loss_cifar"]) <= 1e-4


@pytest.mark.slow
def test_training_from_python_example_runs_a_smoke_run(tmp_path):
  """docs/training.md's run from Python: the smoke config trains to the end and says so."""
  namespace = run_block("docs/training.md", "from-python",
                        replace=[('"/tmp/smoke"', repr(str(tmp_path / "smoke")))])
  results = namespace["results"]
  assert results["finished"] and (tmp_path / "smoke" / "results.json").exists()


@pytest.mark.slow
def test_benchmark_from_python_example_prints_the_table(capsys):
  run_block("docs/benchmarking.md", "benchmark-python")
  out = capsys.readouterr().out
  assert "step median" in out and "cross_entropy" in out


def test_with_method_example_sets_the_method_and_its_data_fields():
  config = run_block("docs/baselines.md", "with-method")["config"]
  assert config.method == "cs_kd" and config.data.class_pairs and not config.model.mixskd


def test_mmdetection_entry_loads_the_exported_pt_backbone():
  """The mmdetection backbone entry reads the file the `--format pt --no_head` export writes,
  with torchvision's (and our) stride placement."""
  model = run_block(CHECKPOINTS, "mmdet-config")["model"]
  backbone = model["backbone"]
  assert backbone["type"] == "ResNet" and backbone["depth"] == 50
  assert backbone["style"] == "pytorch"
  exports = python_commands(doc_block(CHECKPOINTS, "export-torch"))
  pt = [w for w in exports if "--format" in w and "pt" in w and "--no_head" in w]
  assert len(pt) == 1
  assert pt[0][pt[0].index("--output") + 1] == backbone["init_cfg"]["checkpoint"]
