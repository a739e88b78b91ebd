"""The fields every experiment config has (configs/*.py start from `base_config()`), the
`:smoke` shrink that every config accepts, and `validate`, which checks every field's type and
range (the rules: `config_rules.RULES`, one per field of `base_config()`)."""

import ml_collections

from mixskd_jax import config_rules
from mixskd_jax.config_rules import ConfigValueError  # noqa: F401  (validate raises it)
from mixskd_jax.objective import TERMS, VARIANTS


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with the official CIFAR recipe's values where it has one."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # mixskd | cross_entropy | label_smoothing | mixup | cutmix | cs_kd | ps_kd | byot;
  # None: mixskd when model.mixskd else cross_entropy.
  c.method = ml_collections.config_dict.placeholder(str)

  c.model = ml_collections.ConfigDict()
  c.model.name = "cifar_resnet18"        # mixskd_jax.models.SPECS
  c.model.mixskd = True                  # False: plain backbone with cross-entropy (baselines)
  c.model.dtype = "float32"              # compute dtype; parameters stay float32
  c.model.discriminator_hidden = 128
  # Speed options; the values computed are the same either way (mixskd_jax/models/xla_options.py
  # has the measurements). An optimization barrier on every conv input stops XLA recomputing
  # BatchNorm + ReLU inside the weight gradients' transposes.
  c.model.conv_input_barrier = True       # CPU only (measured there); off on GPU/TPU
  c.model.cpu_convolutions = "auto"      # auto | eigen | xla_default: XLA:CPU's conv library
  c.model.remat_branches = False         # recompute the auxiliary branches in the backward pass
  # BatchNorm statistics in train mode over each of this many contiguous row groups of the
  # batch: 1 = the whole global batch (SyncBN, as the single-GPU CIFAR reference); -1 = one per
  # mix group, i.e. per device by default (the official 8-GPU ImageNet run, DDP without
  # SyncBN). Must divide objective.mix_groups (mixskd_jax/train/layout.py).
  c.model.batchnorm_groups = 1
  c.model.batchnorm_running_stats = "mean_of_groups"  # or "first_group" (what DDP saves)

  c.data = ml_collections.ConfigDict()
  c.data.name = "cifar100"               # fashion_mnist, cifar10, cifar100, imagenet2012
  c.data.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir
  c.data.manual_dir = ml_collections.config_dict.placeholder(str)  # imagenet2012 tars
  c.data.idx_dir = ml_collections.config_dict.placeholder(str)  # local Fashion-MNIST IDX files
  c.data.augment = True
  c.data.train_examples_per_class = ml_collections.config_dict.placeholder(int)  # balanced subset
  c.data.train_examples = ml_collections.config_dict.placeholder(int)  # cap, for smoke runs
  c.data.test_examples = ml_collections.config_dict.placeholder(int)   # cap, for smoke runs
  c.data.prefetch = 2                    # host batches tf.data keeps ready
  c.data.device_prefetch = 2             # global batches already sent to the devices; 0: none
  # Streamed datasets (imagenet2012): examples each epoch's shuffle buffer holds (memory:
  # this many encoded JPEGs, twice while the next epoch is started ahead).
  c.data.shuffle_buffer = 10_000
  c.data.example_ids = False             # batches carry 'example_id' (ps_kd needs it)
  c.data.class_pairs = False             # batches carry a same-class 'pair_image' (cs_kd)
  # Keep only these classes (distinct labels of the dataset), relabeled 0..k-1 in this order,
  # in both splits; the model gets a k-way head. None: every class. In-memory datasets only.
  c.data.classes = ml_collections.config_dict.placeholder(tuple)

  c.batch_size = 64                      # global clean batch (the network sees 2x with mixup);
                                         # -1: per_device_batch_size x devices
  c.per_device_batch_size = ml_collections.config_dict.placeholder(int)
  c.eval_batch_size = 500                # global, rounded up to a multiple of the devices;
                                         # the last batch is padded and masked
  c.num_epochs = 205
  c.num_train_steps = -1                 # > 0 overrides num_epochs (smoke runs)

  c.objective = ml_collections.ConfigDict()
  c.objective.variant = "full"           # reference_cifar | full | adversarial
  c.objective.alpha = 0.4                # mixup Beta(alpha, alpha)
  c.objective.temperature = 3.0
  c.objective.weights = ml_collections.ConfigDict({t: 1.0 for t in TERMS})
  c.objective.weights.mixup_ce = ml_collections.config_dict.placeholder(float)  # None: variant
  c.objective.weights.self_teacher_ce = ml_collections.config_dict.placeholder(float)
  c.objective.gradient_reversal_scale = 1.0
  # Pairs (and the [clean; mixed] rows) stay within each of this many contiguous groups of the
  # batch; -1: one per device, merged while a group would hold < min_mix_group_size examples.
  c.objective.mix_groups = -1
  c.objective.min_mix_group_size = 8
  c.objective.lam_per_group = False      # mixskd: one lam per mix group (the 8-GPU ImageNet run)
  # Research options (mixskd only; other methods ignore them), off in the reference:
  # the KL terms' (objective.KL_TERMS) weights ramp as min(1, epochs done / this); 0: no ramp.
  c.objective.kl_warmup_epochs = 0.0
  # none | teacher_leads (kl_self_teacher only on steps where the self-teacher's batch
  # accuracy beats the backbone's) | monitor (log that gate and the accuracies, never apply it)
  c.objective.kl_gate = "none"
  # pooled (the reference) | unit_pooled (the discriminators read unit-norm pooled features, so
  # their frozen random BCE cannot reward larger features; its effect on transfer:
  # experiments/results/README.md)
  c.objective.discriminator_input = "pooled"

  # The baselines' hyperparameters (spec §7: Self-KD-Lib's values).
  c.baselines = ml_collections.ConfigDict()
  c.baselines.label_smoothing = 0.1      # eps: 1 - eps on the label, eps / (C - 1) elsewhere
  c.baselines.mixup_alpha = 0.4
  c.baselines.cutmix_alpha = 1.0
  c.baselines.kd_temperature = 4.0       # CS-KD and BYOT
  c.baselines.cs_kd_weight = 1.0
  c.baselines.ps_kd_alpha = 0.8          # alpha_T; alpha_t = alpha_T * (epoch + 1) / epochs
  c.baselines.byot_kl_weight = 1.0
  c.baselines.byot_feature_weight = 0.05

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 0.1
  # When set, learning_rate is the rate for this global batch, scaled linearly to the actual
  # one (layout.py); None: learning_rate as given.
  c.optimizer.lr_reference_batch = ml_collections.config_dict.placeholder(int)
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.weight_decay = 5e-4        # coupled L2, as PyTorch SGD
  c.optimizer.warmup_epochs = 5          # linear, per step
  c.optimizer.schedule = "multistep"     # multistep | cosine | constant, per epoch after warm-up
  c.optimizer.milestones = (100, 150)    # epochs after warm-up (multistep)
  c.optimizer.decay_factor = 0.1

  c.log_every_steps = 50
  c.eval_every_epochs = 1
  c.eval_calibration_bins = 15           # confidence bins of the expected calibration error
  # Also evaluate on the training examples the run trains on (unaugmented, each once), as
  # train_set/* in the eval history: does the model fit its training set?
  c.eval_on_train_set = False
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3                 # >= 1: the run resumes from its newest intact one
  # Resuming a workdir whose stored config differs from this one in a field that changes the
  # trained model: "same_config" refuses (naming the fields), "allow_changes" resumes anyway
  # (mixskd_jax/train/run_guard.py lists the fields that may always change).
  c.resume_policy = "same_config"
  # Divergence guard: a step whose parameters' global norm exceeds this many times the norm
  # of the last checkpointed (or initial) state stops the run like a non-finite loss, and is
  # never checkpointed. 0 turns the norm check off (non-finite values still stop the run).
  c.max_param_norm_ratio = 10.0

  # Transfer learning (mixskd_jax/train/pretrained.py): a fresh run (no checkpoint in its own
  # workdir; a resumed run continues from its own) starts its backbone from a trained one.
  c.init_from = ml_collections.ConfigDict()
  # A training workdir (its newest checkpoint), one of its checkpoints/<N> directories, or a
  # directory `python -m mixskd_jax.interop` wrote. None: a fresh initialization.
  c.init_from.path = ml_collections.config_dict.placeholder(str)
  c.init_from.keep_head = False          # also copy the classifier head fc (same class count)
  # Linear probe: only the classifier head trains; the backbone's parameters get no update and
  # its BatchNorm runs in inference mode (running statistics, never updated). Plain models.
  c.init_from.freeze_backbone = False

  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = "auto"      # auto (when a cluster is configured) | always | never
  c.distributed.coordinator_address = ml_collections.config_dict.placeholder(str)
  c.distributed.num_processes = ml_collections.config_dict.placeholder(int)
  c.distributed.process_id = ml_collections.config_dict.placeholder(int)
  c.distributed.local_device_ids = ml_collections.config_dict.placeholder(tuple)
  c.distributed.cpu_collectives = ml_collections.config_dict.placeholder(str)  # "gloo" on CPU
  return c


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the type and range of every field of `config`, then the rules between fields.

  Raises:
    ConfigValueError: one line naming the first bad field, its value, what is allowed and
      what to set, e.g. `config.batch_size = 0: must be an int >= 1 (the global clean batch),
      or -1 (with config.per_device_batch_size set).` Unknown field names are
      `unknown_field_error`'s job; a field `config` lacks is checked at its default.
  """
  config_rules.check(config, base_config())


def finalize(config: ml_collections.ConfigDict, arg: str = "") -> ml_collections.ConfigDict:
  """Applies the config-file argument: comma-separated tokens after the path's ':'.

  * an objective variant (`reference_cifar`, `full`, `adversarial`) selects it;
  * a training method (`cross_entropy`, `mixup`, `byot`, ... `train.methods.METHODS`)
    trains it on the same backbone and recipe (`recipes.with_method`);
  * `smoke` shrinks the run to a few tiny steps that exercise every code path (data, step,
    eval, checkpoint, results) in about a minute on a laptop.

  Example: --config=configs/cifar100_resnet18_mixskd.py:reference_cifar,smoke
           --config=configs/fashion_mnist_vit.py:cross_entropy
  """
  from mixskd_jax import recipes  # pylint: disable=import-outside-toplevel  (imports this file)
  from mixskd_jax.train.methods import METHODS  # pylint: disable=import-outside-toplevel
  for token in filter(None, (t.strip() for t in arg.split(","))):
    if token in METHODS:
      config = recipes.with_method(config, token)
    elif token in VARIANTS:
      config.objective.variant = token
    elif token == "smoke":
      config.num_train_steps = 4
      if config.optimizer.lr_reference_batch is None and config.batch_size > 0:
        # The recipe's rate per example: its full rate on a batch of 8 and no warm-up
        # diverges (the CIFAR recipe's loss went 55 -> 47006 in 4 steps).
        config.optimizer.lr_reference_batch = config.batch_size
      config.batch_size = 8
      config.per_device_batch_size = None
      config.eval_batch_size = 16
      config.data.train_examples = 64
      config.data.test_examples = 40
      config.log_every_steps = 2
      config.checkpoint_every_steps = 2
      config.optimizer.warmup_epochs = 0
    else:
      raise ValueError(f"Unknown config argument {token!r}; use 'smoke', a method of "
                       f"{METHODS} and/or a variant of {VARIANTS}, comma-separated.")
  return config


def unknown_field_error(config: ml_collections.ConfigDict, dotted: str) -> str | None:
  """Checks that `dotted` (e.g. "optimizer.learning_rate") names a field of `config`.

  Returns None when it does (or when it reaches into a value that is not a group of fields,
  which ml_collections judges itself), else one line naming the unknown field, the closest
  valid name and the valid names at that level:

    Unknown config field 'batchsize'; did you mean 'batch_size'? (valid fields of config: ...)

  The closest name: the same name elsewhere in the config (`learning_rate` ->
  `optimizer.learning_rate`), else a near spelling (difflib), the initials of a name (`lr` ->
  `learning_rate`) or a name it starts.
  """
  import difflib  # pylint: disable=import-outside-toplevel

  def fields(node, prefix=""):  # every dotted path of the config
    for key, value in node.items():
      yield prefix + key
      if isinstance(value, (ml_collections.ConfigDict, dict)):
        yield from fields(value, f"{prefix}{key}.")

  node, parents = config, []
  for name in dotted.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)):
      return None  # indexing into a value: ml_collections' own error
    if name in node:
      node = node[name]
      parents.append(name)
      continue
    names = list(node.keys())
    prefix = "".join(p + "." for p in parents)
    everywhere = list(fields(config))
    same_name = [f for f in everywhere if f.rsplit(".", 1)[-1] == name]
    initials = [n for n in names if "".join(w[:1] for w in n.split("_")) == name.lower()]
    starts = [n for n in names if len(name) >= 2 and n.startswith(name.lower())]
    near = (difflib.get_close_matches(name.lower(), names, 1, 0.6) or initials or starts
            or difflib.get_close_matches(name.lower(), names, 1, 0.4))
    if same_name:
      suggestion = same_name[0]
    elif near:
      suggestion = prefix + near[0]
    else:  # a near spelling of a field in another group
      leaf = {f.rsplit(".", 1)[-1]: f for f in everywhere}
      close = difflib.get_close_matches(name.lower(), list(leaf), 1, 0.75)
      suggestion = leaf[close[0]] if close else None
    unknown = prefix + name
    hint = f"; did you mean '{suggestion}'?" if suggestion else ""
    group = "config" + "".join("." + p for p in parents)
    return (f"Unknown config field '{unknown}'{hint} (valid fields of {group}: "
            f"{', '.join(names)})")
  return None
