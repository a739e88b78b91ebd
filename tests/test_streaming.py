"""Tests of the streamed train order (mixskd_jax/data/streaming.py): explicit epochs, exact
and cheap resume, disjoint per-process shares.

Most run on a tiny real imagenet2012 (`tests/fake_imagenet.py`: 60 training images in 4
TFRecord shards), because `tfds.testing.mock_data` ignores splits and file shuffling.
"""

import collections
import os

import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mixskd_jax import data
from mixskd_jax.config.schema import base_config
from mixskd_jax.data import sources
from mixskd_jax.data import streaming
from mixskd_jax.data.tf_setup import hide_accelerators_from_tf
from tests import fake_imagenet
from tests.test_data import assert_batches_equal, take

hide_accelerators_from_tf()

BATCH = 6  # 60 // 6 = 10 steps per epoch


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return fake_imagenet.prepare(str(tmp_path_factory.mktemp("imagenet")))


def make_config(data_dir=None, batch_size=BATCH, augment=True, shuffle_buffer=8):
  c = base_config()
  c.data.name = "imagenet2012"
  c.data.data_dir = data_dir
  c.data.augment = augment
  c.data.shuffle_buffer = shuffle_buffer
  c.batch_size = batch_size
  return c


def keys(batches):
  """Identity of each example of each batch (augmentation off: the image determines it)."""
  return [im.tobytes() for b in batches for im in b["image"]]


def test_resume_yields_the_uninterrupted_batches(data_dir):
  c = make_config(data_dir)
  full = take(data.train_iterator(c), 25)
  for k in (4, 10, 23):  # inside epoch 0, at the boundary of epoch 1, inside epoch 2
    assert_batches_equal(take(data.train_iterator(c, start_step=k), 25 - k), full[k:])


def test_resume_on_mock_data():
  c = make_config(batch_size=4)
  with tfds.testing.mock_data(num_examples=22):  # 5 steps per epoch, 2 examples dropped
    full = take(data.train_iterator(c), 13)
    for k in (3, 5, 11):
      assert_batches_equal(take(data.train_iterator(c, start_step=k), 13 - k), full[k:])


def test_every_epoch_visits_each_example_once_in_a_new_order(data_dir):
  batches = take(data.train_iterator(make_config(data_dir, augment=False)), 30)
  epochs = [keys(batches[10 * e:10 * (e + 1)]) for e in range(3)]
  for e in epochs:
    assert len(set(e)) == fake_imagenet.NUM_TRAIN
  assert set(epochs[0]) == set(epochs[1]) == set(epochs[2])
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != epochs[2]


def test_processes_read_disjoint_shares_in_every_epoch(data_dir):
  c = make_config(data_dir, augment=False)
  streams = [take(data.train_iterator(c, process_index=p, process_count=2), 20) for p in (0, 1)]
  for e in range(2):
    shares = [keys(s[10 * e:10 * (e + 1)]) for s in streams]
    assert len(shares[0]) == len(shares[1]) == 30
    assert not set(shares[0]) & set(shares[1])
    assert len(set(shares[0]) | set(shares[1])) == fake_imagenet.NUM_TRAIN
  # A process keeps its share across epochs (tfds.split_for_jax_process), in a new order.
  assert set(keys(streams[0][:10])) == set(keys(streams[0][10:]))


def test_a_late_resume_reads_only_its_epoch_and_starts_the_next(data_dir, monkeypatch):
  """Resuming at step 405 (epoch 40) must not replay the 2430 records of epochs 0-39."""
  reads, seeds = collections.Counter(), []
  get_builder = sources.get_builder

  def counting_builder(data_config):
    builder = get_builder(data_config)
    as_dataset = builder.as_dataset

    def counted(*args, read_config, **kwargs):
      seeds.append(read_config.shuffle_seed)
      tick = lambda: reads.update(["records"]) or 0  # noqa: E731
      return as_dataset(*args, read_config=read_config, **kwargs).map(
        lambda ex: (tf.py_function(tick, [], tf.int32), ex)[1])
    builder.as_dataset = counted
    return builder
  monkeypatch.setattr(sources, "get_builder", counting_builder)
  c = make_config(data_dir)
  batch = next(data.train_iterator(c, start_step=405))
  assert batch["image"].shape == (BATCH, 224, 224, 3)
  assert seeds == [streaming.epoch_seeds(c.seed, e)[0] for e in (40, 41)]
  # Skipped 5 batches + read one, plus at most epoch 41's share read ahead: <= 2 epochs.
  assert 6 * BATCH <= reads["records"] <= 2 * fake_imagenet.NUM_TRAIN


def test_epoch_seeds_are_a_pure_function_of_seed_and_epoch():
  assert streaming.epoch_seeds(3, 7) == streaming.epoch_seeds(3, 7)
  assert len({streaming.epoch_seeds(s, e) for s in range(3) for e in range(3)}) == 9


def test_next_epoch_starts_ahead_and_its_errors_surface_when_reached():
  started = []

  def start(epoch):
    started.append(epoch)
    if epoch == 2:  # an epoch whose first batch fails
      return tf.data.Dataset.from_tensor_slices(["epoch 2 is broken"]).map(tf.strings.to_number)
    return tf.data.Dataset.from_tensor_slices([10 * epoch, 10 * epoch + 1])

  stream = streaming._started_ahead(start, 0)  # pylint: disable=protected-access
  assert next(stream) == 0 and started == [0, 1]  # epoch 1 started before epoch 0 is consumed
  assert [next(stream) for _ in range(3)] == [1, 10, 11] and started == [0, 1, 2]
  with pytest.raises(tf.errors.InvalidArgumentError, match="epoch 2 is broken"):
    next(stream)


def test_bad_fields_name_the_config_field():
  assert base_config().data.shuffle_buffer == 10_000
  with pytest.raises(ValueError, match=r"config\.data\.shuffle_buffer=0 must be >= 1"):
    data.train_iterator(make_config(shuffle_buffer=0))
  c = make_config()
  c.seed = -1
  with pytest.raises(ValueError, match=r"config\.seed=-1 must be >= 0"):
    data.train_iterator(c)


def test_a_damaged_shard_surfaces_mid_stream_as_a_data_fault(data_dir, tmp_path):
  """A changed byte in one training shard (same size: the preflight's size check passes) is
  met part way through the stream as TensorFlow's DataLossError, which `integrity.read_fault`
  makes the one-line fault the training loop saves and stops on (tests/test_data_faults.py)."""
  import shutil  # pylint: disable=import-outside-toplevel
  from mixskd_jax.data import integrity  # pylint: disable=import-outside-toplevel
  copy = str(tmp_path / "tfds")
  shutil.copytree(data_dir, copy)
  folder = str(tfds.builder("imagenet2012", data_dir=copy).data_dir)
  shard = sorted(os.path.join(folder, n) for n in os.listdir(folder) if "-train.tfrecord" in n)[1]
  with open(shard, "r+b") as f:
    f.seek(os.path.getsize(shard) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0xFF]))
  integrity.verify_prepared(folder, checksums=False)  # sizes as written: not found up front
  iterator = data.train_iterator(make_config(copy, augment=False))
  with pytest.raises(tf.errors.DataLossError) as e:
    take(iterator, 10)  # one epoch reads every shard
  fault = integrity.read_fault(e.value, folder)
  assert str(fault).startswith(f"A damaged record in the prepared dataset {folder} "
                               "(DataLossError: ")
