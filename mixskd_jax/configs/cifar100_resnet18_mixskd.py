r"""MixSKD, CIFAR-100, ResNet-18: the paper's recipe (spec §C.1, `mixskd_jax.config.recipes.cifar`).

The objective variant is selectable after the path: `reference_cifar` reproduces the official
CIFAR script exactly; `full` (default) is the ImageNet script's objective; `adversarial`
trains the discriminators.

  python -m mixskd_jax.main --config=configs/cifar100_resnet18_mixskd.py:reference_cifar \
      --workdir=/tmp/c100_r18_mixskd

Expected: the official README reports 80.32% top-1 for the official script (best epoch on
the test set, max over the 4 heads: `best_max_over_heads_reference_protocol` in
results.json; the backbone head alone is `best_backbone_top1`).
Time: not measured (no GPU in development); a MixSKD step costs ~5x a plain ResNet-18 step.
"""

from mixskd_jax import config as config_lib
from mixskd_jax.config import recipes


def get_config(arg: str = ""):
  return config_lib.finalize(recipes.cifar("cifar_resnet18"), arg)
