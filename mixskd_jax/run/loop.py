"""`train_and_evaluate(config, workdir)`: the whole run, importable from tests and notebooks."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers

from mixskd_jax import data
from mixskd_jax.interop import pretrained
from mixskd_jax.run import data_fault, distributed, evaluation, preflight, run_guard
from mixskd_jax.run.data_prep import prepare_data
from mixskd_jax.run.divergence import DivergenceGuard, parameter_norm
from mixskd_jax.run.evaluation import TRAIN_SET_PREFIX
from mixskd_jax.run.preemption import PREEMPTED_EXIT_CODE, Preemption
from mixskd_jax.run.progress import ProgressReporter, format_eval
from mixskd_jax.run.results import RESULTS_FILE, results_record
from mixskd_jax.run.step_timer import StepTimer
from mixskd_jax.store import workdir as workdir_lib
from mixskd_jax.store.checkpoint import Checkpoints, has_checkpoints
from mixskd_jax.train import builder, layout, sharding
from mixskd_jax.train.device_prefetch import prefetch_to_device
from mixskd_jax.train.state import TrainState

HISTORY_FILE = "eval_history.jsonl"
TRAIN_HISTORY_FILE = "train_history.jsonl"  # the logged means of the train metrics


@dataclasses.dataclass
class _Reporting:
  """What the training loop logs, guards, times and saves through, and the metrics of the
  steps not logged yet (`buffer`, from step `buffer_start`)."""
  progress: ProgressReporter
  guard: DivergenceGuard
  timer: StepTimer
  checkpoints: Checkpoints
  writer: Any
  buffer_start: int
  buffer: list = dataclasses.field(default_factory=list)


class Trainer:
  """Everything a run is built from; `run()` trains, evaluates and writes results."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    # Before any data is loaded (the config is checked: `train_and_evaluate`): the workdir's
    # owner and its config.
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

  def evaluate(self, state: TrainState) -> dict[str, float]:
    """Every test example exactly once (`evaluation.evaluate`)."""
    metrics, self.last_calibration = evaluation.evaluate(self.config, self.mesh,
                                                         self.eval_step, state)
    return metrics

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
    # TensorBoard from the chief alone, written in a background thread; the terminal has the
    # progress and evaluation lines. A string: TensorBoard's writer reads gs:// itself,
    # through TensorFlow's file systems.
    writer = (metric_writers.AsyncMultiWriter([metric_writers.SummaryWriter(str(workdir))])
              if self.is_chief else metric_writers.MultiWriter([]))
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
    if self.is_chief and self._config_start is not None:
      run_guard.write_config(self.workdir, self.config, self._config_start)
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
    run = _Reporting(
        progress=ProgressReporter(self.num_steps, every_steps=cfg.log_every_steps,
                                  writer=writer),
        guard=DivergenceGuard(cfg.max_param_norm_ratio,
                              reference_norm=float(parameter_norm(state.params)),
                              reference_step=start),
        timer=StepTimer(), checkpoints=checkpoints, writer=writer, buffer_start=start)
    done = start  # stays so when the checkpoint is already at num_steps
    preempted = False
    t_first = time.perf_counter()
    with Preemption(start) as preemption:
      for step in range(start, self.num_steps):
        try:
          batch = next(batches)
        except Exception as e:  # pylint: disable=broad-except  (only damaged data: below)
          raise self._saved_for_fault(e, state, done, run) from None
        state, metrics = self.train_step(state, batch, self.root_key)
        run.buffer.append(metrics)
        done = step + 1
        if step == start:
          run.timer.start(state)  # after the first step, which includes compilation
          run.progress.start(done)
          logging.info("Compiled and ran the first step in %.1f s.", time.perf_counter() - t_first)
        stop = preemption.should_stop(done)  # the same step in every process
        last = done == self.num_steps
        self._after_step(state, done, run,
                         save=done % cfg.checkpoint_every_steps == 0 or last or stop)
        if stop and not last:  # stopped at the last step, the run is simply finished
          preempted = True
          logging.warning("Preempted at step %s: checkpoint saved; exiting with status %s, "
                          "the same command resumes.", done, PREEMPTED_EXIT_CODE)
          break
    self.train_step_time_s = run.timer.stop(state, steps=done - start - 1)
    return state, preempted

  def _after_step(self, state, done: int, run: _Reporting, *, save: bool) -> None:
    """Logs (and guards) the buffered metrics when due, then checkpoints and evaluates."""
    norm, means = None, {}
    if done % self.config.log_every_steps == 0 or save:
      host = jax.device_get(run.buffer)
      run.guard.check_metrics(host, run.buffer_start, run.checkpoints.latest_step())
      # The state about to be logged and saved: finite, and not blown up (divergence.py).
      norm = float(parameter_norm(state.params))
      run.guard.check_params(norm, done, run.checkpoints.latest_step())
      means = jax.tree_util.tree_map(lambda *xs: float(np.mean(xs)), *host)
      run.writer.write_scalars(done, means)
      self._append_history(TRAIN_HISTORY_FILE, {"step": done, **means})
      run.buffer, run.buffer_start = [], done
      run.progress.report(done, means)  # the means waited for the steps: the time is theirs
    elif run.progress.due(done) and run.buffer:  # a line at least every minute on slow runs
      run.progress.report(done, jax.tree_util.tree_map(
          lambda *xs: float(np.mean(xs)), *jax.device_get(run.buffer)))
    # The checkpoint before the evaluation: an evaluation that fails (or is killed) then
    # loses no training; the run resuming from this step evaluates it first (above).
    if save:
      with run.timer.excluded(state), run.progress.excluded():
        run.checkpoints.save(done, state, param_norm=norm, loss=means.get("train/loss"))
        run.guard.accept(norm, done)
        self._write_config()
        for history in self._histories.values():  # a history is as durable as its step
          history.flush()
    if self._is_eval_step(done):
      with run.timer.excluded(state), run.progress.excluded():
        try:
          self._record_eval(state, done, run.writer)
        except Exception as e:  # pylint: disable=broad-except  (only damaged data: below)
          raise self._saved_for_fault(e, state, done, run) from None

  def _saved_for_fault(self, error: Exception, state, done: int, run: _Reporting) -> Exception:
    """`error`, or for damaged data the one-line fault after saving step `done` (data_fault)."""
    def save():
      with run.timer.excluded(state), run.progress.excluded():
        run.checkpoints.save(done, state, param_norm=float(parameter_norm(state.params)))
        self._write_config()
    return data_fault.saved_for_fault(error, self.config.data, done, save=save,
                                      saved=run.checkpoints.latest_step() == done,
                                      histories=self._histories.values())

  def _record_eval(self, state, step, writer):
    metrics = self.evaluate(state)
    logging.info("%s", format_eval(step, step / self.steps_per_epoch, metrics))
    if self.config.get("eval_on_train_set", False):
      metrics.update(evaluation.evaluate_train_set(self.config, self.mesh, self.eval_step,
                                                   state))
      logging.info("train set at step %s: top-1 backbone %.2f%%  |  loss %.4g", step,
                   metrics[TRAIN_SET_PREFIX + "top1/backbone"], metrics[TRAIN_SET_PREFIX + "loss"])
    writer.write_scalars(step, metrics)
    self._append_history(HISTORY_FILE, {"step": step, "epoch": step / self.steps_per_epoch,
                                        **metrics})

  def _append_history(self, name: str, record: dict) -> None:
    self._histories[name].append(record)  # written by the chief; see workdir.JsonlHistory

  def _results(self, state, wall_time, start, workdir, *, preempted):
    results = results_record(
        history=self._histories[HISTORY_FILE].records, step=int(jax.device_get(state.step)),
        num_steps=self.num_steps, start=start, preempted=preempted, wall_time=wall_time,
        devices=self.mesh.size, config=self.config, method=self.built.method.name,
        train_step_time_s=self.train_step_time_s, calibration=self.last_calibration)
    if self.is_chief:
      workdir_lib.write_json(workdir / RESULTS_FILE, results)
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the results
  (also written to `<workdir>/results.json`).

  First, before any data is loaded or anything compiled, `preflight.check_run` fails fast
  (`PreflightError`, one line): the config through its one door (`mixskd_jax.config.validate`),
  a workdir that cannot be written, a dataset that needs a download on a machine that is
  offline. `python -m mixskd_jax.main` runs those checks itself, before JAX is imported, then
  calls `train_checked`.
  """
  preflight.check_run(config, workdir)
  return train_checked(config, workdir)


def train_checked(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """`train_and_evaluate` for a config and workdir that `preflight.check_run` has passed."""
  return Trainer(config, workdir).run()
