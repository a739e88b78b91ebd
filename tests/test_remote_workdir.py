"""A `gs://` workdir, offline: every file of a run goes through epath (and Orbax's TensorStore
and TensorBoard's writer get the URI), never through a local-path call.

No offline file system serves both of Orbax's writers: epath parses only gs://, s3://, az://,
hf:// (`epath.Path("ram://x")` and `"memory://x"` raise KeyError), and TensorStore, Orbax's
array writer, reaches only local disk and GCS. So `fake_gcs` keeps the real `gs://` URIs and
redirects, at the three places where they meet a storage client, to a local folder: epath's
gs backend (which refuses to append, as GCS does), Orbax's TensorStore spec for GCS, and the
TensorBoard writer's folder. Every local-path call (`open`, `os.makedirs`, `os.replace`,
`os.path.abspath`, `os.stat`, ...) fails the test when it is handed a `gs:` path."""

import builtins
import json
import os
import shutil

import pytest
from clu import metric_writers
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from orbax.checkpoint._src.path import gcs_utils

from mixskd_jax.run.loop import Trainer
from mixskd_jax.store import workdir as workdir_lib
from tests.training_configs import tiny_config

BUCKET = "gs://fake-bucket"


class _FolderAsBucket(epath_backend._OsPathBackend):  # pylint: disable=protected-access
  """epath's backend for gs:// paths, kept in a local folder. Refuses to append: a GCS object
  can only be written whole."""

  def __init__(self, root):
    self.root = root

  def local(self, path):
    text = os.fspath(path)
    assert text.startswith("gs://"), text
    return os.path.join(self.root, text[len("gs://"):])

  def _uri(self, local):
    return "gs://" + os.path.relpath(local, self.root)

  def open(self, path, mode):
    if "a" in mode:
      raise OSError(f"{path}: object stores cannot append")
    return super().open(self.local(path), mode)

  def exists(self, path):
    return super().exists(self.local(path))

  def isdir(self, path):
    return super().isdir(self.local(path))

  def listdir(self, path):
    return super().listdir(self.local(path))

  def glob(self, path):
    return [self._uri(p) for p in super().glob(self.local(path))]

  def walk(self, top, *, top_down=True, on_error=None):
    for folder, dirs, files in super().walk(self.local(top), top_down=top_down,
                                            on_error=on_error):
      yield self._uri(folder), dirs, files

  def makedirs(self, path, *, exist_ok=False, mode=None):
    super().makedirs(self.local(path), exist_ok=exist_ok, mode=mode)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    super().mkdir(self.local(path), exist_ok=exist_ok, mode=mode)

  def rmtree(self, path):
    super().rmtree(self.local(path))

  def remove(self, path):
    super().remove(self.local(path))

  def rename(self, path, dst):
    super().rename(self.local(path), self.local(dst))

  def replace(self, path, dst):
    super().replace(self.local(path), self.local(dst))

  def copy(self, path, dst, overwrite):
    super().copy(self.local(path), self.local(dst), overwrite)

  def stat(self, path):
    return super().stat(self.local(path))


_LOCAL_PATH_CALLS = [(builtins, "open"), (os, "open"), (os, "makedirs"), (os, "mkdir"),
                     (os, "replace"), (os, "rename"), (os, "remove"), (os, "unlink"),
                     (os, "rmdir"), (os, "stat"), (os, "listdir"), (os, "scandir"),
                     (os.path, "abspath"), (shutil, "rmtree"), (shutil, "copyfile")]


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://fake-bucket lives in `tmp_path / "fake-bucket"`. Returns the backend (its `local`
  maps a URI to its file) and `misuses`, the local-path calls that received a gs: path."""
  bucket = _FolderAsBucket(str(tmp_path))
  os.makedirs(bucket.local(BUCKET))
  monkeypatch.setattr(gpath._GPath, "_backend", property(  # pylint: disable=protected-access
      lambda self: bucket if self._uri_scheme == "gs" else epath_backend.os_backend))
  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs",
                      lambda path: {"driver": "file", "path": bucket.local(path)})
  monkeypatch.setattr(gcs_utils, "is_hierarchical_namespace_enabled", lambda path: False)
  monkeypatch.setattr(gcs_utils, "rmtree",
                      lambda path, missing_ok=False: epath.Path(path).rmtree(missing_ok))
  # TensorFlow's summary writer reaches gs:// through its own GCS client, not epath.
  create_writer = metric_writers.SummaryWriter
  bucket.writer_logdirs = []

  def writer_on_the_folder(logdir, *args, **kwargs):
    bucket.writer_logdirs.append(logdir)
    return create_writer(bucket.local(logdir), *args, **kwargs)
  monkeypatch.setattr(metric_writers, "SummaryWriter", writer_on_the_folder)

  bucket.misuses = []
  for module, name in _LOCAL_PATH_CALLS:
    monkeypatch.setattr(module, name, _refusing_gs(getattr(module, name), name, bucket.misuses))
  return bucket


def _refusing_gs(call, name, misuses):
  def guarded(*args, **kwargs):
    for arg in args[:2]:
      if isinstance(arg, (str, os.PathLike)) and "gs:" in os.fspath(arg):
        misuses.append(f"{name}({os.fspath(arg)!r})")
        raise AssertionError(f"a local-path call got a gs: path: {name}({arg!r})")
    return call(*args, **kwargs)
  return guarded


def test_the_fake_refuses_local_path_calls_and_appends(fake_gcs):
  """The guards are armed: what the loop did before (os.path.abspath, open(..., "a"))."""
  with pytest.raises(AssertionError, match="abspath"):
    os.path.abspath(f"{BUCKET}/run")
  with pytest.raises(AssertionError, match="open"):
    open(f"{BUCKET}/run/h.jsonl", "a")  # pylint: disable=unspecified-encoding
  with pytest.raises(OSError, match="cannot append"):
    epath.Path(f"{BUCKET}/h.jsonl").open("a")
  fake_gcs.misuses.clear()


def test_resolve_keeps_gs_makes_local_absolute_and_names_the_flag_otherwise():
  assert str(workdir_lib.resolve("gs://b/run")) == "gs://b/run"
  assert str(workdir_lib.resolve("rel/run")) == os.path.join(os.getcwd(), "rel/run")
  with pytest.raises(ValueError, match=r"--workdir='memory://b/run'.*gs://bucket/path"):
    workdir_lib.resolve("memory://b/run")


@pytest.mark.parametrize("remote", [False, True])
def test_history_drops_records_after_the_resumed_step_and_needs_no_append(
    tmp_path, fake_gcs, remote):
  """Local: appended line by line. gs://: written whole at flush (the fake refuses appends).
  Either way a torn last line is dropped and records after the resumed step are dropped."""
  path = epath.Path(f"{BUCKET}/h.jsonl" if remote else str(tmp_path / "h.jsonl"))
  local_file = fake_gcs.local(path) if remote else os.fspath(path)
  with builtins.open(local_file, "w") as f:
    f.write("".join(json.dumps({"step": s}) + "\n" for s in (2, 4, 6)) + '{"step": 8, "lo')
  history = workdir_lib.JsonlHistory(path, writer=True, resume_step=4)
  assert [r["step"] for r in history.records] == [2, 4]
  history.append({"step": 5})
  history.flush()
  history.append({"step": 6})
  if remote:  # waits for the flush that follows the next checkpoint
    assert [r["step"] for r in workdir_lib.read_jsonl(path)] == [2, 4, 5]
  history.flush()
  assert [r["step"] for r in workdir_lib.read_jsonl(path)] == [2, 4, 5, 6]
  reader = workdir_lib.JsonlHistory(path, writer=False, resume_step=5)
  assert [r["step"] for r in reader.records] == [2, 4, 5]
  reader.append({"step": 6})  # a process other than the chief never writes
  assert [r["step"] for r in workdir_lib.read_jsonl(path)] == [2, 4, 5, 6]
  assert not fake_gcs.misuses


@pytest.mark.slow
def test_training_in_a_gs_workdir_writes_there_and_resumes(fake_gcs, tmp_path):
  """6 steps, then the same workdir to step 8: checkpoints (Orbax: epath + TensorStore),
  config, results, both histories and the TensorBoard events land in the bucket."""
  workdir = f"{BUCKET}/run"
  first = Trainer(tiny_config({"num_train_steps": 6}), workdir).run()
  assert first["finished"] and first["steps_this_run"] == 6
  second = Trainer(tiny_config({"num_train_steps": 8}), workdir).run()
  assert second["finished"] and second["steps_this_run"] == 2 and second["step"] == 8

  assert not fake_gcs.misuses
  assert fake_gcs.writer_logdirs == [workdir, workdir]  # the URI itself, twice
  folder = fake_gcs.local(workdir)
  assert sorted(os.listdir(os.path.join(folder, "checkpoints"))) == ["4", "6", "8"]
  names = os.listdir(folder)
  assert {"checkpoints", "config.json", "results.json", "eval_history.jsonl",
          "train_history.jsonl"} <= set(names)
  assert any(n.startswith("events.out.tfevents.") for n in names)
  with builtins.open(os.path.join(folder, "results.json")) as f:
    assert json.load(f)["step"] == 8
  eval_steps = [r["step"] for r in workdir_lib.read_jsonl(epath.Path(workdir) /
                                                          "eval_history.jsonl")]
  assert eval_steps == [4, 6, 8] == [h["step"] for h in second["history"]]
  train_steps = [r["step"] for r in workdir_lib.read_jsonl(epath.Path(workdir) /
                                                           "train_history.jsonl")]
  assert train_steps == [2, 4, 6, 8]
  assert "gs:" not in os.listdir(os.getcwd())  # where os.path.abspath would have put it
