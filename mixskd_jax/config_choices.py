"""The allowed values of the config's choice fields that live in registries elsewhere (models,
dtypes, methods, variants, schedules...), looked up when a config is first checked: the
registries import JAX and Flax, and `config_rules` must import without them (never
TensorFlow either)."""

# pylint: disable=import-outside-toplevel


def models() -> tuple:
  from mixskd_jax.models.registry import SPECS
  return tuple(SPECS)


def dtypes() -> tuple:
  from mixskd_jax.models.registry import DTYPES
  return tuple(DTYPES)


def cpu_convolutions() -> tuple:
  from mixskd_jax.models.xla_options import CPU_CONVOLUTIONS
  return CPU_CONVOLUTIONS


def running_stats() -> tuple:
  from mixskd_jax.models.layers import RUNNING_STATS
  return RUNNING_STATS


def methods() -> tuple:
  from mixskd_jax.train.methods import METHODS
  return METHODS


def variants() -> tuple:
  from mixskd_jax.objective import VARIANTS
  return VARIANTS


def kl_gates() -> tuple:
  from mixskd_jax.objective import KL_GATES
  return KL_GATES


def discriminator_inputs() -> tuple:
  from mixskd_jax.objective import DISCRIMINATOR_INPUTS
  return DISCRIMINATOR_INPUTS


def schedules() -> tuple:
  from mixskd_jax.train.schedule import SCHEDULES
  return SCHEDULES
