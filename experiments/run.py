r"""Trains every run of a suite (method x seed, then the ablations) and writes its report.

  python -m experiments.run --suite=fashion_mnist

Resumable: a finished run (its `results.json` says so) is not run again; an interrupted one
continues from its latest checkpoint (same data order, same mixup draws). Re-running the
command after everything finished only rewrites the report. SIGTERM (a preemption, or the
first Ctrl-C) during a run saves that run's step and ends the command with status 75. Runs share one process and a
persistent XLA compilation cache, so seeds 2 and 3 of a method do not compile again.

Then every main-table method's train step is timed back to back (`--time_steps`; kept in
`<workdir>/step_timing.json`): the cost column compares methods measured in one window.

Outputs: `--workdir` (default experiments/runs/<suite>, ignored by git) holds one trainer
workdir per run, `<method>/seed<k>/`; `--results_dir` receives the tables, plots and the record
of the command, versions, machine and wall time (see experiments/report.py). Its default: for
the suites whose reports are committed (COMMITTED_SUITES) experiments/results/<suite>; for the
others (smoke, cifar100) `<workdir>/report`, inside the ignored runs folder.

The terminal shows each run's progress and evaluation lines (as `python -m mixskd_jax.main`),
one summary line per finished run, and where the report went. A bad flag or config field, an
unwritable folder or an offline machine without the dataset ends the command at once with one
line on stderr and exit status 2.

Paper scale, for machines with accelerators (data from tfds; any config field with --set):

  python -m experiments.run --suite=cifar100 --set=data.data_dir=/data/tfds
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Sequence

from absl import app, flags, logging

if __name__ == "__main__":  # before anything imports TensorFlow (clu, tfds): a quiet start-up
  from mixskd_jax.run import progress as _progress
  _progress.quiet_tensorflow_startup()

# pylint: disable=wrong-import-position
from experiments import protocol, report, timing, transfer_fair
from experiments.overrides import apply_override
from mixskd_jax.run import preflight, progress
from mixskd_jax.run.preemption import PREEMPTED_EXIT_CODE
# pylint: enable=wrong-import-position

_SUITE = flags.DEFINE_string("suite", "fashion_mnist", f"one of {sorted(protocol.SUITES)}")
_WORKDIR = flags.DEFINE_string("workdir", None, "runs go here (default experiments/runs/<suite>)")
_RESULTS = flags.DEFINE_string(
    "results_dir", None, "report goes here (default experiments/results/<suite> for the "
    "committed suites, else <workdir>/report)")
_SEEDS = flags.DEFINE_list("seeds", None, "override the suite's seeds, e.g. 0,1,2")
_METHODS = flags.DEFINE_list("methods", None, "only these rows (names from protocol.py)")
_ABLATIONS = flags.DEFINE_bool("ablations", True, "also train the MixSKD ablations")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "train nothing; rewrite the report")
_SET = flags.DEFINE_multi_string("set", [], "config override for every run: dotted.field=value")
_TIME_STEPS = flags.DEFINE_integer(
    "time_steps", 30, "after training, time this many steps of every method back to back "
    "(the table's cost column); 0 skips it")
_TIME_WARMUP = flags.DEFINE_integer("time_warmup", 3, "untimed steps before those")
_RETIME = flags.DEFINE_bool("retime", False, "measure the step times again")
_EVALUATE_ONLY = flags.DEFINE_bool(
    "evaluate_only", False, "transfer_fair suites: train nothing; run the transfer protocol on "
    "the pre-training runs that have finished (another command may still be training the rest)")
_TRANSFER_SET = flags.DEFINE_multi_string(
    "transfer_set", [], "transfer_fair suites: override of the transfer protocol's config "
    "(mixskd_jax/transfer/config.py) for every backbone: dotted.field=value")

TIMING_FILE = "experiment_timing.json"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Suites whose reports are committed under experiments/results/<suite>.
COMMITTED_SUITES = ("default", "fashion_mnist", "fashion_mnist_long", "fashion_mnist_converged",
                    "fashion_mnist_transfer", "fashion_mnist_transfer_fair")
USAGE_ERROR_EXIT_CODE = 2


def default_dirs(suite_name: str, workdir: str | None = None,
                 results_dir: str | None = None) -> tuple[str, str]:
  """(workdir, results_dir) of a suite: the runs under experiments/runs/<suite>; the report
  in experiments/results/<suite> for a committed suite, else in `<workdir>/report`."""
  workdir = workdir or os.path.join(REPO, "experiments", "runs", suite_name)
  if not results_dir:
    results_dir = (os.path.join(REPO, "experiments", "results", suite_name)
                   if suite_name in COMMITTED_SUITES else os.path.join(workdir, "report"))
  return workdir, results_dir


def is_finished(run_dir: str) -> bool:
  path = os.path.join(run_dir, "results.json")
  if not os.path.exists(path):
    return False
  with open(path) as f:
    return bool(json.load(f).get("finished"))


def record_invocation(run_dir: str, wall_time_s: float, results: dict) -> None:
  """Appends this invocation's wall time (compile, train, eval) to the run's timing record."""
  path = os.path.join(run_dir, TIMING_FILE)
  timing = {"invocations": []}
  if os.path.exists(path):
    with open(path) as f:
      timing = json.load(f)
  timing["invocations"].append({"finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                "wall_time_s": wall_time_s,
                                "steps": results.get("steps_this_run")})
  timing["wall_time_s"] = sum(i["wall_time_s"] for i in timing["invocations"])
  with open(path + ".tmp", "w") as f:
    json.dump(timing, f, indent=2)
  os.replace(path + ".tmp", path)


def enable_compilation_cache(directory: str) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_compilation_cache_dir", directory)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def selected_runs(suite: protocol.Suite, seeds: Sequence[str] | None,
                  methods: Sequence[str] | None, ablations: bool) -> list[protocol.Run]:
  if seeds:
    suite = dataclasses.replace(suite, seeds=tuple(int(s) for s in seeds))
  runs = protocol.suite_runs(suite, ablations=ablations)
  if methods:
    known = {r.spec.name for r in runs}
    unknown = set(methods) - known
    if unknown:
      raise ValueError(f"--methods names unknown rows {sorted(unknown)}; known: {sorted(known)}.")
    runs = [r for r in runs if r.spec.name in methods]
  return runs


def training_order(runs: Sequence[protocol.Run]) -> list[protocol.Run]:
  """Main table before ablations, and seed by seed within each (every method of seed 0, then
  of seed 1, ...): a suite stopped part-way has whole seeds, which the paired comparisons
  need, rather than some methods with every seed and others with none."""
  return sorted(runs, key=lambda r: (r.ablation, r.seed))  # stable: the table's row order


def train_all(runs: Sequence[protocol.Run], workdir: str) -> bool:
  """Trains every unfinished run in `training_order`; False when a run was preempted (SIGTERM:
  it saved its step), which ends the command, since the signal was meant for all of it."""
  from mixskd_jax.run.loop import train_and_evaluate  # pylint: disable=import-outside-toplevel
  runs = training_order(runs)
  for i, run in enumerate(runs):
    run_dir = os.path.join(workdir, run.name)
    if is_finished(run_dir):
      logging.info("[%d/%d] %s: finished earlier, skipped.", i + 1, len(runs), run.name)
      continue
    logging.info("[%d/%d] %s: training in %s", i + 1, len(runs), run.name, run_dir)
    t0 = time.time()
    results = train_and_evaluate(run.config, run_dir)
    record_invocation(run_dir, time.time() - t0, results)
    logging.info("[%d/%d] %s: %s", i + 1, len(runs), run.name, progress.one_line_summary(results))
    if results.get("preempted"):
      logging.warning("Stopped by a signal during %s (its step is saved); the same command "
                      "resumes it and the runs after it.", run.name)
      return False
  return True


def main(argv: Sequence[str]) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  progress.configure_console()
  try:
    suite = protocol.get_suite(_SUITE.value)
    workdir, results_dir = default_dirs(suite.name, _WORKDIR.value, _RESULTS.value)
    runs = selected_runs(suite, _SEEDS.value, _METHODS.value, _ABLATIONS.value)
    for run in runs:
      for assignment in _SET.value:
        apply_override(run.config, assignment)
      if run.spec.init_from_row:  # a transfer row: the same seed's pre-trained backbone
        run.config.init_from.path = os.path.join(workdir, run.spec.init_from_row,
                                                 f"seed{run.seed}")
    created = [] if _REPORT_ONLY.value else preflight.check_workdir(workdir)
  except (ValueError, preflight.PreflightError) as e:  # the command line: one line, status 2
    print(e, file=sys.stderr, flush=True)
    return USAGE_ERROR_EXIT_CODE
  t0 = time.time()
  if not _REPORT_ONLY.value:
    enable_compilation_cache(os.path.join(workdir, ".jax_cache"))
    try:
      completed = _EVALUATE_ONLY.value or train_all(runs, workdir)
      if completed and suite.kind == "transfer_fair":
        waiting = transfer_fair.evaluate_all(
            runs, workdir, is_finished=is_finished,
            overrides=suite.transfer_overrides + tuple(_TRANSFER_SET.value))
        if waiting:
          logging.warning("%d pre-training run(s) have not finished; their transfer rows are "
                          "left out.", waiting)
    except preflight.PreflightError as e:
      preflight.remove_if_empty(created)
      print(e, file=sys.stderr, flush=True)
      return USAGE_ERROR_EXIT_CODE
    if not completed:
      return PREEMPTED_EXIT_CODE
    if _TIME_STEPS.value > 0 and suite.kind == "comparison":
      logging.info("Timing %d steps of every main-table method back to back.", _TIME_STEPS.value)
      timing.time_methods(runs, workdir, steps=_TIME_STEPS.value, warmup=_TIME_WARMUP.value,
                          retime=_RETIME.value)
  command = " ".join(["python -m experiments.run"] + sys.argv[1:])
  wall_time = time.time() - t0
  previous = os.path.join(results_dir, "summary.json")
  if _REPORT_ONLY.value and os.path.exists(previous):
    # Re-rendering keeps the record of the invocation that produced the numbers.
    with open(previous) as f:
      summary = json.load(f)
    command, wall_time = summary["command"], summary["this_invocation_wall_time_s"]
  report.write_report(suite, runs, workdir, results_dir, command=command,
                      invocation_wall_time_s=wall_time)
  logging.info("Report written to %s", results_dir)
  return 0


if __name__ == "__main__":
  app.run(main)
