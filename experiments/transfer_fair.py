"""The fair transfer suite's second stage: every pre-trained backbone through the protocol.

`evaluate_all` runs `mixskd_jax.transfer.run.run_transfer` on each finished pre-training run of
the suite (`<workdir>/<source>/seed<k>/`), into `<workdir>/<source>/seed<k>/transfer/`, seed
by seed; a task already written is skipped, so the command resumes where it stopped. Downstream
seed k starts from pre-training seed k (the fresh head, data order and canvases use seed k).
"""

from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import ml_collections
from absl import logging

from experiments import protocol
from experiments.overrides import apply_override
from mixskd_jax.transfer import config as transfer_config

EVAL_DIR = "transfer"


def eval_dir(workdir: str, run: protocol.Run) -> str:
  return os.path.join(workdir, run.name, EVAL_DIR)


def suite_transfer_config(seed: int, init_from: str,
                          overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The protocol's default config (`mixskd_jax/transfer/config.py`) for one backbone, with
  `--transfer_set` overrides (dotted.field=value)."""
  c = transfer_config.get_config()
  c.seed = seed
  c.init_from.path = init_from
  for assignment in overrides:
    apply_override(c, assignment)
  return c


def evaluate_all(runs: Sequence[protocol.Run], workdir: str, *, is_finished: Callable[[str], bool],
                 overrides: Sequence[str] = ()) -> int:
  """Evaluates every finished pre-training run (seed by seed); returns how many were left
  out because their pre-training has not finished."""
  from mixskd_jax.transfer import run as transfer_run  # pylint: disable=import-outside-toplevel
  waiting = 0
  ordered = sorted(runs, key=lambda r: r.seed)
  for i, run in enumerate(ordered):
    source = os.path.join(workdir, run.name)
    if not is_finished(source):
      waiting += 1
      continue
    t0 = time.time()
    results = transfer_run.run_transfer(suite_transfer_config(run.seed, source, overrides),
                                        eval_dir(workdir, run), log=logging.info)
    logging.info("[%d/%d] transfer of %s (%.0f s): %s", i + 1, len(ordered), run.name,
                 time.time() - t0, transfer_run.summary_line(results))
  return waiting
