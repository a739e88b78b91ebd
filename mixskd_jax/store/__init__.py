"""What a run keeps on disk: the workdir (local or `gs://`), Orbax checkpoints and their
digests. Knows nothing of the trainer; `run` writes through it and `interop` reads it."""
