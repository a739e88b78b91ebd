"""Reading a trained model from disk, whoever wrote it: `load_trained(path) -> Trained`.

Three kinds of directory hold one (`config.init_from.path`, the export command):

- a training workdir of ours: its newest checkpoint under `<workdir>/checkpoints/`, with the
  run's `config.json` (model name, MixSKD or plain);
- one step directory of such a workdir, `<workdir>/checkpoints/<N>` (an older step);
- a directory `python -m mixskd_jax.interop` wrote (`model.json` + `variables/`): an official
  PyTorch checkpoint, converted.

A checkpoint step is checked against its digest (`checkpoint_digest`, as resuming does) before
it is read: a damaged step is an error, never silently used, and never moved (the source is
someone else's workdir, read-only here). Only `params` and `batch_stats` are read, as numpy
arrays on the host: the source run's optimizer, method state and device count do not matter.

`transfer` starts a run's model from one (`config.init_from`): the source's backbone (a MixSKD
network's `backbone` sub-tree, a plain model's whole tree) replaces the target's backbone (a
plain model's whole tree, a MixSKD network's `backbone`); the classifier head `fc` stays fresh
unless kept, and a MixSKD target's branches, self-teacher and discriminators stay freshly
initialized (the source's branches were trained for its own head and classes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging as py_logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from mixskd_jax.config.errors import PreflightError
from mixskd_jax.interop.checkpoint_io import load_converted
from mixskd_jax.models import staged
from mixskd_jax.models.staged import BACKBONE, HEAD
from mixskd_jax.store import checkpoint_digest
from mixskd_jax.store import workdir as workdir_lib

CHECKPOINTS_DIR = "checkpoints"  # store/checkpoint.py's <workdir>/checkpoints
CONFIG_FILE = "config.json"      # run/run_guard.py's
CONVERTED_METADATA = "model.json"  # interop/checkpoint_io.py's
ITEM_DIR = "default"  # where a CheckpointManager with one unnamed item puts its arrays
COLLECTIONS = ("params", "batch_stats")


class PretrainedError(PreflightError, ValueError):
  """The path holds no readable trained model, or one that does not fit the run's model; the
  message is one line that says why and what to pass (the command exits with status 2)."""


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained model as read from disk.

  Attributes:
    variables: {'params': ..., 'batch_stats': ...}, nested dicts of numpy arrays, the whole
      tree as saved (a MixSKD network's branches, self-teacher and discriminators included).
    model_name: the registry name (`mixskd_jax.models.SPECS`), e.g. "cifar_resnet18".
    num_classes: outputs of the backbone's head `fc`.
    mixskd: True when `variables` are a `MixSKDNetwork`'s (the backbone under 'backbone'),
      False for a plain `StagedClassifier`.
    source: what was read: the step directory or the converted directory.
  """
  variables: dict
  model_name: str
  num_classes: int
  mixskd: bool
  source: str


def backbone_variables(trained: Trained) -> dict:
  """The plain backbone's {'params', 'batch_stats'} (a `StagedClassifier`'s tree, head `fc`
  included): a MixSKD network's `backbone` sub-tree, a plain model's whole tree."""
  if not trained.mixskd:
    return trained.variables
  return staged.backbone_variables(trained.variables)


def transfer(target: dict, trained: Trained, *, mixskd: bool, model_name: str,
             keep_head: bool = False) -> tuple[dict, str]:
  """The run's fresh variables with their backbone taken from `trained`.

  Args:
    target: the run's freshly initialized {'params', 'batch_stats'} (host arrays).
    trained: the source (`load_trained`).
    mixskd: whether `target` is a MixSKD network's (its backbone under 'backbone').
    model_name: `config.model.name`, for the messages.
    keep_head: also copy the head `fc` (it must have the same shape: the same classes).

  Returns:
    (variables, what): `target` with every backbone leaf replaced by the source's (numpy,
    cast to the target's dtype), and one line saying what was loaded from where and what
    stayed fresh.

  Raises:
    PretrainedError: a backbone leaf missing on either side or shaped differently, in one
      line naming the first such path, both shapes and the likely fix.
  """
  source = backbone_variables(trained)
  out, counts = {}, {}
  for collection in COLLECTIONS:
    tree = target.get(collection, {})
    new, counts[collection] = _copy_backbone(
        tree.get(BACKBONE, {}) if mixskd else tree, source.get(collection, {}),
        collection=collection, keep_head=keep_head, trained=trained, model_name=model_name)
    out[collection] = {**tree, BACKBONE: new} if mixskd else new
  parts = sorted(set(source["params"]) - (set() if keep_head else {HEAD}))
  fresh = ([] if keep_head else [f"the head {HEAD}"]) + (
      sorted(k for k in target["params"] if k != BACKBONE) if mixskd else [])
  what = (f"init_from: loaded the backbone ({', '.join(parts)}: {counts['params']} params, "
          f"{counts['batch_stats']} batch_stats arrays) of {trained.model_name} from "
          f"{trained.source}; fresh: {', '.join(fresh) if fresh else 'nothing'}.")
  return out, what


def _copy_backbone(dst_tree: dict, src_tree: dict, *, collection: str, keep_head: bool,
                   trained: Trained, model_name: str) -> tuple[dict, int]:
  """One collection of the target's backbone with the source's leaves; (tree, leaves copied).
  The head is left as it is unless `keep_head`."""
  where = f"config.init_from.path={trained.source!r}"
  fix = (f"the checkpoint is {trained.model_name}, config.model.name is {model_name}: set "
         f"config.model.name={trained.model_name!r}" if trained.model_name != model_name
         else f"build the model the checkpoint's run built ({trained.model_name})")
  dst = traverse_util.flatten_dict(dict(dst_tree), sep="/")
  src = traverse_util.flatten_dict(dict(src_tree), sep="/")
  copied = 0
  for path in sorted(set(src) | set(dst)):
    is_head = path.split("/")[0] == HEAD
    if is_head and not keep_head:
      continue
    name = f"{collection}/{path}"
    if path not in src:
      raise PretrainedError(f"{where}: {name} of the model is not in the checkpoint's "
                            f"backbone; {fix}.")
    if path not in dst:
      raise PretrainedError(f"{where}: the checkpoint's backbone has {name}, which the model "
                            f"lacks; {fix}.")
    have, want = tuple(np.shape(src[path])), tuple(np.shape(dst[path]))
    if have != want:
      if is_head:  # the same backbone, another number of classes
        fix = (f"the checkpoint has {trained.num_classes} classes: set "
               "config.init_from.keep_head=False for a fresh head")
      raise PretrainedError(f"{where}: {name} is {have} in the checkpoint and {want} in the "
                            f"model; {fix}.")
    dst[path] = np.asarray(src[path], dtype=dst[path].dtype)
    copied += 1
  return traverse_util.unflatten_dict(dst, sep="/"), copied


def load_trained(path: str) -> Trained:
  """Reads the trained model at `path` (a workdir, a step directory or a converted directory).

  Raises:
    PretrainedError: one line naming the path, what is wrong and what to pass instead (no
      such directory, no checkpoint, a damaged step, no config.json).
  """
  root = workdir_lib.resolve(path)
  if not root.exists():
    raise PretrainedError(f"{path!r} does not exist; pass a training workdir, one of its "
                          f"{CHECKPOINTS_DIR}/<step> directories, or a directory written by "
                          "`python -m mixskd_jax.interop`.")
  if (root / CONVERTED_METADATA).exists():
    return _load_converted(root)
  if (root / CHECKPOINTS_DIR).is_dir():
    steps = _step_dirs(root / CHECKPOINTS_DIR)
    if not steps:
      raise PretrainedError(f"{root / CHECKPOINTS_DIR} holds no checkpoint step; train that "
                            "workdir first, or pass another path.")
    return _load_step(steps[max(steps)], root)
  if root.name.isdigit() and root.parent.name == CHECKPOINTS_DIR:
    return _load_step(root, root.parent.parent)
  raise PretrainedError(f"{path!r} is neither a training workdir (no {CHECKPOINTS_DIR}/), a "
                        f"checkpoint step (<workdir>/{CHECKPOINTS_DIR}/<N>) nor a converted "
                        f"checkpoint (no {CONVERTED_METADATA}); pass one of those.")


def _step_dirs(directory: epath.Path) -> dict[int, epath.Path]:
  return {int(p.name): p for p in directory.iterdir() if p.name.isdigit() and p.is_dir()}


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0][:300]}" if lines else type(error).__name__


def _load_step(step_dir: epath.Path, workdir: epath.Path) -> Trained:
  """A checkpoint step of a training workdir, checked against its digest first."""
  damage = checkpoint_digest.problem(step_dir)
  if damage is not None:
    older = sorted(s for s in _step_dirs(step_dir.parent) if s < int(step_dir.name))
    fix = (f"pass an older step, e.g. {step_dir.parent / str(older[-1])}" if older
           else "retrain the source run")
    raise PretrainedError(f"Checkpoint {step_dir} is damaged ({damage}); it is not used: {fix}.")
  config_path = workdir / CONFIG_FILE
  if not config_path.exists():
    raise PretrainedError(f"{config_path} is missing, so the model that wrote {step_dir} is "
                          "unknown; pass a step inside a training workdir that has its "
                          "config.json.")
  model = json.loads(config_path.read_text()).get("model", {})
  item = step_dir / ITEM_DIR if (step_dir / ITEM_DIR).is_dir() else step_dir
  try:
    variables = _restore_collections(item)
  except Exception as e:  # pylint: disable=broad-except  (TensorStore, Orbax, OS errors)
    raise PretrainedError(f"Checkpoint {step_dir} cannot be read ({_first_line(e)}); pass "
                          "another step or workdir.") from e
  mixskd = bool(model.get("mixskd", BACKBONE in variables["params"]))
  return _trained(variables, model_name=str(model.get("name")), mixskd=mixskd,
                  source=os.fspath(step_dir))


def _restore_collections(item: epath.Path) -> dict[str, Any]:
  """params and batch_stats of a saved TrainState, as numpy arrays, whatever the rest holds
  (the optimizer's state is skipped: the source's optimizer need not be known) and whatever
  devices wrote it (host arrays ignore the saved sharding)."""
  checkpointer = ocp.PyTreeCheckpointer()
  with _without_step_metadata_warning():
    saved = checkpointer.metadata(item).item_metadata.tree
    missing = [c for c in COLLECTIONS if c not in saved]
    if missing:
      raise KeyError(f"the saved tree has no {missing[0]!r} (top-level keys: {sorted(saved)})")
    wanted = {c: saved[c] for c in COLLECTIONS}
    as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                      wanted)
    target = jax.tree_util.tree_map(lambda m: np.zeros(m.shape, m.dtype), wanted)
    return checkpointer.restore(item, args=ocp.args.PyTreeRestore(
        item=target, restore_args=as_numpy, partial_restore=True))


class _StepMetadataWarning(py_logging.Filter):
  def filter(self, record: py_logging.LogRecord) -> bool:
    return "Metadata file does not exist" not in record.getMessage()


@contextlib.contextmanager
def _without_step_metadata_warning():
  """Reading the item directory alone, Orbax warns that the step's `_CHECKPOINT_METADATA`
  (one level up, which the manager keeps) is not in it: true, and no sign of damage."""
  logger, quiet = py_logging.getLogger("absl"), _StepMetadataWarning()
  logger.addFilter(quiet)
  try:
    yield
  finally:
    logger.removeFilter(quiet)


def _load_converted(root: epath.Path) -> Trained:
  """What `python -m mixskd_jax.interop` (interop.save_converted) wrote."""
  meta = json.loads((root / CONVERTED_METADATA).read_text())
  try:
    _, variables = load_converted(os.fspath(root))
  except Exception as e:  # pylint: disable=broad-except  (TensorStore, Orbax, OS errors)
    raise PretrainedError(f"The converted checkpoint {root} cannot be read ({_first_line(e)}); "
                          "convert it again with `python -m mixskd_jax.interop`.") from e
  variables = {c: jax.tree_util.tree_map(np.asarray, dict(variables.get(c, {})))
               for c in COLLECTIONS}
  return _trained(variables, model_name=str(meta["model"]), mixskd=bool(meta["mixskd"]),
                  source=os.fspath(root))


def _trained(variables: dict, *, model_name: str, mixskd: bool, source: str) -> Trained:
  """Trained, its class count read from the backbone head's kernel (N_features, C)."""
  params = variables["params"]
  backbone = params.get(BACKBONE, {}) if mixskd else params
  if HEAD not in backbone or "kernel" not in backbone[HEAD]:
    raise PretrainedError(f"{source} has no classifier head '{HEAD}' in its "
                          f"{BACKBONE if mixskd else 'parameters'} (top-level keys: "
                          f"{sorted(backbone)}); it is not a model of mixskd_jax.models.")
  num_classes = int(np.shape(backbone[HEAD]["kernel"])[-1])
  return Trained(variables=variables, model_name=model_name, num_classes=num_classes,
                 mixskd=mixskd, source=source)
