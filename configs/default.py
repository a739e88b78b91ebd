"""`--config=configs/default.py` in a checkout. The config itself is
`mixskd_jax/configs/default.py`, shipped with the package (`from mixskd_jax.configs import
default`); its docstring gives the command, the expected result and the time."""

from mixskd_jax.configs.default import get_config  # noqa: F401
