"""`train_and_evaluate(config, workdir)`: the whole run, importable from tests and notebooks."""

from __future__ import annotations

import contextlib
import json
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers

from mixskd_jax import config_schema, data
from mixskd_jax.train import (builder, distributed, layout, preflight, pretrained, run_guard,
                              sharding, steps)
from mixskd_jax.train import workdir as workdir_lib
from mixskd_jax.train.checkpoint import Checkpoints, has_checkpoints
from mixskd_jax.train.divergence import DivergenceGuard, parameter_norm
from mixskd_jax.train.data_prep import prepare_data
from mixskd_jax.train.device_prefetch import prefetch_to_device
from mixskd_jax.train.methods import check_config as check_method_config
from mixskd_jax.train.preemption import PREEMPTED_EXIT_CODE, Preemption
from mixskd_jax.train.progress import ProgressReporter, format_eval
from mixskd_jax.train.state import TrainState

HISTORY_FILE = "eval_history.jsonl"
TRAIN_HISTORY_FILE = "train_history.jsonl"  # the logged means of the train metrics
RESULTS_FILE = "results.json"
TRAIN_SET_PREFIX = "train_set/"  # config.eval_on_train_set's keys in the eval history


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
    # Before any data is loaded: bad values, then the workdir's owner and its config.
    config_schema.validate(config)
    check_method_config(config)
    distributed.maybe_initialize(config.distributed)
    self.mesh = sharding.make_mesh()
    # Batch sizes, mix and BatchNorm groups and the learning rate for these devices.
    config = layout.resolve(config, self.mesh.size)
    self.config, self.workdir = config, workdir
    self.is_chief = jax.process_index() == 0
    self._lock = run_guard.WorkdirLock(workdir, enabled=self.is_chief)
    self._lock.check()  # held by run(); refused here already, before any data is loaded
    resuming = has_checkpoints(workdir)
    run_guard.check_resume(workdir, config, has_checkpoints=resuming)
    # Only a fresh run starts from another model (read before any data is loaded, so a bad
    # path fails at once): a resumed one continues from its own checkpoint.
    init_from = config.get("init_from")
    self._init_from = (pretrained.load_trained(init_from.path)
                       if init_from is not None and init_from.path is not None and not resuming
                       else None)
    self._build(config)

  def _build(self, config: ml_collections.ConfigDict) -> None:
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
    if self._init_from is not None:
      self.state = self._initialized_from(self._init_from, config.init_from.keep_head)
      self._init_from = None  # the arrays are in the state now
    # Filled by run(): the measured step time, the latest evaluation's reliability bins and
    # the run's eval and train histories.
    self.train_step_time_s = None
    self.last_calibration = None
    self._histories: dict[str, workdir_lib.JsonlHistory] = {}
    self._config_start = None  # set by run(); None once config.json is written

  def _initialized_from(self, trained: pretrained.Trained, keep_head: bool) -> TrainState:
    """The fresh state with its backbone taken from `trained` (pretrained.transfer) and a
    fresh optimizer state, replicated like `built.init_state`'s."""
    variables, what = pretrained.transfer(
        jax.device_get(self.state.variables), trained, mixskd=bool(self.config.model.mixskd),
        model_name=self.config.model.name, keep_head=bool(keep_head))
    logging.info("%s", what)
    return self.built.state_from(variables)

  def _eval_sums(self, state: TrainState, iterator) -> dict[str, Any]:
    """eval_step's sums over every batch of `iterator` (padded, masked), on the host."""
    batch_sharding = sharding.data_sharding(self.mesh)
    totals = None
    for local in iterator:
      sums = self.eval_step(state, sharding.to_global(local, batch_sharding))
      totals = sums if totals is None else jax.tree_util.tree_map(jnp.add, totals, sums)
    return jax.device_get(totals)

  def evaluate(self, state: TrainState) -> dict[str, float]:
    """Every test example exactly once (the last batch padded and masked)."""
    totals = self._eval_sums(state, data.eval_iterator(
        self.config, process_index=jax.process_index(), process_count=jax.process_count()))
    # The backbone's reliability diagram of the latest evaluation, for results.json.
    self.last_calibration = {k.split("/", 1)[1]: np.asarray(v).tolist()
                             for k, v in totals.items() if k.startswith("calibration/")}
    return steps.summarize_eval(totals)

  def evaluate_train_set(self, state: TrainState) -> dict[str, float]:
    """`evaluate` on the training examples the run trains on (unaugmented, each once), its
    keys under `train_set/` instead of `eval/` (`config.eval_on_train_set`)."""
    totals = self._eval_sums(state, data.train_eval_iterator(
        self.config, process_index=jax.process_index(), process_count=jax.process_count()))
    return {TRAIN_SET_PREFIX + key.split("/", 1)[1]: value
            for key, value in steps.summarize_eval(totals).items()}

  def run(self) -> dict[str, Any]:
    # Every file of the run goes through epath, so gs://bucket/run works like a local path.
    workdir = workdir_lib.resolve(self.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    self._lock.acquire()
    try:
      checkpoints = Checkpoints(workdir, keep=self.config.keep_checkpoints)
      state = checkpoints.restore_or_keep(self.state)
    except BaseException:
      self._lock.release()
      raise
    start = int(jax.device_get(state.step))
    # Every process keeps the records (its results.json is the chief's); the chief writes.
    self._histories = {name: workdir_lib.JsonlHistory(workdir / name, writer=self.is_chief,
                                                      resume_step=start)
                       for name in (HISTORY_FILE, TRAIN_HISTORY_FILE)}
    # A string: TensorBoard's writer reads gs:// itself, through TensorFlow's file systems.
    writer = metric_writers.create_default_writer(str(workdir), just_logging=not self.is_chief)
    # config.json describes the newest checkpoint: a resumed run replaces it at its first
    # save (a run that diverges or fails before one leaves the config that wrote them).
    self._config_start = start
    if start == 0:
      self._write_config()
    logging.info("Training %s steps (%s per epoch) from step %s on %s device(s), %s process(es).",
                 self.num_steps, self.steps_per_epoch, start, self.mesh.size, jax.process_count())
    t0 = time.time()
    try:
      state, preempted = self._train(state, start, checkpoints, writer)
    finally:
      try:
        writer.flush()
        for history in self._histories.values():
          history.flush()
        checkpoints.close()
      finally:
        self._lock.release()
    self.state = state  # the final state, for notebooks and tests
    return self._results(state, time.time() - t0, start, workdir, preempted=preempted)

  def _write_config(self) -> None:
    """Writes config.json, keeping a changed previous one as config.until_step_<start>.json."""
    if not self.is_chief or self._config_start is None:
      return
    workdir = workdir_lib.resolve(self.workdir)
    config_file = workdir / run_guard.CONFIG_FILE
    current = self.config.to_dict()
    if self._config_start > 0 and config_file.exists():
      old = config_file.read_text()
      if json.loads(old) != json.loads(json.dumps(current)):
        workdir_lib.write_text_atomically(
            workdir / f"config.until_step_{self._config_start}.json", old)
    workdir_lib.write_json(config_file, current)
    self._config_start = None  # written

  def _is_eval_step(self, step: int) -> bool:
    epoch, rest = divmod(step, self.steps_per_epoch)
    return step == self.num_steps or (rest == 0 and epoch % self.config.eval_every_epochs == 0)

  def _train(self, state, start, checkpoints, writer):
    cfg = self.config
    # An evaluation due at the step the run resumes from, that the run which saved it did not
    # record (killed between its checkpoint and its evaluation; see below): done first.
    if start > 0 and self._is_eval_step(start) and not any(
        r["step"] == start for r in self._histories[HISTORY_FILE].records):
      self._record_eval(state, start, writer)
    batches = prefetch_to_device(
        data.train_iterator(cfg, start_step=start, process_index=jax.process_index(),
                            process_count=jax.process_count()),
        sharding.data_sharding(self.mesh), cfg.data.device_prefetch)
    progress = ProgressReporter(self.num_steps, every_steps=cfg.log_every_steps, writer=writer)
    guard = DivergenceGuard(cfg.max_param_norm_ratio,
                            reference_norm=float(parameter_norm(state.params)),
                            reference_step=start)
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
        save = done % cfg.checkpoint_every_steps == 0 or last or stop
        if done % cfg.log_every_steps == 0 or save:
          host = jax.device_get(buffer)
          guard.check_metrics(host, buffer_start, checkpoints.latest_step())
          # The state about to be logged and saved: finite, and not blown up (divergence.py).
          norm = float(parameter_norm(state.params))
          guard.check_params(norm, done, checkpoints.latest_step())
          means = jax.tree_util.tree_map(lambda *xs: float(np.mean(xs)), *host)
          writer.write_scalars(done, means)
          self._append_history(TRAIN_HISTORY_FILE, {"step": done, **means})
          buffer, buffer_start = [], done
          progress.report(done, means)  # the means waited for the steps: the time is theirs
        elif progress.due(done) and buffer:  # a line at least every minute on slow runs
          progress.report(done, jax.tree_util.tree_map(
              lambda *xs: float(np.mean(xs)), *jax.device_get(buffer)))
        # The checkpoint before the evaluation: an evaluation that fails (or is killed) then
        # loses no training; the run resuming from this step evaluates it first (above).
        if save:
          with timer.excluded(state), progress.excluded():
            checkpoints.save(done, state, param_norm=norm,
                             loss=means.get("train/loss"))
            guard.accept(norm, done)
            self._write_config()
            for history in self._histories.values():  # a history is as durable as its step
              history.flush()
        if self._is_eval_step(done):
          with timer.excluded(state), progress.excluded():
            self._record_eval(state, done, writer)
        if stop and not last:  # stopped at the last step, the run is simply finished
          preempted = True
          logging.warning("Preempted at step %s: checkpoint saved; exiting with status %s, "
                          "the same command resumes.", done, PREEMPTED_EXIT_CODE)
          break
    self.train_step_time_s = timer.stop(state, steps=done - start - 1)
    return state, preempted

  def _record_eval(self, state, step, writer):
    metrics = self.evaluate(state)
    logging.info("%s", format_eval(step, step / self.steps_per_epoch, metrics))
    if self.config.get("eval_on_train_set", False):
      metrics.update(self.evaluate_train_set(state))
      logging.info("train set at step %s: top-1 backbone %.2f%%  |  loss %.4g", step,
                   metrics[TRAIN_SET_PREFIX + "top1/backbone"], metrics[TRAIN_SET_PREFIX + "loss"])
    writer.write_scalars(step, metrics)
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
