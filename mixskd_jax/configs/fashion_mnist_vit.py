r"""MixSKD (`full`) on a small Vision Transformer (tokens, mean-pooled), Fashion-MNIST.

An example of MixSKD on token sequences (`models/vit.py`: 49 tokens of width 64, 3 stages of 2
encoder blocks, one head per stage). Offline on a 2-core CPU:

  python -m mixskd_jax.main --config=configs/fashion_mnist_vit.py --workdir=/tmp/fm_vit
  python -m mixskd_jax.main --config=configs/fashion_mnist_vit.py:cross_entropy \
      --workdir=/tmp/fm_vit_ce

Recipe: `recipes.fashion_mnist_staged` with lr 0.03 (at 0.1 SGD diverges on this ViT within
a dozen steps).

Expected (measured once, seed 0, docs/backbones.md): backbone head
73.37% (branch 1 73.39%, self-teacher 73.46%); its CE twin 73.05%.
Time on the 2-core development machine, cores shared with other jobs:
21 min 18 s (CE 4 min 36 s).
"""

from mixskd_jax import config as config_lib
from mixskd_jax.config import recipes


def get_config(arg: str = ""):
  return config_lib.finalize(
      recipes.fashion_mnist_staged("small_vit", learning_rate=0.03), arg)
