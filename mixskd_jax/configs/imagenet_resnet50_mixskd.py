r"""MixSKD, ImageNet, ResNet-50: the official run (spec §C.2, `mixskd_jax.config.recipes.imagenet`).

Needs the ImageNet tars in a tfds manual dir (tfds documents the layout):

  python -m mixskd_jax.main --config=configs/imagenet_resnet50_mixskd.py \
      --config.data.manual_dir=/data/imagenet --workdir=gs://bucket/in1k_r50_mixskd

Every device trains 16 clean (+16 mixed) images with its own pairs, lam and BatchNorm
statistics, as each GPU of the official 8-GPU DDP run; on 8 devices this is that run exactly
(batch 128, lr 0.1). On other slices the global batch is 16 x devices and the learning rate
0.1 x batch / 128 (experiments/SCALING.md). The workdir may be a gs:// bucket; on a pod,
start the same command on every host. Before launching, compile it for the slice on any machine:
`python -m mixskd_jax.aot --config=configs/imagenet_resnet50_mixskd.py --topology=v5e:16x16`
(`--fit`: the largest per-chip batch the chip takes).

Expected: the official README reports 78.76% top-1 (the paper's unverified copy also 94.40%
top-5). Time: not measured (no GPU in development); ~22.6 GMACs forward per clean image.
"""

from mixskd_jax import config as config_lib
from mixskd_jax.config import recipes


def get_config(arg: str = ""):
  return config_lib.finalize(recipes.imagenet(), arg)
