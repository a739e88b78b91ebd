"""Batch arithmetic shared by the pipelines: global vs per-process sizes, steps, checks."""

from __future__ import annotations

import ml_collections


def local_batch_size(global_batch: int, process_count: int, field: str) -> int:
  """global_batch // process_count; ValueError naming `config.<field>` if it does not divide."""
  if global_batch <= 0:
    raise ValueError(f"config.{field}={global_batch} must be positive.")
  if process_count <= 0 or global_batch % process_count:
    raise ValueError(f"config.{field}={global_batch} is the global batch and must be divisible "
                     f"by the number of processes ({process_count}); pick a multiple of it.")
  return global_batch // process_count


def check_process(process_index: int, process_count: int) -> None:
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in [0, {process_count}).")


def train_steps_per_epoch(num_train: int, config: ml_collections.ConfigDict) -> int:
  """num_train // config.batch_size (the remainder is dropped); ValueError if that is 0."""
  steps = num_train // config.batch_size
  if steps == 0:
    raise ValueError(
      f"config.batch_size={config.batch_size} is larger than the {num_train} training examples "
      f"of config.data.name={config.data.name!r} (after config.data.train_examples_per_class="
      f"{config.data.train_examples_per_class} and config.data.train_examples="
      f"{config.data.train_examples}), so an epoch has no full batch. Lower the batch size or "
      "use more examples.")
  return steps


def ceil_div(a: int, b: int) -> int:
  return -(-a // b) if a > 0 else 0


def eval_steps(num_test: int, local_batch: int, process_count: int, contiguous: bool) -> int:
  """Batches each process yields so that all `num_test` examples are seen once.

  Args:
    num_test: examples in the (capped) test split.
    local_batch: per-process eval batch.
    process_count: number of processes.
    contiguous: True when each process reads its own contiguous share (about
      num_test / process_count examples, streamed datasets); False when the processes take
      slices of the same global batches (in-memory datasets).
  """
  if contiguous:
    return ceil_div(ceil_div(num_test, process_count), local_batch)
  return ceil_div(num_test, local_batch * process_count)

