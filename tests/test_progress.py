"""The terminal's progress line (rate and ETA over a window, on a fake clock), the evaluation
line and final summary, the start-up noise filter, and the preflight checks run in-process."""

import logging as std_logging
import os

import pytest

from mixskd_jax import config as config_lib
from mixskd_jax.run import dataset_check, preflight, progress
from tests.training_configs import tiny_config


class FakeClock:

  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


def reporter(num_steps=1000, every_steps=10, **kwargs):
  clock, lines = FakeClock(), []
  r = progress.ProgressReporter(num_steps, every_steps=every_steps, clock=clock,
                                log=lines.append, **kwargs)
  return r, clock, lines


def run_steps(r, clock, first, last, seconds_per_step, every=10):
  """Steps first+1..last at a constant speed, reporting every `every` steps."""
  for step in range(first + 1, last + 1):
    clock.t += seconds_per_step
    if step % every == 0:
      r.report(step)


@pytest.mark.parametrize("seconds,text", [
    (0, "0s"), (45, "45s"), (59.6, "1m00s"), (395, "6m35s"), (3720, "1h02m"),
    (86399, "23h59m"), (2 * 86400 + 3 * 3600 + 59, "2d03h"), (None, "--"),
    (float("inf"), "--")])
def test_format_duration(seconds, text):
  assert progress.format_duration(seconds) == text


def test_format_rate():
  assert progress.format_rate(None) == "-- steps/s"
  assert progress.format_rate(1.0234) == "1.02 steps/s"
  assert progress.format_rate(12.34) == "12.3 steps/s"
  assert progress.format_rate(589.7) == "590 steps/s"


def test_no_rate_before_two_marks_then_the_line():
  r, clock, lines = reporter(num_steps=702, every_steps=100)
  clock.t = 50.0
  r.report(100, {"train/loss": 11.0})  # no start mark: one mark, no rate yet
  assert lines[-1] == "step 100/702 (14.2%)  -- steps/s  ETA --  loss 11"
  clock.t += 200 / 1.02
  line = r.report(300, {"train/loss": 10.1234, "train/accuracy/branch1": 0.5,
                        "train/accuracy/backbone": 0.7391})
  # 200 steps in 196 s: 1.02 steps/s; 402 steps left: 394 s.
  assert line == "step 300/702 (42.7%)  1.02 steps/s  ETA 6m34s  loss 10.12  acc(backbone) 73.9%"


def test_steady_rate_and_eta_from_the_start_mark():
  r, clock, _ = reporter(num_steps=1000)
  clock.t = 30.0  # the first step compiled for 30 s: before the start mark, not counted
  r.start(1)
  run_steps(r, clock, 1, 100, 0.5)
  assert r.rate() == pytest.approx(2.0)
  assert r.eta(100) == pytest.approx(450.0)


def test_evaluation_and_checkpoint_time_is_left_out():
  r, clock, _ = reporter(num_steps=1000)
  r.start(0)
  run_steps(r, clock, 0, 50, 1.0)
  with r.excluded():
    clock.t += 300.0  # a long evaluation
  run_steps(r, clock, 50, 100, 1.0)
  assert r.rate() == pytest.approx(1.0)


def test_a_long_pause_moves_the_eta_boundedly_and_passes():
  """A 60 s stall in one 10 s interval: the ETA grows by the stall's share of the window (at
  least 10 intervals and 60 s), not 7x as a rate from that interval alone would; once the
  stall leaves the window, the ETA is the steady one again."""
  r, clock, _ = reporter(num_steps=10_000, every_steps=10)
  r.start(0)
  run_steps(r, clock, 0, 500, 1.0)
  steady = r.eta(500)
  assert steady == pytest.approx(9500.0)
  clock.t += 60.0  # the stall, inside the next interval
  run_steps(r, clock, 500, 510, 1.0)
  after = r.eta(510)
  window_s = 100.0  # 10 intervals of 10 s
  assert steady < after <= 9490.0 * (1 + 60.0 / window_s) * (1 + 1e-9)
  assert after < 9490.0 * 2  # a rate from the last interval alone: 7x
  run_steps(r, clock, 510, 630, 1.0)
  assert r.eta(630) == pytest.approx(9370.0)


def test_the_window_spans_a_minute_when_reports_are_frequent():
  r, clock, _ = reporter(num_steps=100_000, every_steps=1)
  r.start(0)
  run_steps(r, clock, 0, 1000, 0.1, every=1)  # 10 reports a second
  clock.t += 6.0  # one 6 s hiccup in 100 s of training
  run_steps(r, clock, 1000, 1001, 0.1, every=1)
  # Over a window of >= 60 s the hiccup costs about 10% of the rate, not 98%.
  assert 10.0 * (1 - 6.0 / 60.0) - 0.05 <= r.rate() < 10.0


def test_due_every_steps_the_last_step_and_every_minute():
  r, clock, _ = reporter(num_steps=105, every_steps=50, every_s=60.0)
  r.start(1)
  assert not r.due(2) and r.due(50) and r.due(105)
  clock.t += 61.0
  assert r.due(3)
  r.report(3)
  assert not r.due(4)


def test_the_rate_goes_to_the_writer():

  class Writer:
    def __init__(self):
      self.scalars = []

    def write_scalars(self, step, scalars):
      self.scalars.append((step, scalars))

  writer = Writer()
  r, clock, _ = reporter(writer=writer)
  r.start(0)
  run_steps(r, clock, 0, 20, 0.25)
  assert writer.scalars == [(10, {"steps_per_sec": 4.0}), (20, {"steps_per_sec": 4.0})]


def test_heads_are_ordered_backbone_branches_self_teacher():
  metrics = {"eval/top1/self_teacher": 4.0, "eval/top1/branch10": 3.0,
             "eval/top1/branch2": 2.0, "eval/top1/backbone": 1.0, "eval/loss": 0.5}
  assert [h for h, _ in progress.heads(metrics, "eval/top1/")] == [
      "backbone", "branch2", "branch10", "self_teacher"]
  line = progress.format_eval(469, 1.0, {**metrics, "eval/ece/backbone": 3.21})
  assert line == ("eval step 469 (epoch 1.00): top-1 backbone 1.00%  branch2 2.00%  "
                  "branch10 3.00%  self_teacher 4.00%  |  loss 0.5  ECE(backbone) 3.21%")


FINAL = {"step": 1876, "eval/top1/backbone": 88.18, "eval/top1/branch1": 89.95,
         "eval/top1/branch2": 89.32, "eval/top1/self_teacher": 89.44}


def test_summary_names_heads_best_and_paths(tmp_path):
  results = {"step": 1876, "num_steps": 1876, "finished": True, "preempted": False,
             "wall_time_s": 687.0, "steps_this_run": 1876, "train_step_time_s": 0.3,
             "final": FINAL, "best_backbone_top1": 88.18, "best_step": 1876,
             "calibration": {"confidence": [0.1] * 15}, "history": [FINAL]}
  lines = progress.summary_lines(results, str(tmp_path))
  assert lines == [
      "Finished: 1876/1876 steps in 11m27s (1876 this run, 300.0 ms/step after compilation).",
      "Test top-1 at step 1876: backbone 88.18%  branch1 89.95%  branch2 89.32%  "
      "self_teacher 89.44%",
      "Best backbone top-1: 88.18% at step 1876",
      f"Results:      {tmp_path}/results.json",
      f"Checkpoints:  {tmp_path}/checkpoints",
      f"TensorBoard:  tensorboard --logdir {tmp_path}"]
  assert "confidence" not in "\n".join(lines)
  assert progress.one_line_summary(results) == (
      "finished at step 1876/1876 in 11m27s: top-1 backbone 88.18% (branch1 89.95%, "
      "branch2 89.32%, self_teacher 89.44%)")


def test_summary_of_a_preempted_run_before_any_evaluation():
  results = {"step": 40, "num_steps": 100, "finished": False, "preempted": True,
             "wall_time_s": 12.0}
  lines = progress.summary_lines(results, "gs://bucket/run")
  assert lines[0] == ("Preempted at step 40/100 after 12s: rerun the same command to resume "
                      "from the latest checkpoint.")
  assert lines[1] == "No evaluation yet."
  assert lines[2:] == ["Results:      gs://bucket/run/results.json",
                       "Checkpoints:  gs://bucket/run/checkpoints",
                       "TensorBoard:  tensorboard --logdir gs://bucket/run"]


def record(pathname, message, level=std_logging.INFO):
  return std_logging.LogRecord("absl", level, pathname, 1, message, None, None)


@pytest.mark.parametrize("pathname,message,level,shown", [
    ("/x/site-packages/orbax/checkpoint/manager.py", "Saving checkpoint", std_logging.INFO,
     False),
    ("/x/site-packages/orbax/checkpoint/manager.py", "disk full", std_logging.WARNING, True),
    ("/x/site-packages/jax/_src/xla_bridge.py",
     "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so",
     std_logging.INFO, False),
    ("/x/site-packages/jax/_src/xla_bridge.py", "An NVIDIA GPU may be present",
     std_logging.WARNING, True),
    ("/x/site-packages/tensorflow_datasets/core/dataset_info.py",
     "For 'fashion_mnist/3.0.1': fields info.[module_name] differ on disk and in the code. "
     "Keeping the one from code.", std_logging.INFO, False),
    ("/x/site-packages/tensorflow_datasets/core/download/download_manager.py",
     "Downloading and preparing dataset cifar100", std_logging.INFO, True),
    ("/repo/mixskd_jax/run/loop.py", "step 2/4 (50.0%)", std_logging.INFO, True),
    ("/repo/mixskd_jax/run/loop.py", "Preempted at step 3", std_logging.WARNING, True),
])
def test_quiet_libraries_filter_is_narrow(pathname, message, level, shown):
  assert progress.QuietLibraries().filter(record(pathname, message, level)) == shown


def test_console_format():
  formatter = progress.ConsoleFormatter()
  info = record("/repo/mixskd_jax/run/loop.py", "step 2/4")
  assert formatter.format(info).split(" ", 1)[1] == "step 2/4"
  warning = record("/repo/mixskd_jax/run/loop.py", "careful", std_logging.WARNING)
  assert formatter.format(warning).split(" ", 1)[1] == "WARNING [loop:1] careful"


# ---------------------------------------------------------------------------------------------
# Preflight, in-process.

@pytest.mark.parametrize("dotted,suggestion", [
    ("batchsize", "batch_size"), ("optimizer.lr", "optimizer.learning_rate"),
    ("learning_rate", "optimizer.learning_rate"), ("optimizr.lr", "optimizer"),
    ("data.datadir", "data.data_dir"), ("optimizer.wd", "optimizer.weight_decay"),
    ("objective.weights.feature_ms", "objective.weights.feature_mse")])
def test_unknown_field_names_the_closest(dotted, suggestion):
  message = config_lib.unknown_field_error(config_lib.base_config(), dotted)
  assert f"did you mean '{suggestion}'?" in message
  assert "\n" not in message


def test_known_fields_pass():
  config = config_lib.base_config()
  for dotted in ("batch_size", "optimizer.learning_rate", "data.data_dir",
                 "objective.weights.feature_mse"):
    assert config_lib.unknown_field_error(config, dotted) is None


def test_a_field_set_in_code_with_a_typo_fails_the_run(tmp_path):
  config = tiny_config()
  config.optimizer.lr = 0.5  # a typo in Python: an unlocked ConfigDict takes it silently
  with pytest.raises(config_lib.ConfigFieldError, match="did you mean 'optimizer.learning_rate'"):
    preflight.check_run(config, str(tmp_path / "work"))
  assert not (tmp_path / "work").exists()


def test_workdir_checks(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(preflight.WorkdirError, match="is under a file"):
    preflight.check_workdir(str(tmp_path / "file" / "run"))
  with pytest.raises(preflight.WorkdirError, match="is a file, not a directory"):
    preflight.check_workdir(str(tmp_path / "file"))
  created = preflight.check_workdir(str(tmp_path / "a" / "b"))
  assert created == [str(tmp_path / "a"), str(tmp_path / "a" / "b")]
  assert os.listdir(tmp_path / "a" / "b") == []  # the probe file is gone
  preflight.remove_if_empty(created)
  assert not (tmp_path / "a").exists()
  assert preflight.check_workdir("gs://bucket/run") == []


def test_offline_unprepared_dataset_is_one_error_and_leaves_nothing(tmp_path, monkeypatch):
  monkeypatch.setenv(dataset_check.OFFLINE_ENV, "1")
  data_dir = tmp_path / "tfds"
  config = tiny_config({"data.name": "cifar10", "data.data_dir": str(data_dir)})
  from mixskd_jax import data
  with pytest.raises(data.DatasetUnavailableError, match="cifar10 is not prepared") as error:
    preflight.check_run(config, str(tmp_path / "work"))
  assert isinstance(error.value, preflight.PreflightError)
  assert "--config.data.data_dir" in str(error.value)
  assert not data_dir.exists() and not (tmp_path / "work").exists()
  # Fashion-MNIST: the same, as the data package's FashionMNISTMissingError.
  (tmp_path / "idx").mkdir()
  config = tiny_config({"data.data_dir": str(data_dir), "data.idx_dir": str(tmp_path / "idx")})
  with pytest.raises(data.FashionMNISTMissingError, match="dataset-fashion-mnist"):
    dataset_check.check_dataset(config.data)
  assert not data_dir.exists()


def test_prepared_or_local_data_passes_offline(monkeypatch):
  monkeypatch.setenv(dataset_check.OFFLINE_ENV, "1")
  dataset_check.check_dataset(tiny_config().data)  # prepared, or the Debian IDX files
