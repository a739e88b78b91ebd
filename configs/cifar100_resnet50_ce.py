"""`--config=configs/cifar100_resnet50_ce.py` in a checkout. The config itself is
`mixskd_jax/configs/cifar100_resnet50_ce.py`, shipped with the package (`from mixskd_jax.configs
import cifar100_resnet50_ce`); its docstring gives the command, the expected result and the time."""

from mixskd_jax.configs.cifar100_resnet50_ce import get_config  # noqa: F401
