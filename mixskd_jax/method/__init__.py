"""MixSKD and the baselines as pure functions: the objective and its variants, mixing, the
losses, the KL schedule, trainable masks, the training methods and the reference optimizer
and schedules. Imports only JAX, Flax and optax, and `models` for the outputs' container and
pooling; never `train` or `run`."""
