"""The benchmark: one compiled train step timed on synthetic data, the host pipeline, the
machine's peak, the communication read from the compiled HLO, and the side-by-side comparison
with the PyTorch step. The command is `python -m mixskd_jax.benchmark`."""
