"""The paper's training recipes as configs (spec §C.1, §C.2). `configs/*.py` build on these."""

import ml_collections

from mixskd_jax import config_schema


def cifar(model_name: str, *, mixskd: bool = True) -> ml_collections.ConfigDict:
  """The official CIFAR-100 MixSKD recipe.

  64 clean (+64 mixed) images per step, 205 epochs: 5 of per-step linear warm-up, then x0.1 at
  epochs 105 and 155; SGD Nesterov 0.9, coupled weight decay 5e-4, lr 0.1; mixup alpha 0.4,
  T = 3; random crop 32 (zero pad 4) + flip; CIFAR-100 mean/std. The plain-CE variant keeps
  every optimization setting, so the two differ only in the method.
  """
  c = config_schema.base_config()
  c.model.name = model_name
  c.model.mixskd = mixskd
  c.data.name = "cifar100"
  c.batch_size = 64
  c.eval_batch_size = 500
  c.num_epochs = 205
  c.objective.variant = "full"
  c.objective.alpha = 0.4
  c.objective.temperature = 3.0
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4
  c.optimizer.warmup_epochs = 5
  c.optimizer.schedule = "multistep"
  c.optimizer.milestones = (100, 150)
  c.log_every_steps = 100
  c.checkpoint_every_steps = 3910  # 5 epochs of 782 steps
  return c


def imagenet(*, mixskd: bool = True) -> ml_collections.ConfigDict:
  """The official ImageNet MixSKD run (`main_mixskd_imagenet.sh`), ResNet-50.

  128 clean (+128 mixed) images per step over 8 GPUs, pairs formed within each GPU's 16
  (mix_shards = 8); 305 epochs: 5 of per-step warm-up then per-epoch cosine; SGD momentum 0.9
  without Nesterov, weight decay 1e-4, lr 0.1; alpha 0.2, T = 3; RandomResizedCrop(224) +
  flip, test Resize(256) + CenterCrop(224). The plain-CE variant is the script's default
  baseline recipe: batch 256, 100 epochs, x0.1 at 30/60/90, no warm-up.
  """
  c = config_schema.base_config()
  c.model.name = "imagenet_resnet50"
  c.model.mixskd = mixskd
  c.data.name = "imagenet2012"
  c.eval_batch_size = 1000
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 1e-4
  c.log_every_steps = 500
  c.checkpoint_every_steps = 10000
  if mixskd:
    c.batch_size = 128
    c.num_epochs = 305
    c.objective.variant = "full"
    c.objective.alpha = 0.2
    c.objective.temperature = 3.0
    c.objective.mix_shards = 8
    c.optimizer.warmup_epochs = 5
    c.optimizer.schedule = "cosine"
  else:
    c.batch_size = 256
    c.num_epochs = 100
    c.optimizer.warmup_epochs = 0
    c.optimizer.schedule = "multistep"
    c.optimizer.milestones = (30, 60, 90)
  return c


def with_method(config: ml_collections.ConfigDict, method: str,
                variant: str | None = None) -> ml_collections.ConfigDict:
  """`config` set up to train `method` (one of `train.methods.METHODS`), all else unchanged.

  Sets `config.method`, whether the network carries auxiliary branches (mixskd, byot), the
  input-pipeline fields the method needs (CS-KD's same-class pairs, PS-KD's example ids) and,
  for mixskd, the objective `variant` if given. Returns a copy.
  """
  from mixskd_jax.train import methods  # pylint: disable=import-outside-toplevel  (jax-heavy)
  if method not in methods.METHODS:
    raise ValueError(f"method={method!r} is unknown; use one of {methods.METHODS}.")
  if variant is not None and method != "mixskd":
    raise ValueError(f"variant={variant!r} applies to method 'mixskd' only, not {method!r}.")
  c = ml_collections.ConfigDict(config.to_dict())
  c.method = method
  c.model.mixskd = method in methods.BRANCHED_METHODS
  c.data.class_pairs = method == "cs_kd"
  c.data.example_ids = method == "ps_kd"
  if variant is not None:
    c.objective.variant = variant
  return c
