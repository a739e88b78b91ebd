"""Damaged or half-prepared data: one line naming the file and the fix, nothing lost.

- IDX files cut short, not IDX, not gzip, or disagreeing in length (`check_idx_files`);
- a prepared dataset whose files no longer match what was written (sizes and checksums
  recorded at preparation, or tfds's own dataset_info.json where there is no record);
- a record TensorFlow cannot read, while loading or in the middle of training: the run saves
  the last completed step, and the same command resumes exactly once the data is repaired;
- preparation under concurrency (two processes at once) and after a kill (its `incomplete.*`
  folder is removed, not tripped over);
- a config file that does not load.
The commands (`python -m mixskd_jax.main`) are in the slow tier.
"""

import gzip
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mixskd_jax import data
from mixskd_jax.config.errors import DataFaultError, PreflightError
from mixskd_jax.data import fashion_mnist_local, integrity, sources
from mixskd_jax.run import command_line, dataset_check
from mixskd_jax.run.loop import train_and_evaluate
from tests.fake_fashion_mnist import write_idx
from tests.test_cli import assert_one_line_error, main
from tests.training_configs import tiny_config

N = 40  # examples per split of the tiny IDX files


@pytest.fixture
def idx_dir(tmp_path):
  folder = tmp_path / "idx"
  folder.mkdir()
  write_idx(str(folder), N)
  return folder


def _config(data_dir, idx_dir, **overrides):
  return tiny_config({"data.data_dir": str(data_dir), "data.idx_dir": str(idx_dir),
                      "data.train_examples": None, "data.test_examples": None, **overrides})


def _prepared_folder(data_dir):
  return str(tfds.builder("fashion_mnist", data_dir=str(data_dir)).data_dir)


def _train_shard(folder):
  return next(os.path.join(folder, n) for n in os.listdir(folder) if "-train.tfrecord" in n)


def _flip_byte(path, offset):
  with open(path, "r+b") as f:
    f.seek(offset)
    byte = f.read(1)
    f.seek(offset)
    f.write(bytes([byte[0] ^ 0xFF]))


# --- IDX files ---------------------------------------------------------------------------------

def _truncate_gz(path):
  """The file cut to 60% of its bytes (a copy stopped part way)."""
  os.truncate(path, int(os.path.getsize(path) * 0.6))


def _truncated_payload(path):
  """A valid gzip whose IDX payload is short of what its header promises."""
  with gzip.open(path) as f:
    content = f.read()
  with gzip.open(path, "wb") as f:
    f.write(content[: len(content) - 100])


def _not_idx(path):
  with gzip.open(path, "wb") as f:
    f.write(b"<html>404 Not Found</html>" * 4)


def _not_gzip(path):
  with open(path, "wb") as f:
    f.write(b"PK\x03\x04 a zip, not a gzip" * 10)


@pytest.mark.parametrize("name,damage,says", [
    ("train-images-idx3-ubyte.gz", _truncate_gz, "cannot be read as a gzipped IDX image file"),
    ("train-images-idx3-ubyte.gz", _truncated_payload, "is truncated"),
    ("t10k-labels-idx1-ubyte.gz", _not_idx, "is not an IDX label file (magic number"),
    ("t10k-labels-idx1-ubyte.gz", _not_gzip, "cannot be read as a gzipped IDX label file"),
    ("t10k-labels-idx1-ubyte.gz", lambda p: _tiny_labels(p, 3), "is not an IDX label file (3 "),
])
def test_a_damaged_idx_file_is_named_with_its_fix(idx_dir, name, damage, says):
  path = os.path.join(idx_dir, name)
  damage(path)
  with pytest.raises(DataFaultError) as e:
    fashion_mnist_local.check_idx_files(str(idx_dir))
  message = str(e.value)
  assert message.startswith(f"{path} ") and says in message, message
  assert "\n" not in message and "unset --config.data.idx_dir" in message


def _tiny_labels(path, size):
  with gzip.open(path, "wb") as f:
    f.write(b"\x00" * size)


def test_images_and_labels_of_different_lengths(idx_dir):
  header = np.asarray([2049, N - 1], ">u4").tobytes()
  with gzip.open(os.path.join(idx_dir, "t10k-labels-idx1-ubyte.gz"), "wb") as f:
    f.write(header + bytes(N - 1))
  with pytest.raises(DataFaultError, match=f"has {N} images but .* has {N - 1} labels"):
    fashion_mnist_local.check_idx_files(str(idx_dir))


def test_the_packages_own_files_say_reinstall(idx_dir, monkeypatch):
  monkeypatch.setattr(fashion_mnist_local, "DEFAULT_IDX_DIR", str(idx_dir))
  _truncate_gz(os.path.join(idx_dir, "train-labels-idx1-ubyte.gz"))
  with pytest.raises(DataFaultError, match="apt-get install --reinstall dataset-fashion-mnist"):
    fashion_mnist_local.check_idx_files(str(idx_dir))


def test_a_damaged_idx_file_prepares_nothing(tmp_path, idx_dir):
  """The preparation reads the files through first: nothing appears in the data_dir but the
  lock file, and the undamaged files then prepare as usual."""
  data_dir = tmp_path / "tfds"
  _not_idx(os.path.join(idx_dir, "t10k-labels-idx1-ubyte.gz"))
  with pytest.raises(DataFaultError):
    sources.get_builder(_config(data_dir, idx_dir).data)
  assert not tfds.builder("fashion_mnist", data_dir=str(data_dir)).is_prepared()
  assert os.listdir(data_dir) == [".fashion_mnist" + integrity.LOCK_SUFFIX]
  write_idx(str(idx_dir), N)
  assert sources.get_builder(_config(data_dir, idx_dir).data).is_prepared()


# --- prepared datasets -------------------------------------------------------------------------

@pytest.fixture
def prepared(tmp_path, idx_dir):
  """(config, the prepared folder), Fashion-MNIST prepared from the tiny IDX files."""
  config = _config(tmp_path / "tfds", idx_dir)
  sources.clear_cache()
  builder = sources.get_builder(config.data)
  yield config, str(builder.data_dir)
  sources.clear_cache()


def test_preparation_records_every_file(prepared):
  _, folder = prepared
  with open(os.path.join(folder, integrity.MANIFEST)) as f:
    files = json.load(f)["files"]
  assert set(files) == set(os.listdir(folder)) - {integrity.MANIFEST}
  shard = os.path.basename(_train_shard(folder))
  assert files[shard]["bytes"] == os.path.getsize(_train_shard(folder))
  assert len(files[shard]["sha256"]) == 64
  integrity.verify_prepared(folder, checksums=True)  # as written: passes


@pytest.mark.parametrize("record", [True, False], ids=["recorded", "tfds_info_only"])
def test_a_shard_cut_short_is_refused_before_training(prepared, record):
  """With the preparation's record, or (prepared elsewhere) against dataset_info.json."""
  config, folder = prepared
  if not record:
    os.remove(os.path.join(folder, integrity.MANIFEST))
  shard = _train_shard(folder)
  size = os.path.getsize(shard)
  os.truncate(shard, size - 1000)
  with pytest.raises(DataFaultError) as e:
    dataset_check.check_dataset(config.data)
  message = str(e.value)
  assert message.startswith(shard) and f"delete {folder} so that it is prepared again" in message
  assert str(size) in message, message  # what was written


def test_a_missing_shard_is_refused(prepared):
  config, folder = prepared
  shard = _train_shard(folder)
  os.remove(shard)
  with pytest.raises(DataFaultError, match=f"lacks {os.path.basename(shard)}"):
    dataset_check.check_dataset(config.data)


def test_changed_bytes_are_refused_by_their_checksum(prepared):
  config, folder = prepared
  shard = _train_shard(folder)
  _flip_byte(shard, os.path.getsize(shard) // 2)
  with pytest.raises(DataFaultError, match="no longer has the SHA-256"):
    dataset_check.check_dataset(config.data)


def test_an_unreadable_record_is_one_line_when_loaded(prepared):
  """Prepared elsewhere (no record), a changed byte keeps the size: TensorFlow's checksum of
  the record fails while the split loads, and that is a DataFaultError naming the folder."""
  config, folder = prepared
  os.remove(os.path.join(folder, integrity.MANIFEST))
  shard = _train_shard(folder)
  _flip_byte(shard, os.path.getsize(shard) // 2)
  dataset_check.check_dataset(config.data)  # the sizes match
  sources.clear_cache()
  with pytest.raises(DataFaultError) as e:
    sources.load_split(config.data, "train")
  message = str(e.value)
  assert message.startswith(f"A damaged record in the prepared dataset {folder} (train split) "
                            "(DataLossError: ")
  assert "\n" not in message and "[[" not in message


def test_read_fault_leaves_other_errors_alone():
  assert integrity.read_fault(ValueError("a bug"), "/data") is None
  assert integrity.read_fault(tf.errors.InvalidArgumentError(None, None, "shapes differ"),
                              "/data") is None
  jpeg = tf.errors.InvalidArgumentError(None, None, "Invalid JPEG data or crop window")
  assert "Invalid JPEG data" in str(integrity.read_fault(jpeg, "/data"))
  lost = tf.errors.DataLossError(None, None, "truncated record at 19999642 [[{{node X}}]]")
  assert str(integrity.read_fault(lost, "/data")) == (
      "A damaged record in the prepared dataset /data (DataLossError: truncated record at "
      "19999642): " + integrity.delete_hint("/data") + ".")


def test_a_mocked_preparation_leaves_no_lock_or_record():
  """Under tfds.testing.mock_data the builder's folders are tfds's own package metadata:
  preparing there takes no lock and records nothing."""
  config = tiny_config({"data.name": "cifar100"})
  with tfds.testing.mock_data(num_examples=8):
    builder = tfds.builder("cifar100")
    assert not integrity.prepares_for_real(builder)
    sources.get_builder(config.data)
  assert not os.path.exists(integrity.lock_path(os.path.dirname(str(builder.data_dir))))
  assert not os.path.exists(os.path.join(str(builder.data_dir), integrity.MANIFEST))


# --- preparing: killed, concurrent -------------------------------------------------------------

def test_a_killed_preparations_folder_is_removed_not_tripped_over(tmp_path, idx_dir):
  data_dir = tmp_path / "tfds"
  stale = data_dir / "fashion_mnist" / "incomplete.AB12_3.0.1"
  stale.mkdir(parents=True)
  (stale / "fashion_mnist-train.tfrecord-00000-of-00001").write_bytes(b"half")
  builder = sources.get_builder(_config(data_dir, idx_dir).data)
  assert builder.is_prepared() and not stale.exists()
  assert builder.info.splits["train"].num_examples == N


PREPARE = """
import sys, time
from mixskd_jax.data import fashion_mnist_local, sources
from tests.training_configs import tiny_config
if sys.argv[3] != "fast":  # a preparation that takes a while, half way through
  generate = fashion_mnist_local.LocalFashionMNIST._generate_examples
  def slowly(self, **kwargs):
    for i, example in enumerate(generate(self, **kwargs)):
      if i == 5:
        if sys.argv[3] == "pause":  # long enough for another process to be preparing too
          time.sleep(5)
        else:
          open(sys.argv[3], "w").close()  # tell the test: half written, kill me
          time.sleep(600)
      yield example
  fashion_mnist_local.LocalFashionMNIST._generate_examples = slowly
c = tiny_config({"data.data_dir": sys.argv[1], "data.idx_dir": sys.argv[2]})
print("prepared", sources.get_builder(c.data).info.splits["train"].num_examples, flush=True)
print("loaded", len(sources.load_split(c.data, "train")[1]), flush=True)
"""

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _prepare_process(data_dir, idx_dir, marker="fast", **pipes):
  """Prepares and loads Fashion-MNIST in a new process. `marker`: "fast"; "pause" (5 s after 5
  examples); or a path, created after 5 examples, after which it waits to be killed."""
  return subprocess.Popen([sys.executable, "-c", PREPARE, str(data_dir), str(idx_dir),
                           str(marker)], cwd=ROOT, text=True,
                          **(pipes or dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE)))


@pytest.mark.slow
def test_a_run_killed_while_preparing_leaves_nothing_that_breaks_the_next(tmp_path, idx_dir):
  data_dir, marker = tmp_path / "tfds", tmp_path / "half_written"
  killed = _prepare_process(data_dir, idx_dir, marker, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while not marker.exists():
    assert killed.poll() is None and time.time() < deadline
    time.sleep(0.1)
  incomplete = [p for p in (data_dir / "fashion_mnist").iterdir()
                if p.name.startswith("incomplete.")]
  assert incomplete  # what tfds had written so far
  killed.send_signal(signal.SIGKILL)
  killed.wait(timeout=60)
  after = _prepare_process(data_dir, idx_dir)
  out, err = after.communicate(timeout=300)
  assert after.returncode == 0, err[-3000:]
  assert out.splitlines()[-2:] == [f"prepared {N}", f"loaded {N}"], out
  assert not any(p.exists() for p in incomplete)


@pytest.mark.slow
def test_two_processes_started_together_prepare_once_and_both_load(tmp_path, idx_dir):
  """Each preparation pauses half way, so without the lock both would be writing at once (and
  the second to finish could not rename its folder onto the first's)."""
  data_dir = tmp_path / "tfds"
  both = [_prepare_process(data_dir, idx_dir, "pause") for _ in range(2)]
  for process in both:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert out.splitlines()[-2:] == [f"prepared {N}", f"loaded {N}"], out
  assert sorted(os.listdir(data_dir / "fashion_mnist")) == ["3.0.1"]


# --- a fault in the middle of training ---------------------------------------------------------

def _failing_after(iterator_fn, after):
  """`iterator_fn` whose iterators raise TensorFlow's DataLossError on batch `after`."""
  def failing(*args, **kwargs):
    for index, batch in enumerate(iterator_fn(*args, **kwargs)):
      if index == after:
        raise tf.errors.DataLossError(None, None, "corrupted record at 1234")
      yield batch
  return failing


def test_a_fault_mid_run_saves_the_last_step_and_the_rerun_ends_exactly(tmp_path, monkeypatch):
  """The fault meets batch 6 (read 2 ahead of the step: after 4 steps): the state of step 4
  is saved (checkpoints every 3 would have left step 3), the one line says so, and once the
  data is repaired the same run resumes from step 4 and ends with the parameters of a run
  that never met it."""
  overrides = {"checkpoint_every_steps": 3, "num_epochs": 2, "data.device_prefetch": 2}
  straight = train_and_evaluate(tiny_config(overrides), str(tmp_path / "straight"))
  workdir = str(tmp_path / "faulted")
  real = data.train_iterator
  monkeypatch.setattr(data, "train_iterator", _failing_after(real, 6))
  with pytest.raises(DataFaultError) as e:
    train_and_evaluate(tiny_config(overrides), workdir)
  message = str(e.value)
  assert isinstance(e.value, PreflightError) and "\n" not in message  # main: one line, exit 2
  assert message.startswith("A damaged record in the prepared dataset ")
  assert "corrupted record at 1234" in message
  assert message.endswith("The state at step 4 is saved: the same command resumes from it.")
  assert sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints"))
                if n.isdigit()) == [3, 4]
  monkeypatch.setattr(data, "train_iterator", real)  # repaired
  resumed = train_and_evaluate(tiny_config(overrides), workdir)
  assert resumed["step"] == straight["step"] == 8
  assert resumed["final"] == straight["final"]
  assert json.dumps(resumed["history"]) == json.dumps(straight["history"])


def test_a_fault_in_an_evaluation_saves_its_step_first(tmp_path, monkeypatch):
  """An evaluation (at the end of epoch 1, step 4) that meets a damaged record: the state of
  step 4 is saved although checkpoints come every 3 steps; the rerun evaluates step 4 first."""
  overrides = {"checkpoint_every_steps": 3, "num_epochs": 2}
  workdir = str(tmp_path / "run")
  real = data.eval_iterator
  monkeypatch.setattr(data, "eval_iterator", _failing_after(real, 1))
  with pytest.raises(DataFaultError, match="The state at step 4 is saved"):
    train_and_evaluate(tiny_config(overrides), workdir)
  monkeypatch.setattr(data, "eval_iterator", real)
  resumed = train_and_evaluate(tiny_config(overrides), workdir)
  assert [r["step"] for r in resumed["history"]] == [4, 8]


def test_a_bug_is_not_called_damaged_data(tmp_path, monkeypatch):
  def broken(*args, **kwargs):
    raise RuntimeError("a bug in the pipeline")
    yield  # pylint: disable=unreachable
  monkeypatch.setattr(data, "train_iterator", broken)
  with pytest.raises(RuntimeError, match="a bug in the pipeline"):
    train_and_evaluate(tiny_config({"num_train_steps": 2}), str(tmp_path / "run"))


# --- config files ------------------------------------------------------------------------------

@pytest.mark.parametrize("source,expected", [
    ("def get_config():\n  c = dict(\n  return c\n",
     "{path}, line 2: SyntaxError: '(' was never closed: c = dict("),
    ("import ml_collections\ndef get_config():\n  return undefined_name\n",
     "{path}, line 3 failed to load: NameError: name 'undefined_name' is not defined"),
])
def test_a_config_file_that_does_not_load_is_one_line(tmp_path, source, expected):
  path = tmp_path / "broken.py"
  path.write_text(source)
  message = command_line.check_command_line(["main", f"--config={path}"])
  assert message == "Config file " + expected.format(path=path)


# --- the command, as a user meets each fault ---------------------------------------------------

def _command(tmp_path, *overrides):
  return main("--config=configs/default.py:smoke", f"--workdir={tmp_path / 'run'}",
              *overrides, MIXSKD_ASSUME_OFFLINE="1")


@pytest.mark.slow
def test_the_command_answers_each_fault_in_one_line(tmp_path, idx_dir):
  """Each row of the issue, as a user meets it: one line, exit 2, before training, no
  workdir left behind; then, repaired, the data prepares and the run starts."""
  data_dir = tmp_path / "tfds"
  flags = (f"--config.data.data_dir={data_dir}", f"--config.data.idx_dir={idx_dir}")
  train_images = os.path.join(idx_dir, "train-images-idx3-ubyte.gz")
  _truncate_gz(train_images)
  code, out, err, _ = _command(tmp_path, *flags)
  assert_one_line_error(code, out, err, f"{train_images} cannot be read as a gzipped IDX")
  write_idx(str(idx_dir), N)
  labels = os.path.join(idx_dir, "t10k-labels-idx1-ubyte.gz")
  _not_idx(labels)
  code, out, err, _ = _command(tmp_path, *flags)
  assert_one_line_error(code, out, err, f"{labels} is not an IDX label file")
  assert not (tmp_path / "run").exists()
  write_idx(str(idx_dir), N)
  sources.get_builder(_config(data_dir, idx_dir).data)  # prepared, then a shard cut short
  shard = _train_shard(_prepared_folder(data_dir))
  os.truncate(shard, os.path.getsize(shard) // 2)
  code, out, err, _ = _command(tmp_path, *flags)
  line = assert_one_line_error(code, out, err, f"{shard} holds ")
  assert f"delete {_prepared_folder(data_dir)}" in line
  broken = tmp_path / "broken.py"
  broken.write_text("def get_config(:\n  pass\n")
  code, out, err, _ = main(f"--config={broken}", f"--workdir={tmp_path / 'run'}")
  assert_one_line_error(code, out, err, f"Config file {broken}, line 1: SyntaxError: ")
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_two_runs_started_together_on_unprepared_data_both_train(tmp_path, idx_dir):
  data_dir = tmp_path / "tfds"
  args = [sys.executable, "-m", "mixskd_jax.main", "--config=configs/default.py:smoke",
          f"--config.data.data_dir={data_dir}", f"--config.data.idx_dir={idx_dir}",
          "--config.num_train_steps=2", "--config.data.test_examples=16"]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  started = time.time()
  runs = [subprocess.Popen(args + [f"--workdir={tmp_path / f'run{i}'}"], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(2)]
  assert time.time() - started < 1.0
  for run in runs:
    _, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
  for i in range(2):
    with open(tmp_path / f"run{i}" / "results.json") as f:
      assert json.load(f)["step"] == 2
