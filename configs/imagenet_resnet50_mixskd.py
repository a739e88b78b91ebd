"""`--config=configs/imagenet_resnet50_mixskd.py` in a checkout. The config itself is
`mixskd_jax/configs/imagenet_resnet50_mixskd.py`, shipped with the package (`from mixskd_jax.configs
import imagenet_resnet50_mixskd`); its docstring gives the command, the expected result and the
time."""

from mixskd_jax.configs.imagenet_resnet50_mixskd import get_config  # noqa: F401
