r"""MixSKD, CIFAR-100, ResNet-50 (CIFAR stem, Bottleneck [3,4,6,3]) with the CIFAR recipe.

  python -m mixskd_jax.main --config=configs/cifar100_resnet50_mixskd.py --workdir=/tmp/c100_r50

Expected: no official MixSKD number for this network was retrieved (spec §E.2); the old
official CE baseline for a (different) CIFAR ResNet-50 was 77.79%.
Time: not measured (no GPU in development).
"""

from mixskd_jax import config as config_lib
from mixskd_jax.config import recipes


def get_config(arg: str = ""):
  return config_lib.finalize(recipes.cifar("cifar_resnet50"), arg)
