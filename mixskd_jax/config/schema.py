"""The fields every experiment config has: `base_config()`, with the official CIFAR recipe's
values where it has one. configs/*.py and `recipes` start from it; `field_rules.RULES` holds one
rule per leaf of it (tests/test_config_validation.py keeps the two in step)."""

import ml_collections

from mixskd_jax.config.choices import TERMS


def base_config() -> ml_collections.ConfigDict:
  """Every field the trainer reads, with the official CIFAR recipe's values where it has one."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  # mixskd | cross_entropy | label_smoothing | mixup | cutmix | cs_kd | ps_kd | byot;
  # None: mixskd when model.mixskd else cross_entropy.
  c.method = ml_collections.config_dict.placeholder(str)

  c.model = _model()
  c.data = _data()
  c.batch_size = 64                      # global clean batch (the network sees 2x with mixup);
                                         # -1: per_device_batch_size x devices
  c.per_device_batch_size = ml_collections.config_dict.placeholder(int)
  c.eval_batch_size = 500                # global, rounded up to a multiple of the devices;
                                         # the last batch is padded and masked
  c.num_epochs = 205
  c.num_train_steps = -1                 # > 0 overrides num_epochs (smoke runs)
  c.objective = _objective()
  c.baselines = _baselines()
  c.optimizer = _optimizer()
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
  # (mixskd_jax/run/run_guard.py lists the fields that may always change).
  c.resume_policy = "same_config"
  # Divergence guard: a step whose parameters' global norm exceeds this many times the norm
  # of the last checkpointed (or initial) state stops the run like a non-finite loss, and is
  # never checkpointed. 0 turns the norm check off (non-finite values still stop the run).
  c.max_param_norm_ratio = 10.0

  c.init_from = _init_from()
  c.distributed = _distributed()
  return c


def _model() -> ml_collections.ConfigDict:
  """config.model: the network, its dtype and speed options."""
  m = ml_collections.ConfigDict()
  m.name = "cifar_resnet18"        # mixskd_jax.models.SPECS
  m.mixskd = True                  # False: plain backbone with cross-entropy (baselines)
  m.dtype = "float32"              # compute dtype; parameters stay float32
  m.discriminator_hidden = 128
  # Speed options; the values computed are the same either way (mixskd_jax/models/xla_options.py
  # has the measurements). An optimization barrier on every conv input stops XLA recomputing
  # BatchNorm + ReLU inside the weight gradients' transposes.
  m.conv_input_barrier = True       # CPU only (measured there); off on GPU/TPU
  m.cpu_convolutions = "auto"      # auto | eigen | xla_default: XLA:CPU's conv library
  m.remat_branches = False         # recompute the auxiliary branches in the backward pass
  # BatchNorm statistics in train mode over each of this many contiguous row groups of the
  # batch: 1 = the whole global batch (SyncBN, as the single-GPU CIFAR reference); -1 = one per
  # mix group, i.e. per device by default (the official 8-GPU ImageNet run, DDP without
  # SyncBN). Must divide objective.mix_groups (mixskd_jax/train/layout.py).
  m.batchnorm_groups = 1
  m.batchnorm_running_stats = "mean_of_groups"  # or "first_group" (what DDP saves)
  return m


def _data() -> ml_collections.ConfigDict:
  """config.data: the dataset, its subset and the input pipeline."""
  d = ml_collections.ConfigDict()
  d.name = "cifar100"               # fashion_mnist, cifar10, cifar100, imagenet2012
  d.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir
  d.manual_dir = ml_collections.config_dict.placeholder(str)  # imagenet2012 tars
  d.idx_dir = ml_collections.config_dict.placeholder(str)  # local Fashion-MNIST IDX files
  d.augment = True
  d.train_examples_per_class = ml_collections.config_dict.placeholder(int)  # balanced subset
  d.train_examples = ml_collections.config_dict.placeholder(int)  # cap, for smoke runs
  d.test_examples = ml_collections.config_dict.placeholder(int)   # cap, for smoke runs
  d.prefetch = 2                    # host batches tf.data keeps ready
  d.device_prefetch = 2             # global batches already sent to the devices; 0: none
  # Streamed datasets (imagenet2012): examples each epoch's shuffle buffer holds (memory:
  # this many encoded JPEGs, twice while the next epoch is started ahead).
  d.shuffle_buffer = 10_000
  d.example_ids = False             # batches carry 'example_id' (ps_kd needs it)
  d.class_pairs = False             # batches carry a same-class 'pair_image' (cs_kd)
  # Keep only these classes (distinct labels of the dataset), relabeled 0..k-1 in this order,
  # in both splits; the model gets a k-way head. None: every class. In-memory datasets only.
  d.classes = ml_collections.config_dict.placeholder(tuple)
  return d


def _objective() -> ml_collections.ConfigDict:
  """config.objective: the MixSKD objective, its variant and research options."""
  o = ml_collections.ConfigDict()
  o.variant = "full"           # reference_cifar | full | adversarial
  o.alpha = 0.4                # mixup Beta(alpha, alpha)
  o.temperature = 3.0
  o.weights = ml_collections.ConfigDict({t: 1.0 for t in TERMS})
  o.weights.mixup_ce = ml_collections.config_dict.placeholder(float)  # None: variant
  o.weights.self_teacher_ce = ml_collections.config_dict.placeholder(float)
  o.gradient_reversal_scale = 1.0
  # Pairs (and the [clean; mixed] rows) stay within each of this many contiguous groups of the
  # batch; -1: one per device, merged while a group would hold < min_mix_group_size examples.
  o.mix_groups = -1
  o.min_mix_group_size = 8
  o.lam_per_group = False      # mixskd: one lam per mix group (the 8-GPU ImageNet run)
  # Research options (mixskd only; other methods ignore them), off in the reference:
  # the KL terms' (objective.KL_TERMS) weights ramp as min(1, epochs done / this); 0: no ramp.
  o.kl_warmup_epochs = 0.0
  # none | teacher_leads (kl_self_teacher only on steps where the self-teacher's batch
  # accuracy beats the backbone's) | monitor (log that gate and the accuracies, never apply it)
  o.kl_gate = "none"
  # pooled (the reference) | unit_pooled (the discriminators read unit-norm pooled features, so
  # their frozen random BCE cannot reward larger features; its effect on transfer:
  # experiments/results/README.md)
  o.discriminator_input = "pooled"
  return o


def _baselines() -> ml_collections.ConfigDict:
  """config.baselines: the baselines' hyperparameters (spec §7: Self-KD-Lib's values)."""
  b = ml_collections.ConfigDict()
  b.label_smoothing = 0.1      # eps: 1 - eps on the label, eps / (C - 1) elsewhere
  b.mixup_alpha = 0.4
  b.cutmix_alpha = 1.0
  b.kd_temperature = 4.0       # CS-KD and BYOT
  b.cs_kd_weight = 1.0
  b.ps_kd_alpha = 0.8          # alpha_T; alpha_t = alpha_T * (epoch + 1) / epochs
  b.byot_kl_weight = 1.0
  b.byot_feature_weight = 0.05
  return b


def _optimizer() -> ml_collections.ConfigDict:
  """config.optimizer: the reference SGD and its learning-rate schedule."""
  o = ml_collections.ConfigDict()
  o.learning_rate = 0.1
  # When set, learning_rate is the rate for this global batch, scaled linearly to the actual
  # one (layout.py); None: learning_rate as given.
  o.lr_reference_batch = ml_collections.config_dict.placeholder(int)
  o.momentum = 0.9
  o.nesterov = True
  o.weight_decay = 5e-4        # coupled L2, as PyTorch SGD
  o.warmup_epochs = 5          # linear, per step
  o.schedule = "multistep"     # multistep | cosine | constant, per epoch after warm-up
  o.milestones = (100, 150)    # epochs after warm-up (multistep)
  o.decay_factor = 0.1
  return o


def _init_from() -> ml_collections.ConfigDict:
  """config.init_from: transfer learning (mixskd_jax/interop/pretrained.py): a fresh run
  (no checkpoint in its own workdir; a resumed run continues from its own) starts its backbone
  from a trained one."""
  i = ml_collections.ConfigDict()
  # A training workdir (its newest checkpoint), one of its checkpoints/<N> directories, or a
  # directory `python -m mixskd_jax.interop` wrote. None: a fresh initialization.
  i.path = ml_collections.config_dict.placeholder(str)
  i.keep_head = False          # also copy the classifier head fc (same class count)
  # Linear probe: only the classifier head trains; the backbone's parameters get no update and
  # its BatchNorm runs in inference mode (running statistics, never updated). Plain models.
  i.freeze_backbone = False
  return i


def _distributed() -> ml_collections.ConfigDict:
  """config.distributed: multi-host start-up (mixskd_jax/run/distributed.py)."""
  d = ml_collections.ConfigDict()
  d.initialize = "auto"      # auto (when a cluster is configured) | always | never
  d.coordinator_address = ml_collections.config_dict.placeholder(str)
  d.num_processes = ml_collections.config_dict.placeholder(int)
  d.process_id = ml_collections.config_dict.placeholder(int)
  d.local_device_ids = ml_collections.config_dict.placeholder(tuple)
  d.cpu_collectives = ml_collections.config_dict.placeholder(str)  # "gloo" on CPU
  return d
