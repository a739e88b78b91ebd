"""`train_and_evaluate(config, workdir)`: the whole run, importable from tests and notebooks."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from mixskd_jax import data
from mixskd_jax.models import compiler_options
from mixskd_jax.models.registry import build_model_from_config
from mixskd_jax.train import distributed, sharding, steps
from mixskd_jax.train.checkpoint import Checkpoints
from mixskd_jax.train.methods import build_method, check_config as check_method_config
from mixskd_jax.train.optimizer import build_optimizer
from mixskd_jax.train.state import TrainState

HISTORY_FILE = "eval_history.jsonl"
TRAIN_HISTORY_FILE = "train_history.jsonl"  # the logged means of the train metrics
RESULTS_FILE = "results.json"


class _Preemption:
  """Turns SIGTERM into a flag the loop checks, so the run saves before it exits."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. some notebook kernels): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


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


def _write_json(path: str, obj: Any) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


class Trainer:
  """Everything a run is built from; `run()` trains, evaluates and writes results."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    distributed.maybe_initialize(config.distributed)
    check_method_config(config)  # before any data is loaded
    self.config, self.workdir = config, workdir
    self.is_chief = jax.process_index() == 0
    self.info = data.get_dataset_info(config.data)
    self.mesh = sharding.make_mesh()
    sharding.check_divisible(config.batch_size, self.mesh, "batch_size")
    sharding.check_divisible(config.eval_batch_size, self.mesh, "eval_batch_size")
    self.steps_per_epoch = data.steps_per_epoch(config)
    self.num_steps = (config.num_train_steps if config.num_train_steps > 0
                      else config.num_epochs * self.steps_per_epoch)
    self.model = build_model_from_config(config.model, self.info.num_classes)
    shards = config.objective.mix_shards if config.objective.mix_shards > 0 else self.mesh.size
    # The schedule spans whole epochs even when num_train_steps ends mid-epoch.
    self.num_epochs = max(config.num_epochs, math.ceil(self.num_steps / self.steps_per_epoch))
    self.method = build_method(config, num_shards=shards, steps_per_epoch=self.steps_per_epoch,
                               num_epochs=self.num_epochs)
    self.root_key, init_key = jax.random.split(jax.random.key(config.seed))
    self.state, self.tx, self.schedule = self._init_state(init_key)
    # Filled by run(): the measured step time and the latest evaluation's reliability bins.
    self.train_step_time_s = None
    self.last_calibration = None
    self._compile()

  def _init_state(self, key):
    repl = sharding.replicated(self.mesh)
    dummy = jnp.zeros((1,) + tuple(self.info.image_shape), jnp.float32)
    variables = jax.jit(self.model.init, out_shardings=repl)(key, dummy)
    tx, schedule = build_optimizer(self.config, steps_per_epoch=self.steps_per_epoch,
                                   num_epochs=self.num_epochs,
                                   partition=self.method.partition(variables["params"]))
    init_method_state = functools.partial(self.method.init_state, self.info.num_train,
                                          self.info.num_classes)
    state = jax.jit(lambda v: TrainState.create(v, tx, init_method_state()),
                    out_shardings=repl)(variables)
    return state, tx, schedule

  def _compile(self):
    repl, batch = sharding.replicated(self.mesh), sharding.data_sharding(self.mesh)
    common = dict(model=self.model, mean=self.info.mean, std=self.info.std)
    self.train_step = jax.jit(
        functools.partial(steps.train_step, method=self.method, tx=self.tx,
                          schedule=self.schedule, **common),
        in_shardings=(repl, batch, repl), out_shardings=(repl, repl), donate_argnums=(0,),
        compiler_options=compiler_options(self.config.model) or None)
    self.eval_step = jax.jit(functools.partial(
        steps.eval_step, calibration_bins=self.config.eval_calibration_bins, **common),
                             in_shardings=(repl, batch), out_shardings=repl)

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
    os.makedirs(self.workdir, exist_ok=True)
    checkpoints = Checkpoints(self.workdir, keep=self.config.keep_checkpoints)
    state = checkpoints.restore_or_keep(self.state)
    start = int(jax.device_get(state.step))
    writer = metric_writers.create_default_writer(self.workdir, just_logging=not self.is_chief)
    if self.is_chief:
      _write_json(os.path.join(self.workdir, "config.json"), self.config.to_dict())
    logging.info("Training %s steps (%s per epoch) from step %s on %s device(s), %s process(es).",
                 self.num_steps, self.steps_per_epoch, start, self.mesh.size, jax.process_count())
    t0 = time.time()
    try:
      state = self._train(state, start, checkpoints, writer)
    finally:
      writer.flush()
      checkpoints.close()
    self.state = state  # the final state, for notebooks and tests
    return self._results(state, time.time() - t0, start)

  def _train(self, state, start, checkpoints, writer):
    cfg = self.config
    batches = data.train_iterator(cfg, start_step=start, process_index=jax.process_index(),
                                  process_count=jax.process_count())
    batch_sharding = sharding.data_sharding(self.mesh)
    progress = periodic_actions.ReportProgress(num_train_steps=self.num_steps, writer=writer,
                                               every_steps=cfg.log_every_steps)
    buffer, buffer_start = [], start
    timer = _StepTimer()
    done = start  # stays so when the checkpoint is already at num_steps
    with _Preemption() as preemption:
      for step in range(start, self.num_steps):
        state, metrics = self.train_step(state, sharding.to_global(next(batches), batch_sharding),
                                         self.root_key)
        buffer.append(metrics)
        done = step + 1
        if step == start:
          timer.start(state)  # after the first step, which includes compilation
        progress(done)
        stop = preemption.requested or checkpoints.reached_preemption(done)
        last = done == self.num_steps
        if done % cfg.log_every_steps == 0 or last or stop or done % cfg.checkpoint_every_steps == 0:
          _check_finite(buffer, buffer_start)
          means = jax.tree_util.tree_map(lambda *xs: float(np.mean(xs)), *jax.device_get(buffer))
          writer.write_scalars(done, means)
          self._append_history(TRAIN_HISTORY_FILE, {"step": done, **means})
          buffer, buffer_start = [], done
        if done % self.steps_per_epoch == 0 and (done // self.steps_per_epoch) % cfg.eval_every_epochs == 0 or last:
          with timer.excluded(state):
            self._record_eval(state, done, writer)
        if done % cfg.checkpoint_every_steps == 0 or last or stop:
          with timer.excluded(state):
            checkpoints.save(done, state)
        if stop:
          logging.warning("Preempted at step %s: checkpoint saved, exiting.", done)
          break
    self.train_step_time_s = timer.stop(state, steps=done - start - 1)
    return state

  def _record_eval(self, state, step, writer):
    metrics = self.evaluate(state)
    writer.write_scalars(step, metrics)
    logging.info("step %s: %s", step, {k: round(v, 3) for k, v in metrics.items()})
    self._append_history(HISTORY_FILE, {"step": step, "epoch": step / self.steps_per_epoch,
                                        **metrics})

  def _append_history(self, name: str, record: dict) -> None:
    if self.is_chief:
      with open(os.path.join(self.workdir, name), "a") as f:
        f.write(json.dumps(record) + "\n")

  def _results(self, state, wall_time, start):
    step = int(jax.device_get(state.step))
    history = []
    path = os.path.join(self.workdir, HISTORY_FILE)
    if os.path.exists(path):
      with open(path) as f:
        history = [json.loads(line) for line in f if line.strip()]
    results = {"step": step, "finished": step >= self.num_steps, "history": history,
               "wall_time_s": wall_time, "steps_this_run": step - start,
               "devices": self.mesh.size, "processes": jax.process_count(),
               "dataset": self.config.data.name, "model": self.config.model.name,
               "method": self.method.name, "variant": self.config.objective.variant,
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
      _write_json(os.path.join(self.workdir, RESULTS_FILE), results)
    return results


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the results
  (also written to `<workdir>/results.json`)."""
  return Trainer(config, workdir).run()
