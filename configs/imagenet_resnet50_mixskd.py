r"""MixSKD, ImageNet, ResNet-50: the official run (spec §C.2, `mixskd_jax.recipes.imagenet`).

Needs the ImageNet tars in a tfds manual dir (tfds documents the layout):

  python -m mixskd_jax.main --config=configs/imagenet_resnet50_mixskd.py \
      --config.data.manual_dir=/data/imagenet --workdir=gs://bucket/in1k_r50_mixskd

Expected: the official README reports 78.76% top-1 (the paper's unverified copy also 94.40%
top-5). Time: not measured (no GPU in development); ~22.6 GMACs forward per clean image.
"""

from mixskd_jax import config_schema, recipes


def get_config(arg: str = ""):
  return config_schema.finalize(recipes.imagenet(), arg)
