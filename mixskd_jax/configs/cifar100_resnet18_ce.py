r"""Plain cross-entropy, CIFAR-100, the MixSKD ResNet-18 backbone, same recipe as MixSKD.

  python -m mixskd_jax.main --config=configs/cifar100_resnet18_ce.py --workdir=/tmp/c100_r18_ce

Expected: the official README's baseline, 76.24%, used a different (pre-activation) ResNet-18
with batch 128 and 200 epochs (spec §A.8); this config isolates the method instead.
Time: not measured (no GPU in development).
"""

from mixskd_jax import config as config_lib
from mixskd_jax.config import recipes


def get_config(arg: str = ""):
  return config_lib.finalize(recipes.cifar("cifar_resnet18", mixskd=False), arg)
