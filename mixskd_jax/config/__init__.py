"""The one door for a config. Imports only ml_collections and numpy: never JAX or TensorFlow.

    from mixskd_jax import config as config_lib

    config = config_lib.base_config()          # every field, with the CIFAR recipe's values
    config = config_lib.finalize(config, "smoke,cross_entropy")   # a config file's ':' tokens
    config_lib.validate(config)                # names, values and cross-field rules, once

Inside: `schema` (the fields), `choices` (the names a choice field may hold), `kinds` and
`field_rules` (one rule per field), `cross_rules` (rules between fields), `check`
(`validate`), `field_names` (misspelt fields), `tokens` (`finalize`), `recipes` (the paper's
recipes and `with_method`), `errors`. The experiment configs that use them are
`mixskd_jax.configs` (shipped with the package) and `configs/` in a checkout.
"""

from mixskd_jax.config import choices, recipes
from mixskd_jax.config.check import validate
from mixskd_jax.config.errors import ConfigFieldError, ConfigValueError, PreflightError
from mixskd_jax.config.field_names import unknown_field_error
from mixskd_jax.config.recipes import with_method
from mixskd_jax.config.schema import base_config
from mixskd_jax.config.tokens import finalize

__all__ = [
    "ConfigFieldError", "ConfigValueError", "PreflightError", "base_config", "choices",
    "finalize", "recipes", "unknown_field_error", "validate", "with_method",
]
