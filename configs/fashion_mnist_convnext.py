"""`--config=configs/fashion_mnist_convnext.py` in a checkout. The config itself is
`mixskd_jax/configs/fashion_mnist_convnext.py`, shipped with the package (`from mixskd_jax.configs
import fashion_mnist_convnext`); its docstring gives the command, the expected result and the
time."""

from mixskd_jax.configs.fashion_mnist_convnext import get_config  # noqa: F401
