"""The comparison protocols: which runs make a results table, each a config and a seed.

A suite names a base config (the recipe every method shares), the methods of the main
table, the seeds, and the MixSKD ablations. `suite_runs(suite)` lists every run as a
`Run(name, seed, config)`; the runner trains them and the report reads them back.

* `fashion_mnist_converged`: the converged, over-fitting regime (issue #13): real
  Fashion-MNIST, 200 images per class without augmentation, 40 epochs, so that
  cross-entropy fits its training set (100% training accuracy) and its test accuracy has
  stopped moving well before the end; 3 seeds for every row and every ablation.
* `fashion_mnist`: the short-schedule check (the first committed table): a fixed
  class-balanced low-data subset, the small CPU ResNet, 8 epochs, where every method is
  still learning; sized to finish on a 2-core machine.
* `cifar100`: the paper's scale (CIFAR-100, CIFAR ResNet-18, the official 205-epoch recipe,
  64 + 64 images per step) for users with accelerators.
* `fashion_mnist_long`: the same, 3x the epochs, for CE, mixup and MixSKD `full` only: is
  the short schedule what holds the mixup-based methods back?
* `fashion_mnist_transfer`: pre-training on classes 0-4, then a linear probe and fine-tuning on
  classes 5-9 from 50 labels per class.
* `fashion_mnist_transfer_fair`: 13 sources pre-trained on classes 0-4, then each backbone
  through the fair transfer protocol (`mixskd_jax.transfer`) on classes 5-9.
* `default`: the offline default run (`configs/default.py`, all of Fashion-MNIST, 4 epochs)
  over 5 seeds: the spread a newcomer's run should land in.
* `smoke`, `transfer_smoke`, `transfer_fair_smoke`: the fashion_mnist and transfer protocols
  shrunk to seconds, for tests.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections

from mixskd_jax import config as config_lib
from mixskd_jax.config import recipes
from mixskd_jax.configs import default as default_config


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """One row of a table: `method` (config.choices.METHODS), MixSKD `variant`, weight and other
  config overrides."""
  name: str
  method: str
  variant: str | None = None
  weights: tuple[tuple[str, float], ...] = ()
  # Other config fields of this row, as (dotted field, value) pairs.
  overrides: tuple[tuple[str, Any], ...] = ()
  # Transfer rows: start from the backbone of this row's run of the same seed (the runner
  # sets config.init_from.path to that run's workdir).
  init_from_row: str | None = None
  # This row's own recipe instead of the suite's base (a transfer suite's downstream rows).
  recipe: Callable[[], ml_collections.ConfigDict] | None = None


# The main table: the baselines of issue #4 / spec §7, then MixSKD's three variants.
MAIN_METHODS = (
    MethodSpec("cross_entropy", "cross_entropy"),
    MethodSpec("label_smoothing", "label_smoothing"),
    MethodSpec("mixup", "mixup"),
    MethodSpec("cutmix", "cutmix"),
    MethodSpec("cs_kd", "cs_kd"),
    MethodSpec("ps_kd", "ps_kd"),
    MethodSpec("byot", "byot"),
    MethodSpec("mixskd_reference_cifar", "mixskd", "reference_cifar"),
    MethodSpec("mixskd_full", "mixskd", "full"),
    MethodSpec("mixskd_adversarial", "mixskd", "adversarial"),
)

# MixSKD `full` with one part removed (weights set to 0; removed terms are still logged).
ABLATIONS = (
    MethodSpec("full_without_feature_mse", "mixskd", "full", (("feature_mse", 0.0),)),
    MethodSpec("full_without_discriminator", "mixskd", "full", (("discriminator", 0.0),)),
    MethodSpec("full_without_kl", "mixskd", "full",
               (("kl_self_teacher", 0.0), ("kl_branches", 0.0))),
    MethodSpec("full_without_self_teacher", "mixskd", "full",
               (("self_teacher_ce", 0.0), ("kl_self_teacher", 0.0))),
    MethodSpec("full_without_mixup_ce", "mixskd", "full", (("mixup_ce", 0.0),)),
)


# Why removing the self-teacher's KL helped in the short schedule: is the teacher weaker than
# the backbone while it teaches? Two probes (options that are off in every reference variant):
# ramp both KL terms in over the first quarter of training, or apply the self-teacher's KL
# only on steps where the teacher classifies the mixed batch better than the backbone.
INVESTIGATIONS = (
    MethodSpec("full_kl_warmup_10_epochs", "mixskd", "full",
               overrides=(("objective.kl_warmup_epochs", 10.0),)),
    MethodSpec("full_kl_when_teacher_leads", "mixskd", "full",
               overrides=(("objective.kl_gate", "teacher_leads"),)),
)


@dataclasses.dataclass(frozen=True)
class Suite:
  """base: the shared recipe; seeds of the main table; ablation_seeds of the ablations."""
  name: str
  base: Callable[[], ml_collections.ConfigDict]
  description: str
  seeds: tuple[int, ...] = (0, 1, 2)
  ablation_seeds: tuple[int, ...] = (0,)
  methods: tuple[MethodSpec, ...] = MAIN_METHODS
  ablations: tuple[MethodSpec, ...] = ABLATIONS
  # Rows that probe a finding (options off in the reference variants); run at ablation_seeds.
  investigations: tuple[MethodSpec, ...] = ()
  # "comparison": main table, ablations, investigations; "transfer": pre-training rows, then
  # linear-probe and fine-tuning rows from their backbones (experiments/transfer.py reports);
  # "transfer_fair": pre-training rows, then the fair transfer protocol on each backbone
  # (experiments/transfer_fair.py runs it, transfer_fair_report.py reports).
  kind: str = "comparison"
  # transfer_fair: overrides (dotted.field=value) of the protocol's config
  # (mixskd_jax/transfer/config.py) for every backbone of the suite.
  transfer_overrides: tuple[str, ...] = ()


def fashion_mnist_base() -> ml_collections.ConfigDict:
  """500 training images per class (the first 500 of each class in the split: 5,000 in all,
  39 steps of 128), the full 10,000-image test set, small_resnet, 8 epochs (312 steps): 1 of
  linear warm-up, then cosine; SGD Nesterov lr 0.1, wd 5e-4; MixSKD alpha 0.4, T 3."""
  c = config_lib.base_config()
  c.model.name = "small_resnet"
  c.data.name = "fashion_mnist"
  c.data.train_examples_per_class = 500
  c.batch_size = 128
  c.eval_batch_size = 1000
  c.num_epochs = 8
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_epochs = 1
  c.optimizer.learning_rate = 0.1
  c.optimizer.weight_decay = 5e-4
  c.objective.alpha = 0.4
  c.objective.temperature = 3.0
  c.log_every_steps = 13
  c.checkpoint_every_steps = 78
  c.keep_checkpoints = 1
  return c


def fashion_mnist_converged_base() -> ml_collections.ConfigDict:
  """200 training images per class (the first 200 of each class: 2,000 in all, 15 steps of
  128 per epoch), no augmentation, 40 epochs (600 steps), evaluated every 4 epochs on the full
  test set; otherwise the fashion_mnist recipe (1 epoch of warm-up, cosine, SGD Nesterov
  lr 0.1, wd 5e-4; MixSKD alpha 0.4, T 3). Chosen by pilot runs of cross-entropy (seed 0, on
  this 2-core machine): with this recipe its training batches are 100% correct from epoch ~20
  and its test top-1 stays within 0.1 point over the last 14 epochs (84.0%); with crop+flip
  augmentation the same 2,000 images still gave 94% training accuracy after 60 epochs."""
  c = fashion_mnist_base()
  c.data.train_examples_per_class = 200
  c.data.augment = False
  c.num_epochs = 40
  c.eval_every_epochs = 4
  c.eval_on_train_set = True  # does the model fit its training set? (eval mode, unaugmented)
  c.log_every_steps = 15
  c.checkpoint_every_steps = 150
  return c


def _shrunk(c: ml_collections.ConfigDict, *, per_class: int, batch: int, test_examples: int,
            eval_batch: int) -> ml_collections.ConfigDict:
  """`c` at smoke size: `per_class` images per class, 2 epochs of `batch` (1 of warm-up),
  evaluated after each on `test_examples` test images."""
  c.data.train_examples_per_class = per_class
  c.data.test_examples = test_examples
  c.batch_size = batch
  c.eval_batch_size = eval_batch
  c.num_epochs = 2
  c.optimizer.warmup_epochs = 1
  c.eval_every_epochs = 1
  c.log_every_steps = 2
  c.checkpoint_every_steps = 5
  return c


def smoke_base() -> ml_collections.ConfigDict:
  """The fashion_mnist protocol on 10 images per class, 2 epochs of batch 16, 60 test images
  (batches divide by 8, so it also runs on 8 devices)."""
  return _shrunk(fashion_mnist_base(), per_class=10, batch=16, test_examples=60, eval_batch=32)


def fashion_mnist_long_base() -> ml_collections.ConfigDict:
  """The fashion_mnist protocol trained 3x longer (24 epochs, 936 steps)."""
  c = fashion_mnist_base()
  c.num_epochs = 24
  c.checkpoint_every_steps = 234
  return c


# Transfer (issue #13): pre-train on Fashion-MNIST classes 0-4 with the converged recipe, then
# train a fresh 5-way head on classes 5-9 from 50 labelled images per class, on the frozen
# backbone (linear probe: BatchNorm in inference mode) or on the whole network (fine-tuning).
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
DOWNSTREAM_CLASSES = (5, 6, 7, 8, 9)
PRETRAIN_METHODS = tuple(m for m in MAIN_METHODS
                         if m.name in ("cross_entropy", "mixup", "mixskd_full"))
DOWNSTREAM = {  # mode -> (row prefix, overrides of the downstream recipe)
    "linear_probe": ("probe", (("init_from.freeze_backbone", True),)),
    "fine_tune": ("finetune", (("optimizer.learning_rate", 0.01),)),
}


def transfer_pretrain_base() -> ml_collections.ConfigDict:
  """The converged recipe on classes 0-4 (200 images each, 1,000 in all, 40 epochs)."""
  c = fashion_mnist_converged_base()
  c.data.classes = PRETRAIN_CLASSES
  c.checkpoint_every_steps = 70
  c.log_every_steps = 7
  return c


def transfer_downstream_base() -> ml_collections.ConfigDict:
  """Classes 5-9, the first 50 training images of each (250 in all): 30 epochs of 5 steps of
  50, 2 epochs of warm-up then cosine, SGD Nesterov lr 0.1 (fine-tuning: 0.01), wd 5e-4, no
  augmentation; the test set's 5,000 images of classes 5-9, evaluated every 10 epochs."""
  c = fashion_mnist_converged_base()
  c.data.classes = DOWNSTREAM_CLASSES
  c.data.train_examples_per_class = 50
  c.batch_size = 50
  c.num_epochs = 30
  c.optimizer.warmup_epochs = 2
  c.eval_every_epochs = 10
  c.log_every_steps = 5
  c.checkpoint_every_steps = 150
  return c


def transfer_rows(downstream_recipe: Callable[[], ml_collections.ConfigDict] =
                  transfer_downstream_base) -> tuple[MethodSpec, ...]:
  """Pre-training rows, a from-scratch reference on the downstream data, then a probe and a
  fine-tuning row per pre-training, each downstream row on `downstream_recipe`."""
  pretrain = tuple(dataclasses.replace(m, name=f"pretrain_{m.name}") for m in PRETRAIN_METHODS)
  downstream = [MethodSpec("scratch", "cross_entropy", recipe=downstream_recipe)]
  for p in pretrain:
    for prefix, overrides in DOWNSTREAM.values():
      downstream.append(MethodSpec(f"{prefix}_{p.name[len('pretrain_'):]}", "cross_entropy",
                                   overrides=overrides, init_from_row=p.name,
                                   recipe=downstream_recipe))
  return pretrain + tuple(downstream)


# The fair transfer comparison (issue #21): which pre-training gives the best start? Every
# source of the main table that is not a pairing trick (CS-KD, PS-KD and BYOT are left out:
# the question is about mixup and MixSKD's terms), MixSKD `full` with one part
# removed at a time, and `full` with the discriminators reading unit-norm features (the fix
# this suite tests). All pre-train on classes 0-4 with the converged recipe; the fair
# protocol (experiments/transfer_fair.py) then evaluates each backbone on classes 5-9.
FAIR_TRANSFER_SOURCES = (
    tuple(m for m in MAIN_METHODS if m.name in (
        "cross_entropy", "label_smoothing", "mixup", "cutmix", "mixskd_reference_cifar",
        "mixskd_full", "mixskd_adversarial"))
    + ABLATIONS
    + (MethodSpec("full_unit_pooled_discriminator", "mixskd", "full",
                  overrides=(("objective.discriminator_input", "unit_pooled"),)),))


def transfer_smoke_pretrain_base() -> ml_collections.ConfigDict:
  return _shrunk(transfer_pretrain_base(), per_class=8, batch=16, test_examples=40,
                 eval_batch=40)


def transfer_smoke_downstream_base() -> ml_collections.ConfigDict:
  return _shrunk(transfer_downstream_base(), per_class=4, batch=8, test_examples=40,
                 eval_batch=40)


# The fair protocol at smoke size: 3 training and 2 validation images per class, 40 test images,
# 2 learning rates, 1 epoch per task, 4 canvases of 32 pixels per split.
FAIR_SMOKE_TRANSFER = (
    "data.train_examples_per_class=3", "data.validation_examples_per_class=2",
    "data.test_examples=40", "segmentation.canvas_size=32", "segmentation.train_canvases=4",
    "segmentation.validation_canvases=4", "segmentation.test_canvases=4",
    *(f"{task}.{field}" for task in ("linear_probe", "fine_tune", "segmentation")
      for field in ("recipe.epochs=1", "recipe.batch_size=3", "recipe.warmup_epochs=0",
                    "learning_rates=[0.01, 0.1]")))


def cifar100_base() -> ml_collections.ConfigDict:
  """The official CIFAR-100 recipe for every method (CIFAR ResNet-18, 205 epochs)."""
  return recipes.cifar("cifar_resnet18")


SUITES = {
    "fashion_mnist_converged": Suite(
        "fashion_mnist_converged", fashion_mnist_converged_base,
        "Fashion-MNIST, 200 images/class, no augmentation, small_resnet, 40 epochs",
        ablation_seeds=(0, 1, 2), investigations=INVESTIGATIONS),
    "fashion_mnist": Suite("fashion_mnist", fashion_mnist_base,
                           "Fashion-MNIST, 500 images/class, small_resnet, 8 epochs"),
    # Does the schedule's length decide the mixup-based methods' place? One seed, 3 rows.
    "fashion_mnist_long": Suite(
        "fashion_mnist_long", fashion_mnist_long_base,
        "Fashion-MNIST, 500 images/class, small_resnet, 24 epochs", seeds=(0,),
        methods=tuple(m for m in MAIN_METHODS
                      if m.name in ("cross_entropy", "mixup", "mixskd_full")),
        ablations=()),
    "fashion_mnist_transfer": Suite(
        "fashion_mnist_transfer", transfer_pretrain_base,
        "Fashion-MNIST transfer: pre-train on classes 0-4, then 50 labels/class of classes 5-9",
        methods=transfer_rows(), ablations=(), kind="transfer"),
    "fashion_mnist_transfer_fair": Suite(
        "fashion_mnist_transfer_fair", transfer_pretrain_base,
        "Fashion-MNIST fair transfer: pre-train on classes 0-4 (13 sources), then a "
        "validation-tuned linear probe, fine-tuning and segmentation on classes 5-9",
        methods=FAIR_TRANSFER_SOURCES, ablations=(), kind="transfer_fair"),
    "transfer_fair_smoke": Suite(
        "transfer_fair_smoke", transfer_smoke_pretrain_base,
        "a seconds-long shrink of fashion_mnist_transfer_fair, for tests",
        methods=tuple(m for m in FAIR_TRANSFER_SOURCES
                      if m.name in ("cross_entropy", "mixskd_full")),
        ablations=(), kind="transfer_fair", transfer_overrides=FAIR_SMOKE_TRANSFER),
    "transfer_smoke": Suite(
        "transfer_smoke", transfer_smoke_pretrain_base,
        "a seconds-long shrink of fashion_mnist_transfer, for tests",
        methods=transfer_rows(transfer_smoke_downstream_base), ablations=(), kind="transfer"),
    "default": Suite(
        "default", default_config.get_config,
        "the offline default (configs/default.py): MixSKD full, small_resnet, all of "
        "Fashion-MNIST, 4 epochs", seeds=(0, 1, 2, 3, 4),
        methods=tuple(m for m in MAIN_METHODS if m.name == "mixskd_full"), ablations=()),
    "cifar100": Suite("cifar100", cifar100_base,
                      "CIFAR-100, CIFAR ResNet-18, the paper's 205-epoch recipe"),
    "smoke": Suite("smoke", smoke_base, "a seconds-long shrink of fashion_mnist, for tests",
                   seeds=(0, 1)),
}


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: `spec` at `seed`; `name` is also its directory name."""
  spec: MethodSpec
  seed: int
  ablation: bool
  config: ml_collections.ConfigDict

  @property
  def name(self) -> str:
    return f"{self.spec.name}/seed{self.seed}"


def make_config(base: ml_collections.ConfigDict, spec: MethodSpec,
                seed: int) -> ml_collections.ConfigDict:
  """`base` (or the row's own recipe) set up for `spec` at `seed`."""
  if spec.recipe is not None:
    base = spec.recipe()
  c = recipes.with_method(base, spec.method, spec.variant)
  c.seed = seed
  for term, weight in spec.weights:
    c.objective.weights[term] = weight
  for dotted, value in spec.overrides:
    *parents, leaf = dotted.split(".")
    node = c
    for name in parents:
      node = node[name]
    if leaf not in node:
      raise ValueError(f"Row {spec.name!r} overrides config.{dotted}, which does not exist.")
    node[leaf] = value
  return c


def suite_runs(suite: Suite, *, ablations: bool = True) -> list[Run]:
  """Every run of the suite: main table (method x seed), then the ablations. A main-table
  run that an ablation would repeat (MixSKD full, same seed) is listed once."""
  base = suite.base()
  runs = [Run(spec, seed, False, make_config(base, spec, seed))
          for spec in suite.methods for seed in suite.seeds]
  if ablations:
    runs += [Run(spec, seed, True, make_config(base, spec, seed))
             for spec in suite.ablations + suite.investigations
             for seed in suite.ablation_seeds]
  return runs


def get_suite(name: str) -> Suite:
  if name not in SUITES:
    raise ValueError(f"--suite={name!r} is unknown; use one of {sorted(SUITES)}.")
  return SUITES[name]
