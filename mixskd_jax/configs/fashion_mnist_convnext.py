r"""MixSKD (`full`) on a ConvNeXt-style backbone (LayerNorm, no BatchNorm), Fashion-MNIST.

An example of MixSKD on a backbone that is not a ResNet (`models/convnext.py`, built into the
MixSKD network by `models/staged.py`). Offline on a 2-core CPU:

  python -m mixskd_jax.main --config=configs/fashion_mnist_convnext.py --workdir=/tmp/fm_convnext
  python -m mixskd_jax.main --config=configs/fashion_mnist_convnext.py:cross_entropy \
      --workdir=/tmp/fm_convnext_ce

Recipe: `recipes.fashion_mnist_staged` (30,000 images, 3 epochs, lr 0.1).

Expected (measured once, seed 0, docs/backbones.md): backbone head
76.11% (branch 1 80.26%, self-teacher 80.12%); its CE twin 80.85%.
Time on the 2-core development machine, cores shared with other jobs:
23 min 49 s (CE 11 min 38 s).
"""

from mixskd_jax import config as config_lib
from mixskd_jax.config import recipes


def get_config(arg: str = ""):
  return config_lib.finalize(
      recipes.fashion_mnist_staged("small_convnext", learning_rate=0.1), arg)
