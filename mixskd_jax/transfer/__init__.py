"""Transfer learning, measured fairly: how good a start is a pre-trained backbone?

`python -m mixskd_jax.transfer --init_from=WORKDIR --workdir=OUT` evaluates one backbone on a
downstream task three ways (a linear probe, fine-tuning, segmentation of composed scenes), each
with its own learning rate and BatchNorm mode chosen on held-out validation data
(`protocol`), and reads the backbone's weight norms, BatchNorm statistics and feature scale
(`diagnostics`). Modules: `config` (every setting), `data` (downstream splits), `scenes` (the
segmentation canvases), `sweep` (K learning rates, one compiled step), `classification` and
`segmentation` (models, losses, metrics), `tasks`, `protocol`, `run`.
"""
