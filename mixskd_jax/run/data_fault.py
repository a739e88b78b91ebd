"""Damaged data met while training or evaluating: save the last completed step, then stop with
one line.

A streamed dataset (ImageNet) reads its shards as it trains, so a damaged record can surface
hours into a run, as a TensorFlow error from the input pipeline. Before that error stops the
run, the state of the last completed step is checkpointed (unless it already is), so that the
same command resumes exactly once the data is repaired; the error becomes the data package's
one-line `DataFaultError` (exit status 2 from `python -m mixskd_jax.main`). Any other error is
left as it is: a bug is not damaged data. With several processes only the one that read the
record knows; it saves and stops, and the others stop at the next step's collectives.
"""

from __future__ import annotations

from typing import Callable, Iterable

import ml_collections

from mixskd_jax import data


def saved_for_fault(error: Exception, data_config: ml_collections.ConfigDict, done: int, *,
                    save: Callable[[], None], saved: bool, histories: Iterable) -> Exception:
  """The exception to raise for `error`, met after `done` completed steps: `error` itself,
  unless it is TensorFlow failing to read a damaged record of `config.data`'s prepared
  dataset; then `save()` runs first (unless the step is `saved` already), every history is
  flushed, and the one-line `DataFaultError` says that the state of step `done` is saved."""
  folder = str(data.sources.get_builder(data_config).data_dir)
  fault = data.integrity.read_fault(error, folder)
  if fault is None:
    return error
  if not saved:
    save()
  for history in histories:
    history.flush()
  return type(fault)(f"{fault} The state at step {done} is saved: the same command resumes "
                     "from it.")
