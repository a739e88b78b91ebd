"""What a checkpoint step holds, written once it is complete and checked before it is used.

Orbax and TensorStore verify neither array data nor metadata on read (their zarr3 `crc32c`
codec is not among the options Orbax's array handler exposes), so a flipped bit in a chunk
restores silently, and a truncated or missing file fails deep inside TensorStore. This module
adds an end-to-end check at the step level: after Orbax commits step N, the chief writes
`<step dir>/mixskd_digest.json`, the size and SHA-256 of every file of the step's array item,
and resuming compares them before restoring.

Left out of the digest: Orbax's commit markers and the step's `_CHECKPOINT_METADATA`, which
Orbax rewrites and restores without (their loss was always tolerated, and stays so).
Everything goes through `epath`, so a `gs://` workdir is checked the same way.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from etils import epath

from mixskd_jax.store import workdir as workdir_lib

DIGEST_FILE = "mixskd_digest.json"
FORMAT = 1
# Files Orbax writes, rewrites or tolerates the absence of; never part of the digest.
_UNCHECKED = frozenset({DIGEST_FILE, "commit_success.txt", "_CHECKPOINT_METADATA"})
_CHUNK = 1 << 20


def _sha256(path: epath.Path) -> str:
  h = hashlib.sha256()
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      h.update(chunk)
  return h.hexdigest()


def _files(step_dir: epath.Path) -> dict[str, epath.Path]:
  """The step's checked files by path relative to `step_dir` ('/'-separated)."""
  found = {}
  for root, _, names in step_dir.walk():
    root = epath.Path(root)
    relative_root = root.relative_to(step_dir)
    for name in names:
      if name in _UNCHECKED:
        continue
      relative = (relative_root / name).as_posix()
      found[relative.removeprefix("./")] = root / name
  return found


def write(step_dir: epath.Path, **extra: Any) -> None:
  """Records every checked file's size and SHA-256, plus `extra` (JSON values), atomically."""
  files = {rel: {"bytes": path.stat().length, "sha256": _sha256(path)}
           for rel, path in sorted(_files(step_dir).items())}
  workdir_lib.write_json(step_dir / DIGEST_FILE, {"format": FORMAT, "files": files, **extra})


def read(step_dir: epath.Path) -> dict | None:
  """The step's digest record, or None when it has none (or it is not valid JSON)."""
  path = step_dir / DIGEST_FILE
  if not path.exists():
    return None
  try:
    record = json.loads(path.read_text())
  except (ValueError, UnicodeDecodeError):
    return None
  return record if isinstance(record, dict) and "files" in record else None


def problem(step_dir: epath.Path) -> str | None:
  """What is wrong with the step's files, in a few words, or None when they match its digest.

  A step without a digest (written before digests existed, or killed between Orbax's commit
  and the digest) is not judged here: restoring it is the test.
  """
  record = read(step_dir)
  if record is None:
    if (step_dir / DIGEST_FILE).exists():
      return f"its {DIGEST_FILE} is unreadable"
    return None
  expected = record["files"]
  actual = _files(step_dir)
  missing = sorted(set(expected) - set(actual))
  if missing:
    return f"{missing[0]} is missing" + (f" (and {len(missing) - 1} more)"
                                         if len(missing) > 1 else "")
  extra = sorted(set(actual) - set(expected))
  if extra:
    return f"{extra[0]} was not part of it when it was written"
  for rel, want in expected.items():
    size = actual[rel].stat().length
    if size != want["bytes"]:
      return f"{rel} has {size} bytes, {want['bytes']} were written"
  for rel, want in expected.items():
    if _sha256(actual[rel]) != want["sha256"]:
      return f"{rel} differs from what was written (SHA-256 mismatch)"
  return None
