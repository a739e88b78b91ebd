"""Prepared datasets that are whole, prepared once, and read faults that say what to do.

- `preparing(builder)`: an exclusive lock (`flock`) per dataset on a local tfds data_dir while
  it is prepared. Runs started together on one machine (a sweep, several seeds) prepare it once:
  the first prepares, the others wait and then find it prepared. tfds builds into an
  `incomplete.*` folder and renames it when done; one left by a killed preparation is removed
  under the lock (nobody else is writing it then), so it never breaks the next run.
- `write_manifest` / `verify_prepared`: what was written at preparation (every file's size, and
  its SHA-256 for the datasets loaded whole into memory, which are small) is recorded next to
  the data; a prepared dataset whose files no longer match is refused in one line, before it
  is read into training. A dataset prepared elsewhere (no record) is checked against tfds's own
  `dataset_info.json`: each split's TFRecord files must hold its bytes plus 16 bytes of framing
  per record.
- `read_fault`: TensorFlow's errors for a record that cannot be read (cut short, a checksum
  that does not match, a shard gone, an image that does not decode) as one-line
  `DataFaultError`s that name the prepared folder and the fix.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
from typing import Iterator

from mixskd_jax.config.errors import DataFaultError

MANIFEST = "mixskd_prepared.json"
LOCK_SUFFIX = ".mixskd-prepare.lock"
TFRECORD_FRAMING_BYTES = 16  # per record: 8 (length) + 4 (its CRC) + 4 (the data's CRC)
_HASH_CHUNK = 1 << 20


def _is_local(path: str) -> bool:
  return "://" not in path


def delete_hint(folder: str) -> str:
  return (f"delete {folder} so that it is prepared again (the same command prepares it where "
          "its source is at hand), then rerun")


def lock_path(dataset_root: str) -> str:
  """The lock file of the dataset in `dataset_root` (`<data_dir>/<name>`): a hidden file beside
  it, `<data_dir>/.<name>.mixskd-prepare.lock` (tfds lists folders only)."""
  parent, name = os.path.split(dataset_root.rstrip("/"))
  return os.path.join(parent, f".{name}{LOCK_SUFFIX}")


def prepares_for_real(builder) -> bool:
  """False when tfds's `download_and_prepare` was replaced (`tfds.testing.mock_data`, tests'
  offline fixtures): then nothing is written to disk, and its folders may be tfds's own
  package metadata, where no lock or record belongs."""
  method = getattr(type(builder), "download_and_prepare", None)
  return getattr(method, "__module__", "").startswith("tensorflow_datasets.core")


@contextlib.contextmanager
def preparing(builder) -> Iterator[None]:
  """Holds the preparation lock of `builder`'s dataset (its folder `<data_dir>/<name>`) and
  removes the `incomplete.*` folders a killed preparation left there. A no-op on a remote
  data_dir (gs://...), where no lock can be taken, and when the preparation is mocked."""
  dataset_root = os.path.dirname(str(builder.data_dir))
  if not _is_local(dataset_root) or not prepares_for_real(builder):
    yield
    return
  path = lock_path(dataset_root)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a+") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released by the kernel if this process dies
    try:
      for stale in glob.glob(os.path.join(dataset_root, "incomplete.*")):
        shutil.rmtree(stale, ignore_errors=True)
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _data_files(folder: str) -> list[str]:
  return sorted(name for name in os.listdir(folder)
                if name != MANIFEST and os.path.isfile(os.path.join(folder, name)))


def write_manifest(builder, *, checksums: bool) -> None:
  """Records every file of `builder`'s prepared dataset: its size, and its SHA-256 if
  `checksums`. Written to a temporary name and renamed, so a kill leaves no half record."""
  folder = str(builder.data_dir)
  if not _is_local(folder) or not os.path.isdir(folder) or not prepares_for_real(builder):
    return
  files = {}
  for name in _data_files(folder):
    path = os.path.join(folder, name)
    files[name] = {"bytes": os.path.getsize(path)}
    if checksums:
      files[name]["sha256"] = _sha256(path)
  tmp = os.path.join(folder, f".{MANIFEST}.{os.getpid()}")
  with open(tmp, "w") as f:
    json.dump({"files": files}, f, indent=1)
  os.replace(tmp, os.path.join(folder, MANIFEST))


def _verify_manifest(folder: str, manifest: dict, checksums: bool) -> None:
  for name, record in sorted(manifest["files"].items()):
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      raise DataFaultError(f"The prepared dataset {folder} lacks {name}, written when it was "
                           f"prepared: {delete_hint(folder)}.")
    size = os.path.getsize(path)
    if size != record["bytes"]:
      raise DataFaultError(f"{path} holds {size} bytes, {record['bytes']} were written when the "
                           f"dataset was prepared: {delete_hint(folder)}.")
    if checksums and "sha256" in record and _sha256(path) != record["sha256"]:
      raise DataFaultError(f"{path} no longer has the SHA-256 it had when the dataset was "
                           f"prepared (same size, changed bytes): {delete_hint(folder)}.")


def _split_files(folder: str, info: dict, split: dict) -> list[str]:
  template = split.get("filepathTemplate") or "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
  shards = len(split.get("shardLengths") or [])
  names = []
  for index in range(shards):
    name = (template.replace("{DATASET}", info["name"]).replace("{SPLIT}", split["name"])
            .replace("{FILEFORMAT}", info.get("fileFormat", "tfrecord"))
            .replace("{SHARD_X_OF_Y}", f"{index:05d}-of-{shards:05d}")
            .replace("{SHARD_INDEX}", f"{index:05d}"))
    names.append(os.path.join(folder, name))
  return names


def _verify_against_tfds_info(folder: str) -> None:
  """Each TFRecord split holds what tfds's dataset_info.json says it wrote."""
  path = os.path.join(folder, "dataset_info.json")
  try:
    with open(path) as f:
      info = json.load(f)
  except (OSError, ValueError):
    return  # tfds itself refuses a folder without a readable dataset_info.json
  if info.get("fileFormat", "tfrecord") != "tfrecord":
    return
  for split in info.get("splits", []):
    if "numBytes" not in split or "shardLengths" not in split:
      continue
    files = _split_files(folder, info, split)
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
      raise DataFaultError(f"The prepared dataset {folder} lacks {os.path.basename(missing[0])} "
                           f"({split['name']} split, listed in dataset_info.json): "
                           f"{delete_hint(folder)}.")
    records = sum(int(n) for n in split["shardLengths"])
    expected = int(split["numBytes"]) + TFRECORD_FRAMING_BYTES * records
    found = sum(os.path.getsize(f) for f in files)
    if found != expected:
      where = files[0] if len(files) == 1 else f"the {split['name']} split's {len(files)} files"
      raise DataFaultError(f"{where} hold{'s' if len(files) == 1 else ''} {found} bytes, "
                           f"dataset_info.json says {expected} were written "
                           f"({records} records): {delete_hint(folder)}.")


def verify_prepared(folder: str, *, checksums: bool) -> None:
  """Raises DataFaultError (one line, naming the file and the fix) when the prepared dataset in
  `folder` no longer matches what was written: against the record of `write_manifest` where
  there is one (sizes, and checksums if `checksums`), else against tfds's dataset_info.json."""
  if not _is_local(folder) or not os.path.isdir(folder):
    return
  manifest_path = os.path.join(folder, MANIFEST)
  if os.path.isfile(manifest_path):
    try:
      with open(manifest_path) as f:
        manifest = json.load(f)
      manifest["files"].items()
    except (OSError, ValueError, KeyError, AttributeError):
      manifest = None  # a damaged record: fall back to tfds's own
    if manifest is not None:
      _verify_manifest(folder, manifest, checksums)
      return
  _verify_against_tfds_info(folder)


# TensorFlow's errors for a record that cannot be read; matched by name so that this module
# does not import TensorFlow.
_READ_ERRORS = {"DataLossError", "NotFoundError"}
_DECODE = re.compile(r"jpeg|png|decode|image", re.IGNORECASE)


def read_fault(error: BaseException, folder: str, *, what: str = "") -> DataFaultError | None:
  """The one-line DataFaultError for a TensorFlow read error met while reading the prepared
  dataset in `folder`, or None when `error` is not one (a bug, not damaged data)."""
  name = type(error).__name__
  module = type(error).__module__ or ""
  if not module.startswith("tensorflow"):
    return None
  if name not in _READ_ERRORS and not (name == "InvalidArgumentError"
                                       and _DECODE.search(str(error))):
    return None
  detail = " ".join(str(getattr(error, "message", error)).split())
  detail = re.split(r"\s*\[\[", detail)[0][:300]  # the message, not TensorFlow's op trace
  return DataFaultError(f"A damaged record in the prepared dataset {folder}{what} ({name}: "
                        f"{detail}): {delete_hint(folder)}.")
