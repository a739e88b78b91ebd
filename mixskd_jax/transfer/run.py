"""One backbone through the fair transfer protocol: `run_transfer(config, workdir) -> results`.

Each task's result is written to `<workdir>/<task>.json` as soon as it is known, and a task
whose file exists is not run again, so an interrupted evaluation resumes with the next task.
`<workdir>/diagnostics.json` holds the backbone's weight norms, BatchNorm statistics and
feature scale; `<workdir>/results.json` everything together.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Callable

import ml_collections

from mixskd_jax.interop import pretrained
from mixskd_jax.transfer import classification, diagnostics, protocol, scenes, sweep, tasks
from mixskd_jax.transfer import data as data_lib
from mixskd_jax.transfer.config import TASKS

RESULTS_FILE = "results.json"
DIAGNOSTICS_FILE = "diagnostics.json"


class TransferConfigError(ValueError):
  """A transfer config field is out of range; the message names it and the fix."""


def _positive(value, field: str, *, integer: bool = True) -> None:
  ok = (isinstance(value, int) and not isinstance(value, bool)) if integer else isinstance(
      value, (int, float)) and not isinstance(value, bool)
  if not ok or not value > 0 or (not integer and not math.isfinite(value)):
    kind = "a positive integer" if integer else "a positive number"
    raise TransferConfigError(f"config.{field}={value!r} must be {kind}.")


def _recipe(config: ml_collections.ConfigDict, field: str) -> sweep.Recipe:
  r = config[field].recipe
  for name in ("epochs", "batch_size"):
    _positive(r[name], f"{field}.recipe.{name}")
  if not isinstance(r.warmup_epochs, int) or not 0 <= r.warmup_epochs <= r.epochs:
    raise TransferConfigError(f"config.{field}.recipe.warmup_epochs={r.warmup_epochs!r} must "
                              f"be an integer in 0..epochs ({r.epochs}).")
  if not 0 <= r.momentum < 1 or not r.weight_decay >= 0:
    raise TransferConfigError(f"config.{field}.recipe: momentum must be in [0, 1) and "
                              f"weight_decay >= 0; got {r.momentum}, {r.weight_decay}.")
  return sweep.Recipe(epochs=r.epochs, batch_size=r.batch_size, warmup_epochs=r.warmup_epochs,
                      schedule=r.schedule, momentum=float(r.momentum), nesterov=bool(r.nesterov),
                      weight_decay=float(r.weight_decay))


def _bn_modes(config: ml_collections.ConfigDict, field: str, allowed: tuple) -> tuple:
  modes = tuple(config[field].bn_modes)
  if not modes or set(modes) - set(allowed) or len(set(modes)) != len(modes):
    raise TransferConfigError(f"config.{field}.bn_modes={modes!r} must name one or more of "
                              f"{allowed}, each once.")
  return modes


def build_tasks(config: ml_collections.ConfigDict) -> dict[str, tuple[object, tuple]]:
  """config -> {task name: (task, its BatchNorm modes)} for `config.tasks`, checked."""
  names = tuple(config.tasks)
  if not names or set(names) - set(TASKS):
    raise TransferConfigError(f"config.tasks={names!r} must name one or more of {TASKS}.")
  for name in names:
    rates = tuple(config[name].learning_rates)
    if not rates:
      raise TransferConfigError(f"config.{name}.learning_rates is empty; give at least one.")
    for i, lr in enumerate(rates):
      _positive(lr, f"{name}.learning_rates[{i}]", integer=False)
  _positive(config.seed + 1, "seed (must be >= 0)")
  out = {}
  if "linear_probe" in names:
    out["linear_probe"] = (tasks.LinearProbe(_recipe(config, "linear_probe")),
                           _bn_modes(config, "linear_probe", classification.FROZEN_BN_MODES))
  if "fine_tune" in names:
    out["fine_tune"] = (tasks.FineTune(_recipe(config, "fine_tune")),
                        _bn_modes(config, "fine_tune", classification.BN_MODES))
  if "segmentation" in names:
    s = config.segmentation
    allowed = (classification.FROZEN_BN_MODES if s.frozen_backbone
               else classification.BN_MODES)
    try:
      spec = scenes.SceneSpec(size=s.canvas_size, min_items=s.min_items, max_items=s.max_items,
                              min_scale=s.min_scale, max_scale=s.max_scale,
                              foreground_threshold=s.foreground_threshold)
    except ValueError as e:
      raise TransferConfigError(f"config.segmentation: {e}") from None
    for name in ("train_canvases", "validation_canvases", "test_canvases", "decoder_width"):
      _positive(s[name], f"segmentation.{name}")
    canvases = {"train": s.train_canvases, "validation": s.validation_canvases,
                "test": s.test_canvases}
    out["segmentation"] = (tasks.Segmentation(_recipe(config, "segmentation"), spec, canvases,
                                              s.decoder_width, bool(s.frozen_backbone)),
                           _bn_modes(config, "segmentation", allowed))
  return out


def _write_json(path: str, value) -> None:
  with open(path + ".tmp", "w") as f:
    json.dump(value, f, indent=2)
  os.replace(path + ".tmp", path)


def _read_json(path: str):
  with open(path) as f:
    return json.load(f)


def run_transfer(config: ml_collections.ConfigDict, workdir: str,
                 log: Callable[[str], None] = print) -> dict:
  """Evaluates `config.init_from.path`'s backbone on every task of `config.tasks`.

  Raises:
    TransferConfigError: a config field out of range (before anything is loaded).
    pretrained.PretrainedError: no readable backbone at `init_from.path`, or one that does not
      fit the downstream data (one line each).
  """
  if not config.init_from.path:
    raise TransferConfigError("config.init_from.path is not set; pass the pre-trained run's "
                              "workdir (--init_from=DIR).")
  task_specs = build_tasks(config)
  trained = pretrained.load_trained(config.init_from.path)
  os.makedirs(workdir, exist_ok=True)
  downstream = data_lib.load(config.data)
  source = tasks.Source(trained, downstream, seed=config.seed, chunk=config.inference_chunk)
  results = {"source": trained.source, "model": trained.model_name, "seed": config.seed,
             "tasks": {}}
  path = os.path.join(workdir, DIAGNOSTICS_FILE)
  if not os.path.exists(path):
    _write_json(path, diagnostics.diagnose(source))
  results["diagnostics"] = _read_json(path)
  for name, (task, bn_modes) in task_specs.items():
    path = os.path.join(workdir, f"{name}.json")
    if not os.path.exists(path):
      log(f"{name} of {trained.source}:")
      t0 = time.time()
      result = protocol.evaluate(task, source, bn_modes=bn_modes,
                                 learning_rates=config[name].learning_rates, log=log)
      result["wall_time_s"] = time.time() - t0
      _write_json(path, result)
    results["tasks"][name] = _read_json(path)
  _write_json(os.path.join(workdir, RESULTS_FILE), results)
  return results


def summary_line(results: dict) -> str:
  """One line: every task's chosen setting and test metric."""
  parts = [f"{name} {r['metric']} {r['test_metric']:.2f} (bn {r['chosen']['bn']}, "
           f"lr {r['chosen']['lr']:g})" for name, r in results["tasks"].items()]
  return "; ".join(parts)

