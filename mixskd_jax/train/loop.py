"""`train_and_evaluate(config, workdir)`: the whole run, importable from tests and notebooks."""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers

from mixskd_jax import data
from mixskd_jax.train import builder, distributed, layout, preflight, sharding, steps
from mixskd_jax.train import workdir as workdir_lib
from mixskd_jax.train.checkpoint import Checkpoints
from mixskd_jax.train.data_prep import prepare_data
from mixskd_jax.train.device_prefetch import prefetch_to_device
from mixskd_jax.train.methods import check_config as check_method_config
from mixskd_jax.train.preemption import PREEMPTED_EXIT_CODE, Preemption
from mixskd_jax.train.progress import ProgressReporter, format_eval
from mixskd_jax.train.state import TrainState

HISTORY_FILE = "eval_history.jsonl"
TRAIN_HISTORY_FILE = "train_history.jsonl"  # the logged means of the train metrics
RESULTS_FILE = "results.json"


def _check_finite(buffer: list[dict], first_step: int) -> None:
  """Raises on the first non-finite metric, naming its step and term."""
  host = jax.device_get(buffer)
  for offset, metrics in enumerate(host):
    for name, value in metrics.items():
      if not np.isfinite(value):
        raise FloatingPointError(
            f"{name} = {value} at step {first_step + offset + 1}: the run stopped and its last "
            "good checkpoint is kept. Lower config.optimizer.learning_rate or check the data.")


class _StepTimer:
  """Wall time of the training steps alone: starts once the first step is done and leaves out
  the `excluded` blocks (evaluation, checkpointing). Blocks on the state at each boundary so
  asynchronously dispatched steps are counted where they run."""

  def __init__(self):
    self._t0, self._excluded = None, 0.0

  def start(self, state) -> None:
    jax.block_until_ready(state)
    self._t0 = time.perf_counter()

  @contextlib.contextmanager
  def excluded(self, state):
    if self._t0 is None:
      yield
      return
    jax.block_until_ready(state)
    t = time.perf_counter()
    try:
      yield
    finally:
      self._excluded += time.perf_counter() - t

  def stop(self, state, steps: int) -> float | None:
    if self._t0 is None or steps < 1:
      return None
    jax.block_until_ready(state)
    return (time.perf_counter() - self._t0 - self._excluded) / steps


class Trainer:
  """Everything a run is built from; `run()` trains, evaluates and writes results."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    distributed.maybe_initialize(config.distributed)
    check_method_config(config)  # before any data is loaded
    self.mesh = sharding.make_mesh()
    # Batch sizes, mix and BatchNorm groups and the learning rate for these devices.
    config = layout.resolve(config, self.mesh.size)
    self.config, self.workdir = config, workdir
    self.is_chief = jax.process_index() == 0
    prepare_data(config.data)  # process 0 downloads or builds it first, the others wait
    self.info = data.get_dataset_info(config.data)
    self.steps_per_epoch = data.steps_per_epoch(config)
    self.num_steps = (config.num_train_steps if config.num_train_steps > 0
                      else config.num_epochs * self.steps_per_epoch)
    # The schedule spans whole epochs even when num_train_steps ends mid-epoch.
    self.num_epochs = max(config.num_epochs, math.ceil(self.num_steps / self.steps_per_epoch))
    built = builder.build_steps(
        config, self.mesh, builder.DataShape(
            num_classes=self.info.num_classes, image_shape=self.info.image_shape,
            mean=self.info.mean, std=self.info.std, num_examples=self.info.num_train),
        steps_per_epoch=self.steps_per_epoch, num_epochs=self.num_epochs)
    self.built = built  # model, method, optimizer, schedule and the jitted steps
    self.train_step, self.eval_step = built.train_step, built.eval_step
    self.root_key, init_key = jax.random.split(jax.random.key(config.seed))
    self.state = built.init_state(init_key)
    # Filled by run(): the measured step time, the latest evaluation's reliability bins and
    # the run's eval and train histories.
    self.train_step_time_s = None
    self.last_calibration = None
    self._histories: dict[str, workdir_lib.JsonlHistory] = {}

  def evaluate(self, state: TrainState) -> dict[str, float]:
    """Every test example exactly once (the last batch padded and masked)."""
    batch_sharding = sharding.data_sharding(self.mesh)
    totals = None
    iterator = data.eval_iterator(self.config, process_index=jax.process_index(),
                                  process_count=jax.process_count())
    for local in iterator:
      sums = self.eval_step(state, sharding.to_global(local, batch_sharding))
      totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    # The backbone's reliability diagram of the latest evaluation, for results.json.
    self.last_calibration = {k.split("/", 1)[1]: np.asarray(v).tolist()
                             for k, v in totals.items() if k.startswith("calibration/")}
    return steps.summarize_eval(totals)

  def run(self) -> dict[str, Any]:
    # Every file of the run goes through epath, so gs://bucket/run works like a local path.
    workdir = workdir_lib.resolve(self.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpoints(workdir, keep=self.config.keep_checkpoints)
    state = checkpoints.restore_or_keep(self.state)
    start = int(jax.device_get(state.step))
    # Every process keeps the records (its results.json is the chief's); the chief writes.
    self._histories = {name: workdir_lib.JsonlHistory(workdir / name, writer=self.is_chief,
                                                      resume_step=start)
                       for name in (HISTORY_FILE, TRAIN_HISTORY_FILE)}
    # A string: TensorBoard's writer reads gs:// itself, through TensorFlow's file systems.
    writer = metric_writers.create_default_writer(str(workdir), just_logging=not self.is_chief)
    if self.is_chief:
      workdir_lib.write_json(workdir / "config.json", self.config.to_dict())
    logging.info("Training %s steps (%s per epoch) from step %s on %s device(s), %s process(es).",
                 self.num_steps, self.steps_per_epoch, start, self.mesh.size, jax.process_count())
    t0 = time.time()
    try:
      state, preempted = self._train(state, start, checkpoints, writer)
    finally:
      writer.flush()
      for history in self._histories.values():
        history.flush()
      checkpoints.close()
    self.state = state  # the final state, for notebooks and tests
    return self._results(state, time.time() - t0, start, workdir, preempted=preempted)

  def _train(self, state, start, checkpoints, writer):
    cfg = self.config
    batches = prefetch_to_device(
        data.train_iterator(cfg, start_step=start, process_index=jax.process_index(),
                            process_count=jax.process_count()),
        sharding.data_sharding(self.mesh), cfg.data.device_prefetch)
    progress = ProgressReporter(self.num_steps, every_steps=cfg.log_every_steps, writer=writer)
    buffer, buffer_start = [], start
    timer = _StepTimer()
    done = start  # stays so when the checkpoint is already at num_steps
    preempted = False
    t_first = time.perf_counter()
    with Preemption(start) as preemption:
      for step in range(start, self.num_steps):
        state, metrics = self.train_step(state, next(batches), self.root_key)
        buffer.append(metrics)
        done = step + 1
        if step == start:
          timer.start(state)  # after the first step, which includes compilation
          progress.start(done)
          logging.info("Compiled and ran the first step in %.1f s.", time.perf_counter() - t_first)
        stop = preemption.should_stop(done)  # the same step in every process
        last = done == self.num_steps
        if done % cfg.log_every_steps == 0 or last or stop or done % cfg.checkpoint_every_steps == 0:
          _check_finite(buffer, buffer_start)
          means = jax.tree_util.tree_map(lambda *xs: float(np.mean(xs)), *jax.device_get(buffer))
          writer.write_scalars(done, means)
          self._append_history(TRAIN_HISTORY_FILE, {"step": done, **means})
          buffer, buffer_start = [], done
          progress.report(done, means)  # the means waited for the steps: the time is theirs
        elif progress.due(done) and buffer:  # a line at least every minute on slow runs
          progress.report(done, jax.tree_util.tree_map(
              lambda *xs: float(np.mean(xs)), *jax.device_get(buffer)))
        if done % self.steps_per_epoch == 0 and (done // self.steps_per_epoch) % cfg.eval_every_epochs == 0 or last:
          with timer.excluded(state), progress.excluded():
            self._record_eval(state, done, writer)
        if done % cfg.checkpoint_every_steps == 0 or last or stop:
          with timer.excluded(state), progress.excluded():
            kept = checkpoints.save(done, state)
            for history in self._histories.values():  # a history is as durable as its step
              history.flush()
        if stop and not last:  # stopped at the last step, the run is simply finished
          preempted = True
          if kept:
            logging.warning("Preempted at step %s: checkpoint saved; exiting with status %s, "
                            "the same command resumes.", done, PREEMPTED_EXIT_CODE)
          else:
            logging.warning("Preempted at step %s: no checkpoint kept "
                            "(config.keep_checkpoints=%s); exiting with status %s.", done,
                            cfg.keep_checkpoints, PREEMPTED_EXIT_CODE)
          break
    self.train_step_time_s = timer.stop(state, steps=done - start - 1)
    return state, preempted

  def _record_eval(self, state, step, writer):
    metrics = self.evaluate(state)
    writer.write_scalars(step, metrics)
    logging.info("%s", format_eval(step, step / self.steps_per_epoch, metrics))
    self._append_history(HISTORY_FILE, {"step": step, "epoch": step / self.steps_per_epoch,
                                        **metrics})

  def _append_history(self, name: str, record: dict) -> None:
    self._histories[name].append(record)  # written by the chief; see workdir.JsonlHistory

  def _results(self, state, wall_time, start, workdir, *, preempted):
    step = int(jax.device_get(state.step))
    history = self._histories[HISTORY_FILE].records
    results = {"step": step, "num_steps": self.num_steps, "finished": step >= self.num_steps,
               "history": history,
               # Stopped by SIGTERM before the end, its step checkpointed: rerun to continue
               # (main.py exits with PREEMPTED_EXIT_CODE).
               "preempted": preempted,
               "wall_time_s": wall_time, "steps_this_run": step - start,
               "devices": self.mesh.size, "processes": jax.process_count(),
               "dataset": self.config.data.name, "model": self.config.model.name,
               "method": self.built.method.name, "variant": self.config.objective.variant,
               # Wall time per training step after the first (compiling) one, evaluations and
               # checkpoints excluded, input pipeline included; None if too few steps ran.
               "train_step_time_s": self.train_step_time_s,
               "calibration": self.last_calibration}
    if history:
      final = history[-1]
      best = max(history, key=lambda h: h["eval/top1/backbone"])
      results.update(
          final=final, best_backbone_top1=best["eval/top1/backbone"], best_step=best["step"],
          best_max_over_heads_reference_protocol=max(
              h["eval/top1_max_over_heads_reference_protocol"] for h in history))
    if self.is_chief:
      workdir_lib.write_json(workdir / RESULTS_FILE, results)
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the results
  (also written to `<workdir>/results.json`).

  First, before any data is loaded or anything compiled, `preflight.check_run` fails fast
  (`preflight.PreflightError`, one line) on an unknown config field, a workdir that cannot be
  written, or a dataset that needs a download on a machine that is offline.
  """
  preflight.check_run(config, workdir)
  return Trainer(config, workdir).run()
