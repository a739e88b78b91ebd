"""The paper's training recipes as configs (spec §C.1, §C.2). `configs/*.py` build on these."""

import ml_collections

from mixskd_jax.config.choices import BRANCHED_METHODS, METHODS
from mixskd_jax.config.schema import base_config


def cifar(model_name: str, *, mixskd: bool = True) -> ml_collections.ConfigDict:
  """The official CIFAR-100 MixSKD recipe.

  64 clean (+64 mixed) images per step, 205 epochs: 5 of per-step linear warm-up, then x0.1 at
  epochs 105 and 155; SGD Nesterov 0.9, coupled weight decay 5e-4, lr 0.1; mixup alpha 0.4,
  T = 3; random crop 32 (zero pad 4) + flip; CIFAR-100 mean/std. The plain-CE variant keeps
  every optimization setting, so the two differ only in the method.

  The reference runs on one GPU, so the global batch stays 64 on any number of devices and
  BatchNorm keeps one group over the whole batch (`model.batchnorm_groups = 1`). On several
  devices that is SyncBN: XLA all-reduces each BatchNorm's per-channel statistics in the
  forward and the backward pass. Compiled for 8 devices (ResNet-18), that is 177 all-reduces of
  169.77 MB per step and device against 2 of 169.65 MB with one group per device: 125 kB more,
  in 175 small collectives (latency, not bandwidth). Pairs stay within each device
  (`objective.mix_groups = -1`), merged across devices only when a device holds fewer than 8
  images (16 or more devices at batch 64: then the pairs' images and feature maps cross
  devices). On one device all of this is exactly the reference.
  """
  c = base_config()
  c.model.name = model_name
  c.model.mixskd = mixskd
  c.data.name = "cifar100"
  c.batch_size = 64
  c.eval_batch_size = 500
  c.num_epochs = 205
  c.objective.variant = "full"
  c.objective.alpha = 0.4
  c.objective.temperature = 3.0
  c.objective.mix_groups = -1
  c.model.batchnorm_groups = 1
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

  128 clean (+128 mixed) images per step over 8 GPUs under DDP without SyncBN: every GPU
  pairs, mixes (with its own lam) and batch-normalizes its own 16 clean + 16 mixed images;
  305 epochs: 5 of per-step warm-up then per-epoch cosine; SGD momentum 0.9 without Nesterov,
  weight decay 1e-4, lr 0.1; alpha 0.2, T = 3; RandomResizedCrop(224) + flip, test
  Resize(256) + CenterCrop(224). The plain-CE variant is the script's default baseline recipe
  (torchvision's): 256 images per step over 8 GPUs under DDP, 100 epochs, x0.1 at 30/60/90, no
  warm-up.

  On any slice the unit is the GPU's: 16 clean images per device for MixSKD, 32 for CE
  (`per_device_batch_size`), one mix group, one lam and one BatchNorm group per device, so
  devices exchange only the gradients. Both put 32 rows per device through the network
  (MixSKD's 16 clean + 16 mixed), and each BatchNorm group is those 32 rows, as on the GPUs the
  numbers come from. The global batch is per-device x devices (on 8 devices 128 and 256, the
  official runs) and the learning rate follows the linear rule from 0.1 at the official batch
  (`lr_reference_batch`: 128, 256), MixSKD keeping its 5 warm-up epochs. The running BatchNorm
  statistics are the mean of the devices' (`model.batchnorm_running_stats`; "first_group"
  keeps rank 0's, what the official checkpoint holds).
  """
  c = base_config()
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
  c.batch_size = -1
  c.objective.mix_groups = -1
  c.model.batchnorm_groups = -1
  if mixskd:
    c.per_device_batch_size = 16
    c.optimizer.lr_reference_batch = 128
    c.num_epochs = 305
    c.objective.variant = "full"
    c.objective.alpha = 0.2
    c.objective.temperature = 3.0
    c.objective.lam_per_group = True
    c.optimizer.warmup_epochs = 5
    c.optimizer.schedule = "cosine"
  else:
    c.per_device_batch_size = 32
    c.optimizer.lr_reference_batch = 256
    c.num_epochs = 100
    c.optimizer.warmup_epochs = 0
    c.optimizer.schedule = "multistep"
    c.optimizer.milestones = (30, 60, 90)
  return c


def fashion_mnist_staged(model_name: str, *, learning_rate: float) -> ml_collections.ConfigDict:
  """MixSKD (`full`) on a non-ResNet backbone of `models.SPECS`, sized for a 2-core CPU.

  Half of Fashion-MNIST's training set (30,000 images, class-balanced), 3 epochs of batch 128
  (702 steps): 1 epoch of per-step warm-up, then cosine; SGD Nesterov 0.9, coupled weight
  decay 5e-4; mixup alpha 0.4, T = 3; the full 10,000-image test set. Its cross-entropy twin
  is the `cross_entropy` token (`tokens.finalize`), every other setting equal.
  """
  c = base_config()
  c.model.name = model_name
  c.data.name = "fashion_mnist"
  c.data.train_examples_per_class = 3000
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.num_epochs = 3
  c.objective.variant = "full"
  c.objective.alpha = 0.4
  c.optimizer.schedule = "cosine"
  c.optimizer.learning_rate = learning_rate
  c.optimizer.warmup_epochs = 1
  c.optimizer.weight_decay = 5e-4
  c.log_every_steps = 50
  c.checkpoint_every_steps = 250
  return c


def with_method(config: ml_collections.ConfigDict, method: str,
                variant: str | None = None) -> ml_collections.ConfigDict:
  """`config` set up to train `method` (one of `choices.METHODS`), all else unchanged.

  Sets `config.method`, whether the network carries auxiliary branches (mixskd, byot), the
  input-pipeline fields the method needs (CS-KD's same-class pairs, PS-KD's example ids) and,
  for mixskd, the objective `variant` if given. Returns a copy.
  """
  if method not in METHODS:
    raise ValueError(f"method={method!r} is unknown; use one of {METHODS}.")
  if variant is not None and method != "mixskd":
    raise ValueError(f"variant={variant!r} applies to method 'mixskd' only, not {method!r}.")
  # copy_and_resolve_references keeps placeholder fields typed (to_dict() would drop their
  # types, and then --config.init_from.path=... after a method token could not be set).
  c = config.copy_and_resolve_references()
  c.method = method
  c.model.mixskd = method in BRANCHED_METHODS
  c.data.class_pairs = method == "cs_kd"
  c.data.example_ids = method == "ps_kd"
  if variant is not None:
    c.objective.variant = variant
  return c
