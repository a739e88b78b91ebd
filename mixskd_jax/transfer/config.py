r"""The fair transfer protocol's config: `python -m mixskd_jax.transfer --config=THIS_FILE`.

Evaluates one pre-trained backbone (`init_from.path`: a workdir of ours, one of its
`checkpoints/<N>`, or a converted official checkpoint) on Fashion-MNIST classes 5-9 from 50
labelled images per class (the next 100 per class of the training split validate), three ways: a linear probe,
fine-tuning, and segmentation of 64x64 canvases of pasted items (an FPN decoder on the frozen
backbone's stage features; `segmentation.frozen_backbone=False` fine-tunes the backbone too).
Each picks its learning rate (6 or 8 log-spaced values per task) and BatchNorm mode on validation;
the chosen model is measured once on the test images of those classes
(`mixskd_jax.transfer.protocol`).

  python -m mixskd_jax.transfer --init_from=/tmp/mixskd_default --workdir=/tmp/transfer

Cost on 2 cores: see experiments/results/fashion_mnist_transfer_fair/RUN.md.
"""

from __future__ import annotations

import ml_collections

from mixskd_jax.transfer import classification

TASKS = ("linear_probe", "fine_tune", "segmentation")


def _recipe(epochs: int, batch_size: int) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      epochs=epochs, batch_size=batch_size, warmup_epochs=2, schedule="cosine", momentum=0.9,
      nesterov=True, weight_decay=5e-4))


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.init_from = ml_collections.ConfigDict()
  c.init_from.path = ml_collections.config_dict.placeholder(str)
  # Seeds the fresh head and decoder, the data order and the canvases.
  c.seed = 0
  c.tasks = TASKS
  c.inference_chunk = 500  # rows per inference call

  c.data = ml_collections.ConfigDict()
  c.data.name = "fashion_mnist"
  c.data.classes = (5, 6, 7, 8, 9)
  c.data.train_examples_per_class = 50
  # The next examples of every class in the training split: chosen on, never trained on.
  c.data.validation_examples_per_class = 100
  c.data.train_examples = ml_collections.config_dict.placeholder(int)
  c.data.test_examples = ml_collections.config_dict.placeholder(int)  # None: every test image
  c.data.data_dir = ml_collections.config_dict.placeholder(str)
  c.data.idx_dir = ml_collections.config_dict.placeholder(str)

  # The downstream recipe of the earlier transfer suite: 30 epochs of batches of 50, 2 epochs
  # of warm-up then cosine, Nesterov SGD, coupled weight decay 5e-4; no augmentation.
  c.linear_probe = ml_collections.ConfigDict()
  c.linear_probe.recipe = _recipe(30, 50)
  # Log-spaced peak learning rates. A linear head on frozen features wants larger ones than
  # the whole network, and more so on small features: cross-entropy's best probe rate was the
  # top of a 1e-3 .. 3e-1 grid, and MixSKD's (pooled features 3x smaller) the top of 1e-2 .. 3.
  c.linear_probe.learning_rates = (1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0, 30.0)
  c.linear_probe.bn_modes = classification.FROZEN_BN_MODES
  c.fine_tune = ml_collections.ConfigDict()
  c.fine_tune.recipe = _recipe(30, 50)
  c.fine_tune.learning_rates = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
  c.fine_tune.bn_modes = classification.BN_MODES

  c.segmentation = ml_collections.ConfigDict()
  c.segmentation.recipe = _recipe(20, 20)
  c.segmentation.learning_rates = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
  # The decoder alone on the frozen backbone's stage features (a dense probe; 2x cheaper than
  # fine-tuning on 2 cores). False: the backbone is fine-tuned with it, and bn_modes may add
  # "batch".
  c.segmentation.frozen_backbone = True
  c.segmentation.bn_modes = classification.FROZEN_BN_MODES
  c.segmentation.decoder_width = 16
  c.segmentation.canvas_size = 64
  c.segmentation.min_items = 2
  c.segmentation.max_items = 4
  c.segmentation.min_scale = 0.75
  c.segmentation.max_scale = 1.5
  c.segmentation.foreground_threshold = 32
  c.segmentation.train_canvases = 100
  c.segmentation.validation_canvases = 50
  c.segmentation.test_canvases = 500
  return c
