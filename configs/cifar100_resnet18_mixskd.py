"""`--config=configs/cifar100_resnet18_mixskd.py` in a checkout. The config itself is
`mixskd_jax/configs/cifar100_resnet18_mixskd.py`, shipped with the package (`from mixskd_jax.configs
import cifar100_resnet18_mixskd`); its docstring gives the command, the expected result and the
time."""

from mixskd_jax.configs.cifar100_resnet18_mixskd import get_config  # noqa: F401
