"""Is the run's dataset prepared, or can it be prepared here? (`check_dataset`)

A dataset that tfds would download, on a machine that cannot reach the download host, fails at
once with what to do, instead of tfds retrying for minutes and leaving empty folders behind.
The probe is a 3-second TCP connect to the download host (or to the configured HTTP(S) proxy);
with the network there, downloading stays the default. `MIXSKD_ASSUME_OFFLINE=1` skips the
probe and treats the machine as offline (tests, air-gapped clusters). An explicit
`config.data.idx_dir` without the Fashion-MNIST IDX files fails at once: the user pointed at
local files, so a download is never the fallback. Data that is there but damaged fails here
too, in one line (`DataFaultError`): an IDX file cut short or not IDX (read through, about a
second), a prepared dataset whose files no longer match what was written
(`data.integrity.verify_prepared`).

The errors are `PreflightError`s and also the data package's own error types
(`DatasetUnavailableError`, `FashionMNISTMissingError`), so code that catches those keeps
working. TensorFlow is imported only when a dataset is checked.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
import urllib.request

import ml_collections

from mixskd_jax.config.errors import PreflightError
from mixskd_jax.store.workdir import remove_if_empty

OFFLINE_ENV = "MIXSKD_ASSUME_OFFLINE"
PROBE_TIMEOUT_S = 3.0


def assume_offline() -> bool:
  return os.environ.get(OFFLINE_ENV, "") not in ("", "0")


def _probe_target(url: str) -> tuple[str, int]:
  """(host, port) a download of `url` connects to first: the proxy when one is configured."""
  parsed = urllib.parse.urlparse(url)
  host = parsed.hostname or ""
  port = parsed.port or (443 if parsed.scheme == "https" else 80)
  proxies = urllib.request.getproxies()
  proxy = proxies.get(parsed.scheme)
  if proxy and not urllib.request.proxy_bypass(host):
    p = urllib.parse.urlparse(proxy if "://" in proxy else "http://" + proxy)
    return p.hostname or host, p.port or 80
  return host, port


def reachable(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
  """Whether a TCP connection to `url`'s host (or proxy) opens within `timeout_s` (name
  resolution included: it runs in a thread that is abandoned when it overruns)."""
  host, port = _probe_target(url)
  result = []

  def attempt():
    try:
      socket.create_connection((host, port), timeout=timeout_s).close()
      result.append(True)
    except OSError:
      result.append(False)

  thread = threading.Thread(target=attempt, daemon=True)
  thread.start()
  thread.join(timeout_s + 1.0)
  return bool(result) and result[0]


def _directories(root: str, depth: int = 3) -> set:
  """The directories under `root`, `depth` levels down (tfds's folders are shallow)."""
  found = set()
  if not os.path.isdir(root):
    return found
  level = [root]
  for _ in range(depth + 1):
    found.update(level)
    nxt = []
    for directory in level:
      try:
        with os.scandir(directory) as entries:
          nxt += [e.path for e in entries if e.is_dir(follow_symlinks=False)]
      except OSError:
        pass
    level = nxt
  return found


_OFFLINE_ERRORS = {}


def offline_error_types() -> tuple[type, type]:
  """(OfflineDatasetError, OfflineFashionMNISTError): PreflightErrors that are also
  `data.DatasetUnavailableError` and `data.FashionMNISTMissingError` (built on first use: the
  data package imports TensorFlow)."""
  if not _OFFLINE_ERRORS:
    # pylint: disable=import-outside-toplevel  (TensorFlow: only when an error is raised)
    from mixskd_jax.data.fashion_mnist_local import FashionMNISTMissingError
    from mixskd_jax.data.sources import DatasetUnavailableError
    _OFFLINE_ERRORS["dataset"] = type("OfflineDatasetError",
                                      (PreflightError, DatasetUnavailableError), {})
    _OFFLINE_ERRORS["fashion_mnist"] = type("OfflineFashionMNISTError",
                                            (PreflightError, FashionMNISTMissingError), {})
  return _OFFLINE_ERRORS["dataset"], _OFFLINE_ERRORS["fashion_mnist"]


def _remove_new_directories(root: str, before: set, existed: bool) -> None:
  """Removes the empty folders that appeared under the data_dir `root` since `before` (and
  `root` itself when it did not exist), so a failing check leaves nothing behind."""
  remove_if_empty(_directories(root) - before)
  if not existed:
    remove_if_empty([root])


def idx_dir_error_type() -> type:
  """IdxDirError: a PreflightError that is also `data.FashionMNISTMissingError` (built on
  first use, like `offline_error_types`)."""
  if "idx_dir" not in _OFFLINE_ERRORS:
    # pylint: disable-next=import-outside-toplevel  (TensorFlow: only when an error is raised)
    from mixskd_jax.data.fashion_mnist_local import FashionMNISTMissingError
    _OFFLINE_ERRORS["idx_dir"] = type("IdxDirError", (PreflightError, FashionMNISTMissingError),
                                      {})
  return _OFFLINE_ERRORS["idx_dir"]


def _check_idx_dir(idx_dir: str, builder, root: str, before: set, existed: bool) -> None:
  """Raises IdxDirError when the explicitly configured `idx_dir` lacks any of the 4 IDX
  files (Fashion-MNIST not prepared in the data_dir): the run would otherwise fall back to a
  tfds download, minutes of retries offline, although the user pointed at local files."""
  from mixskd_jax.data import fashion_mnist_local  # pylint: disable=import-outside-toplevel
  files = list(fashion_mnist_local.IDX_FILES.values())
  missing = [f for f in files if not os.path.isfile(os.path.join(idx_dir, f))]
  if not missing:
    return
  _remove_new_directories(root, before, existed)
  where = ("does not exist" if not os.path.exists(idx_dir)
           else "is not a directory" if not os.path.isdir(idx_dir)
           else f"lacks {', '.join(missing)}")
  raise idx_dir_error_type()(
      f"config.data.idx_dir={idx_dir} {where}, and fashion_mnist is not prepared in tfds "
      f"data_dir {builder.data_dir_root}. Put the 4 IDX files ({', '.join(files)}) in "
      f"{idx_dir}; or unset --config.data.idx_dir to use {fashion_mnist_local.DEFAULT_IDX_DIR} "
      "(apt-get install dataset-fashion-mnist) or a tfds download; or "
      "--config.data.data_dir=DIR where fashion_mnist is prepared.")


def check_dataset(data_config: ml_collections.ConfigDict) -> None:
  """Raises (a PreflightError that is also the data package's error) when `config.data`'s
  dataset is not prepared, needs a download and the download host cannot be reached.

  Mirrors `data.sources.get_builder`'s order: prepared tfds data, then (Fashion-MNIST) the
  local IDX files, then a tfds download; except that an explicit `config.data.idx_dir` that
  lacks an IDX file fails here (`IdxDirError`) instead of downloading. ImageNet builds from
  `manual_dir` and never downloads, so it is left to tfds. Creates no folder in the data_dir
  (a failing check removes any empty one that appeared while it looked).
  """
  # pylint: disable=import-outside-toplevel  (TensorFlow: only when a dataset is checked)
  from mixskd_jax.data import datasets, integrity
  spec = datasets.get_spec(data_config.name)
  import tensorflow_datasets as tfds
  from mixskd_jax.data import fashion_mnist_local
  root = os.path.expanduser(data_config.data_dir or tfds.core.constants.DATA_DIR)
  existed = os.path.exists(root)
  before = _directories(root)
  builder = tfds.builder(spec.tfds_name, data_dir=data_config.data_dir)
  if builder.is_prepared():
    # Whole as written: sizes, and checksums of the small datasets read whole into memory.
    integrity.verify_prepared(str(builder.data_dir), checksums=spec.in_memory)
    return
  if spec.name == "imagenet2012":
    return  # built from config.data.manual_dir, never downloaded: tfds checks the tars
  if spec.name == "fashion_mnist" and data_config.idx_dir:
    _check_idx_dir(data_config.idx_dir, builder, root, before, existed)
    fashion_mnist_local.check_idx_files(data_config.idx_dir)  # damaged: one line, now
    return  # the files are there: get_builder prepares from them
  idx_dir = fashion_mnist_local.DEFAULT_IDX_DIR
  if spec.name == "fashion_mnist" and fashion_mnist_local.has_idx_files(idx_dir):
    fashion_mnist_local.check_idx_files(idx_dir)
    return
  urls = list(getattr(builder, "url_infos", None) or {})
  if not urls or not integrity.prepares_for_real(builder):
    return  # nothing known to probe, or tfds is mocked: get_builder decides
  if not assume_offline() and reachable(urls[0]):
    return  # online: tfds downloads it
  _remove_new_directories(root, before, existed)  # offline: nothing of this check stays
  host, port = _probe_target(urls[0])
  why = (f"{OFFLINE_ENV} is set" if assume_offline()
         else f"cannot connect to {host}:{port}")
  offline_dataset, offline_fashion_mnist = offline_error_types()
  if spec.name == "fashion_mnist":
    missing = ", ".join(fashion_mnist_local.IDX_FILES.values())
    raise offline_fashion_mnist(
        f"Fashion-MNIST is not prepared in tfds data_dir {builder.data_dir_root}, the IDX files "
        f"({missing}) are not all in {idx_dir}, and this machine is offline ({why}), so tfds "
        "cannot download it. Fix one of: apt-get install dataset-fashion-mnist (IDX files in "
        f"{fashion_mnist_local.DEFAULT_IDX_DIR}); or --config.data.idx_dir=DIR with the 4 IDX "
        "files; or --config.data.data_dir=DIR where fashion_mnist is prepared.")
  raise offline_dataset(
      f"Dataset {spec.name} is not prepared in tfds data_dir {builder.data_dir_root}, and this "
      f"machine is offline ({why}), so tfds cannot download it. Prepare it where there is "
      f"network (tfds build {spec.tfds_name} --data_dir=DIR, or this same command) and set "
      "--config.data.data_dir=DIR to that folder; or run here with network access.")
