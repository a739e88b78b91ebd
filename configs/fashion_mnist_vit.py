"""`--config=configs/fashion_mnist_vit.py` in a checkout. The config itself is
`mixskd_jax/configs/fashion_mnist_vit.py`, shipped with the package (`from mixskd_jax.configs import
fashion_mnist_vit`); its docstring gives the command, the expected result and the time."""

from mixskd_jax.configs.fashion_mnist_vit import get_config  # noqa: F401
