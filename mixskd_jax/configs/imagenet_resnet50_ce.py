r"""Plain cross-entropy ImageNet ResNet-50: batch 256, 100 epochs, x0.1 at 30/60/90.

  python -m mixskd_jax.main --config=configs/imagenet_resnet50_ce.py \
      --config.data.manual_dir=/data/imagenet --workdir=/tmp/in1k_r50_ce

Expected: torchvision's recipe gives about 76.1% top-1 for this network (not run here).
Time: not measured (no GPU in development).
"""

from mixskd_jax import config as config_lib
from mixskd_jax.config import recipes


def get_config(arg: str = ""):
  return config_lib.finalize(recipes.imagenet(mixskd=False), arg)
