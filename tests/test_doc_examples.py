"""README's code runs as written, and does what it says: the own-model example trains, and the
official-checkpoint recipe reproduces the official step (a new user's check of the port)."""

import os
import re
import shlex

import jax
import numpy as np
import pytest

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def readme_block(name):
  """The fenced code block right after `<!-- readme-test: name -->`."""
  with open(README) as f:
    text = f.read()
  match = re.search(rf"<!-- readme-test: {name} -->\n```\w+\n(.*?)```", text, re.S)
  assert match, f"README lost its '{name}' example"
  return match.group(1)


@pytest.mark.slow
def test_own_model_example_trains(capsys):
  """The 'Use the MixSKD losses in your own Flax model' example runs and takes a step that
  changes the network and the self-teacher but not the (frozen) discriminators."""
  namespace = {}
  exec(compile(readme_block("own-model"), "README own-model", "exec"), namespace)
  terms = namespace["terms"]
  assert np.isfinite(float(terms["loss"])) and float(terms["self_teacher_ce"]) > 0
  before = namespace["network_vars"]["params"]
  after = namespace["params"]["network"]
  assert any(not np.array_equal(a, b) for a, b in
             zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)))
  assert "clean_ce" in capsys.readouterr().out


@pytest.mark.slow
def test_staged_backbone_example_trains(capsys):
  """'Your backbone, branches built for you': two steps (adamw with weight decay, through
  mixskd.optimizer) change the backbone, the branches and the self-teacher but not the
  (frozen) discriminators; the plain network reads the backbone's params and BatchNorm
  statistics, and its stages (which take `train`) ran in eval mode."""
  namespace = {}
  exec(compile(readme_block("staged-backbone"), "README staged-backbone", "exec"), namespace)
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
  """Convert (the README command), load, apply in train mode with a given lam and permutation:
  the terms equal the official computation's (rel. 1e-4); with the discriminators added as
  README shows, the discriminator term matches too."""
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

  command = shlex.split(readme_block("convert"))
  assert command[:3] == ["python", "-m", "mixskd_jax.interop"]
  convert_main(command[3:])
  namespace = {"images": x.permute(0, 2, 3, 1).numpy(), "labels": y.numpy()}
  exec(compile(readme_block("reproduce"), "README reproduce", "exec"), namespace)
  rel = lambda a, b: abs(float(a) - b.item()) / abs(b.item())
  for name in objective.TERMS:
    if name != "discriminator":  # random discriminators: the official file has none
      assert rel(namespace["terms"][name], ref[name]) <= 1e-4, name

  namespace["official_discriminators"] = discs
  exec(compile(readme_block("discriminators"), "README discriminators", "exec"), namespace)
  exec(compile(readme_block("reproduce").replace(
      'model, variables = load_converted("converted_r18")',
      'model, _ = load_converted("converted_r18")'), "README reproduce", "exec"), namespace)
  for name in objective.TERMS:
    assert rel(namespace["terms"][name], ref[name]) <= 1e-4, name
  assert rel(namespace["loss"], ref["loss_cifar"]) <= 1e-4
