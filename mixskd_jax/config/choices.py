"""The names every choice field of a config may hold: one list per registry, here at the bottom
of the package so that a config is checked without importing JAX, Flax or TensorFlow.

Each registry imports its names from here (the objective's variants, terms, KL gates and
discriminator inputs; the training methods; the schedules; the running-statistics modes; the
CPU convolution options). The registries that map a name to code (`models.registry.SPECS`,
`models.registry.DTYPES`, `data.SPECS`) are checked against these lists by
tests/test_architecture.py, so a name added on one side only fails a test.
"""

# The MixSKD objective (method/objective.py).
VARIANTS = ("reference_cifar", "full", "adversarial")
TERMS = ("clean_ce", "mixup_ce", "self_teacher_ce", "kl_self_teacher", "kl_branches",
         "feature_mse", "discriminator")
# The distillation KL terms: what `kl_schedule.kl_warmup_scale` ramps.
KL_TERMS = ("kl_self_teacher", "kl_branches")
# ObjectiveConfig.kl_gate: "none"; "teacher_leads" multiplies kl_self_teacher by 1 on steps
# where the self-teacher's batch accuracy exceeds the backbone head's, else 0; "monitor"
# computes and logs the same gate and accuracies without applying it.
KL_GATES = ("none", "teacher_leads", "monitor")
# ObjectiveConfig.discriminator_input: what the discriminators read. "pooled" is the
# reference (the pooled feature maps); "unit_pooled" scales each pooled row to unit L2 norm
# first, so a frozen random discriminator's BCE cannot be lowered by growing the features.
# Built to test whether that term hurts transfer by rewarding larger features (issue #21): it
# did hurt frozen features, but not through their size (experiments/results/README.md).
DISCRIMINATOR_INPUTS = ("pooled", "unit_pooled")

# The training methods (method/methods.py).
METHODS = ("mixskd", "cross_entropy", "label_smoothing", "mixup", "cutmix", "cs_kd", "ps_kd",
           "byot")
# Methods whose network carries auxiliary branches (config.model.mixskd = True).
BRANCHED_METHODS = ("mixskd", "byot")
# What each method needs from the input pipeline, as config.data fields.
DATA_NEEDS = {"cs_kd": "class_pairs", "ps_kd": "example_ids"}

# The learning-rate schedules after warm-up (method/schedule.py).
SCHEDULES = ("multistep", "cosine", "constant")

# Networks (models/registry.py SPECS) and compute dtypes (models/registry.py DTYPES).
MODELS = ("cifar_resnet18", "cifar_resnet34", "cifar_resnet50", "imagenet_resnet50",
          "small_resnet", "small_convnext", "small_vit")
DTYPES = ("float32", "bfloat16")
# XLA:CPU's convolution library (models/xla_options.py).
CPU_CONVOLUTIONS = ("auto", "eigen", "xla_default")
# Which BatchNorm running statistics a grouped batch keeps (models/layers.py).
RUNNING_STATS = ("mean_of_groups", "first_group")

# Datasets (data/datasets.py SPECS), the streamed ones (spec.in_memory False: tf.data streams
# them) and each one's class count (config.data.classes indexes them).
DATASETS = ("fashion_mnist", "cifar10", "cifar100", "imagenet2012")
STREAMED_DATASETS = ("imagenet2012",)
DATASET_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "cifar100": 100, "imagenet2012": 1000}

# A run's lifecycle (run/run_guard.py, run/distributed.py).
RESUME_POLICIES = ("same_config", "allow_changes")
DISTRIBUTED_MODES = ("auto", "always", "never")
CPU_COLLECTIVES = ("gloo", "mpi", "megascale")  # jax_cpu_collectives_implementation
