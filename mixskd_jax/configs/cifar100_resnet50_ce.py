r"""Plain cross-entropy, CIFAR-100, the MixSKD ResNet-50 backbone, same recipe as MixSKD.

  python -m mixskd_jax.main --config=configs/cifar100_resnet50_ce.py --workdir=/tmp/c100_r50_ce

Expected: not measured; the old official CE baseline for a CIFAR ResNet-50 was 77.79%.
Time: not measured (no GPU in development).
"""

from mixskd_jax import config as config_lib
from mixskd_jax.config import recipes


def get_config(arg: str = ""):
  return config_lib.finalize(recipes.cifar("cifar_resnet50", mixskd=False), arg)
