"""Tiny configs for training tests: real code paths, seconds of compute."""

from mixskd_jax import config as config_lib


def tiny_config(overrides=None):
  """Fashion-MNIST (the offline Debian files), small ResNet, MixSKD `full`, 64 training
  images in batches of 16 (4 steps per epoch), 40 test images."""
  config = config_lib.base_config()
  config.model.name = "small_resnet"
  config.data.name = "fashion_mnist"
  config.data.train_examples = 64
  config.data.test_examples = 40
  config.batch_size = 16
  config.eval_batch_size = 16
  config.num_epochs = 3
  config.optimizer.warmup_epochs = 1
  config.optimizer.schedule = "cosine"
  config.log_every_steps = 2
  config.checkpoint_every_steps = 4
  config.eval_every_epochs = 1
  for dotted, value in (overrides or {}).items():
    node = config
    *parents, leaf = dotted.split(".")
    for name in parents:
      node = node[name]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return config
