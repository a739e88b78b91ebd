r"""Plain cross-entropy ImageNet ResNet-50: torchvision's recipe, 100 epochs, x0.1 at 30/60/90.

  python -m mixskd_jax.main --config=configs/imagenet_resnet50_ce.py \
      --config.data.manual_dir=/data/imagenet --workdir=/tmp/in1k_r50_ce

The baseline scales as MixSKD's recipe does: 32 images per device (8 GPUs x 32 = 256, lr 0.1
in the recipe the numbers come from), BatchNorm per device, and on other slices the global
batch 32 x devices with the learning rate 0.1 x batch / 256. Its 32 rows per device are
MixSKD's 16 clean + 16 mixed (`mixskd_jax.config.recipes.imagenet`). Before launching on a
TPU slice: `python -m mixskd_jax.aot --config=configs/imagenet_resnet50_ce.py
--topology=v5e:16x16` (experiments/SCALING.md).

Expected: torchvision's recipe gives about 76.1% top-1 for this network (not run here).
Time: not measured (no GPU in development).
"""

from mixskd_jax import config as config_lib
from mixskd_jax.config import recipes


def get_config(arg: str = ""):
  return config_lib.finalize(recipes.imagenet(mixskd=False), arg)
