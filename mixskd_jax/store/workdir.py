"""The run's directory, on local disk or on an object store (`gs://bucket/run`).

Every file the loop writes goes through `etils.epath`, which Orbax uses too, so one code
path serves both; the TensorBoard writer takes the same path as a string (TensorFlow's file
system layer reads `gs://` itself). Object stores differ from a disk in two ways that matter
here, and the helpers below absorb both:

- no rename: a GCS "rename" is a copy then a delete, neither atomic nor cheap. One object
  upload, though, is atomic (readers see the old object or the new one), so a JSON file is
  written directly there, and through a temporary file and `rename` on disk.
- no append: an object is immutable, "append" means uploading the whole object again. See
  `JsonlHistory` for how the histories live with that.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable

from absl import logging
from etils import epath

# Schemes whose paths both writers of a workdir understand: epath (and through it Orbax's
# metadata) and TensorStore (Orbax's array data). epath also parses s3://, az://, hf://, but
# Orbax hands those to TensorStore's local `file` driver, which rejects them.
REMOTE_SCHEMES = ("gs",)


def resolve(workdir: epath.PathLike) -> epath.Path:
  """`workdir` as an `epath.Path`: a local path made absolute (Orbax requires absolute local
  paths), a `gs://` URI kept exactly as given (`os.path.abspath` would turn it into
  `<cwd>/gs:/bucket`).

  Raises:
    ValueError: naming `--workdir`, for a URI scheme other than `gs://`.
  """
  text = os.fspath(workdir)
  if "://" not in text:
    return epath.Path(os.path.abspath(text))
  scheme = text.split("://", 1)[0]
  if scheme not in REMOTE_SCHEMES:
    raise ValueError(
        f"--workdir={text!r}: the scheme {scheme}:// is not supported; use a local directory or "
        "gs://bucket/path (Orbax writes checkpoints to local disk and GCS only).")
  return epath.Path(text)


def is_local(path: epath.PathLike) -> bool:
  """Whether `path` is on a file system with POSIX rename and append (not an object store)."""
  return "://" not in os.fspath(path)


def write_text_atomically(path: epath.Path, text: str) -> None:
  """Writes `text` so that a reader sees the previous file or the new one, never a part."""
  if is_local(path):
    tmp = path.with_name(path.name + ".tmp")  # same directory: the rename stays on one disk
    tmp.write_text(text)
    tmp.replace(path)
  else:
    path.write_text(text)  # one upload; an object becomes visible only once complete


def move_tree(source: epath.Path, dest: epath.Path) -> None:
  """Moves the directory `source` to `dest` (which must not exist): one rename on disk; on an
  object store, which cannot rename, a copy of every file, then the source's removal."""
  if is_local(source):
    source.rename(dest)
    return
  for root, _, names in source.walk():
    root = epath.Path(root)
    target = dest / root.relative_to(source)
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
      (root / name).copy(target / name)
  source.rmtree()


def write_json(path: epath.Path, obj: Any) -> None:
  """`obj` as indented, key-sorted JSON, written atomically."""
  write_text_atomically(path, json.dumps(obj, indent=2, sort_keys=True))


def read_jsonl(path: epath.Path) -> list[dict]:
  """The records of a JSONL file ([] when it does not exist). A torn last line (the process
  was killed while appending it) is dropped with a warning; a bad line elsewhere raises."""
  if not path.exists():
    return []
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  records = []
  for number, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if number < len(lines) - 1:
        raise ValueError(f"{path}: line {number + 1} is not JSON: {line[:80]!r}") from None
      logging.warning("%s: dropping a torn last line (the writer was killed): %r", path,
                      line[:80])
  return records


class JsonlHistory:
  """One JSONL file of records (each with a "step"), that the chief process writes.

  Appending a line is what a disk does well and an object store cannot do. So the records
  also live in memory, and:
  - on local disk each `append` writes its line through, so the file follows the run live;
  - on an object store the whole file is uploaded again at `flush()`, which the loop calls
    after each checkpoint and when the run ends. The file is small (one line per logged
    step), and uploading it per checkpoint instead of per record keeps the uploads linear
    in the run's length. Nothing of value waits in memory: records after the last
    checkpoint are recomputed by the run that resumes; TensorBoard shows the live metrics.

  A run that resumes from step `resume_step` drops the records after it (written by a run
  killed before it could checkpoint them), so a resumed run's history is an uninterrupted
  run's, without duplicates.
  """

  def __init__(self, path: epath.Path, *, writer: bool, resume_step: int):
    self.path, self._writer = path, writer
    records = read_jsonl(path)
    self.records = [r for r in records if r["step"] <= resume_step]
    self._pending = writer and len(self.records) != len(records)
    self.flush()  # the dropped records go now, before this run appends after them

  def append(self, record: dict) -> None:
    self.records.append(record)
    if not self._writer:
      return
    if is_local(self.path) and not self._pending:
      with self.path.open("a") as f:
        f.write(json.dumps(record) + "\n")
    else:
      self._pending = True

  def flush(self) -> None:
    """Makes the file hold every record (a no-op when it already does)."""
    if self._pending:
      write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in self.records))
      self._pending = False


def remove_if_empty(directories: Iterable[str]) -> None:
  """Removes these directories, innermost first, where they are (still) empty."""
  for directory in sorted(directories, key=len, reverse=True):
    try:
      os.rmdir(directory)
    except OSError:
      pass
