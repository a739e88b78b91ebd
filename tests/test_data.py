"""Tests of mixskd_jax.data: registry, offline Fashion-MNIST builder, augmentation, pipelines.

Pipelines run on `tfds.testing.mock_data` (random, deterministic examples; train and test
splits hold the same examples). The offline builder runs on the real Debian IDX files.
"""

import collections
import gzip
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from mixskd_jax import data
from mixskd_jax.config.schema import base_config
from mixskd_jax.data import augment
from mixskd_jax.data import datasets
from mixskd_jax.data import fashion_mnist_local
from mixskd_jax.data import in_memory
from mixskd_jax.data import sources
from mixskd_jax.data.tf_setup import hide_accelerators_from_tf

hide_accelerators_from_tf()  # these tests also run TF ops eagerly


@pytest.fixture(autouse=True)
def _fresh_cache():
  data.clear_cache()
  yield
  data.clear_cache()


def make_config(name="cifar10", batch_size=8, eval_batch_size=6, **data_fields):
  c = base_config()
  c.data.name = name
  c.batch_size = batch_size
  c.eval_batch_size = eval_batch_size
  c.data.shuffle_buffer = 16  # imagenet only; small so mock runs stay fast
  for k, v in data_fields.items():
    setattr(c.data, k, v)
  return c


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def image_keys(images):
  return collections.Counter(im.tobytes() for im in images)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


def test_registry_facts():
  want = {"fashion_mnist": (10, (28, 28, 1), "test", 2), "cifar10": (10, (32, 32, 3), "test", 4),
          "cifar100": (100, (32, 32, 3), "test", 4),
          "imagenet2012": (1000, (224, 224, 3), "validation", 0)}
  assert set(datasets.SPECS) == set(want)
  for name, (classes, shape, test_split, pad) in want.items():
    spec = datasets.get_spec(name)
    assert (spec.num_classes, spec.image_shape, spec.test_split, spec.crop_padding) == (
      classes, shape, test_split, pad)
    assert spec.train_split == "train"
    assert len(spec.mean) == len(spec.std) == shape[2]
  assert datasets.get_spec("cifar100").mean == (0.5071, 0.4867, 0.4408)
  assert datasets.get_spec("cifar100").std == (0.2675, 0.2565, 0.2761)
  assert datasets.get_spec("imagenet2012").std == (0.229, 0.224, 0.225)


def test_unknown_dataset_is_a_clear_error():
  c = make_config("mnist")
  for fn in (lambda: data.get_dataset_info(c.data), lambda: data.train_iterator(c),
             lambda: data.eval_iterator(c), lambda: data.steps_per_epoch(c)):
    with pytest.raises(ValueError, match=r"config\.data\.name='mnist'.*cifar10.*imagenet2012"):
      fn()


def test_dataset_info_under_mock():
  c = make_config("cifar100", test_examples=20)
  with tfds.testing.mock_data(num_examples=48):
    info = data.get_dataset_info(c.data)
  assert info == data.DatasetInfo(
    name="cifar100", num_classes=100, image_shape=(32, 32, 3), num_train=48, num_test=20,
    mean=(0.5071, 0.4867, 0.4408), std=(0.2675, 0.2565, 0.2761))


# ---------------------------------------------------------------------------
# Offline Fashion-MNIST
# ---------------------------------------------------------------------------


@pytest.mark.slow
def test_local_fashion_mnist_builder_on_the_debian_files(tmp_path):
  idx_dir = fashion_mnist_local.DEFAULT_IDX_DIR
  if not fashion_mnist_local.has_idx_files(idx_dir):
    pytest.skip("dataset-fashion-mnist is not installed")
  builder = fashion_mnist_local.fashion_mnist_builder(str(tmp_path))
  assert isinstance(builder, fashion_mnist_local.LocalFashionMNIST)
  # Prepared into the ordinary tfds folder: the stock builder now just loads it.
  stock = tfds.builder("fashion_mnist", data_dir=str(tmp_path))
  assert stock.is_prepared()
  assert stock.info.splits["train"].num_examples == 60000
  assert stock.info.splits["test"].num_examples == 10000
  assert type(fashion_mnist_local.fashion_mnist_builder(str(tmp_path))) is type(stock)

  c = make_config("fashion_mnist", data_dir=str(tmp_path))
  info = data.get_dataset_info(c.data)
  assert (info.num_train, info.num_test, info.image_shape) == (60000, 10000, (28, 28, 1))
  images, labels = sources.load_split(c.data, "train")
  assert images.shape == (60000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.dtype == np.int32 and labels.min() == 0 and labels.max() == 9
  # The hard-coded normalization constants are these pixels' statistics.
  spec = datasets.get_spec("fashion_mnist")
  assert abs(images.mean(dtype=np.float64) / 255 - spec.mean[0]) < 1e-6
  assert abs(images.std(dtype=np.float64) / 255 - spec.std[0]) < 1e-6

  idx_images = fashion_mnist_local.read_idx_images(
    os.path.join(idx_dir, "train-images-idx3-ubyte.gz"))
  with gzip.open(os.path.join(idx_dir, "train-labels-idx1-ubyte.gz")) as f:
    idx_label_bytes = f.read()
  idx_labels = np.frombuffer(idx_label_bytes, np.uint8, offset=8)
  # tfds stores examples in its own (hash-shuffled, deterministic) order, as a tfds download
  # would; so pair images with labels by content, both ways.
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.bincount(idx_labels))
  first_in_idx = np.flatnonzero((images == idx_images[0]).all(axis=(1, 2, 3)))
  assert len(first_in_idx) >= 1
  assert (labels[first_in_idx] == idx_label_bytes[8]).all()  # the file's first label byte
  first_in_tfds = np.flatnonzero((idx_images == images[0]).all(axis=(1, 2, 3)))
  assert (idx_labels[first_in_tfds] == labels[0]).all()


def test_fashion_mnist_missing_offline_is_a_clear_error(fashion_mnist_offline):
  data_dir, empty = fashion_mnist_offline
  c = make_config("fashion_mnist", data_dir=data_dir, idx_dir=empty)
  with pytest.raises(data.FashionMNISTMissingError) as e:
    data.get_dataset_info(c.data)
  message = str(e.value)
  assert "dataset-fashion-mnist" in message and "config.data.idx_dir" in message
  assert str(empty) in message and "no network" in message


# ---------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------


def _seed(i):
  return augment.example_seed(0, 0, i)


@pytest.mark.parametrize("size,pad", [(32, 4), (28, 2)])
def test_pad_crop_flip_moves_a_pixel_by_at_most_pad(size, pad):
  r, c = 10, 12
  image = np.zeros((size, size, 3), np.uint8)
  image[r, c] = (200, 100, 50)
  shifts, flips = set(), set()
  for i in range(60):
    out = augment.pad_crop_flip(tf.constant(image), _seed(i), pad).numpy()
    assert out.shape == image.shape and out.dtype == np.uint8
    (rr,), (cc,) = np.nonzero(out[..., 0])
    np.testing.assert_array_equal(out[rr, cc], (200, 100, 50))
    assert abs(rr - r) <= pad
    flipped = abs(cc - c) > pad
    if flipped:
      assert abs((size - 1 - cc) - c) <= pad
    shifts.add((rr - r, (size - 1 - cc if flipped else cc) - c))
    flips.add(flipped)
  assert flips == {False, True}
  assert len(shifts) > 10  # many different offsets


def test_flip_mirrors_exactly():
  image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  seen = set()
  for i in range(20):
    out = augment.pad_crop_flip(tf.constant(image), _seed(i), 0).numpy()
    if np.array_equal(out, image):
      seen.add("same")
    else:
      np.testing.assert_array_equal(out, image[:, ::-1])
      seen.add("mirror")
  assert seen == {"same", "mirror"}


def test_example_seed_depends_on_every_part():
  seeds = {tuple(augment.example_seed(*a).numpy()) for a in [(0, 0, 0), (1, 0, 0), (0, 1, 0),
                                                             (0, 0, 1)]}
  assert len(seeds) == 4
  np.testing.assert_array_equal(augment.example_seed(3, 2, 1), augment.example_seed(3, 2, 1))


def test_random_resized_crop_window_follows_torchvision():
  hw = tf.constant([300, 400])
  fractions, ratios = [], []
  for i in range(200):
    top, left, h, w = augment.random_resized_crop_window(hw, _seed(i)).numpy()
    assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400 and h > 0 and w > 0
    fractions.append(h * w / (300 * 400))
    ratios.append(w / h)
  assert 0.07 < min(fractions) and max(fractions) <= 1.0 and np.ptp(fractions) > 0.5
  assert 0.7 < min(ratios) and max(ratios) < 1.4
  # A 1 x 100 strip fits no window: the fallback is the centered crop of ratio 4/3.
  top, left, h, w = augment.random_resized_crop_window(tf.constant([1, 100]), _seed(0)).numpy()
  assert (top, h, w, left) == (0, 1, 1, 49)


def test_random_resized_crop_flip_and_its_jpeg_twin():
  rng = np.random.default_rng(0)
  image = np.repeat(np.repeat(rng.integers(0, 256, (15, 20, 3), dtype=np.uint8), 8, 0), 8, 1)
  jpeg = tf.io.encode_jpeg(tf.constant(image), quality=100)
  decoded = tf.io.decode_jpeg(jpeg, channels=3)
  for i in range(5):
    out = augment.random_resized_crop_flip(decoded, _seed(i), size=64).numpy()
    twin = augment.decode_random_resized_crop_flip(jpeg, _seed(i), size=64).numpy()
    assert out.shape == twin.shape == (64, 64, 3) and out.dtype == twin.dtype == np.uint8
    assert np.abs(out.astype(int) - twin).mean() < 3  # same window, same flip


def test_resize_center_crop_is_exact_when_no_resize_is_needed():
  rng = np.random.default_rng(0)
  square = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
  np.testing.assert_array_equal(augment.resize_center_crop(tf.constant(square)),
                                square[16:240, 16:240])
  tall = rng.integers(0, 256, (512, 256, 3), dtype=np.uint8)
  np.testing.assert_array_equal(augment.resize_center_crop(tf.constant(tall)),
                                tall[144:368, 16:240])
  small = rng.integers(0, 256, (100, 150, 3), dtype=np.uint8)  # upsampled to 256 x 384
  assert augment.resize_center_crop(tf.constant(small)).shape == (224, 224, 3)


def test_normalize_matches_numpy():
  images = np.random.default_rng(0).integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
  mean, std = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
  got = data.normalize(images, mean, std)
  assert got.dtype == np.float32 and got.shape == images.shape
  want = (images / 255.0 - np.array(mean)) / np.array(std)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# Training pipeline
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,shape,classes", [
  ("fashion_mnist", (28, 28, 1), 10), ("cifar10", (32, 32, 3), 10),
  ("cifar100", (32, 32, 3), 100)])
def test_train_batches_shapes_and_dtypes(name, shape, classes):
  c = make_config(name, batch_size=8)
  with tfds.testing.mock_data(num_examples=40):
    batches = take(data.train_iterator(c, process_count=2, process_index=1), 6)
    assert data.steps_per_epoch(c) == 5
  for b in batches:
    assert set(b) == {"image", "label"}
    assert b["image"].shape == (4,) + shape and b["image"].dtype == np.uint8
    assert b["label"].shape == (4,) and b["label"].dtype == np.int32
    assert 0 <= b["label"].min() and b["label"].max() < classes


def test_without_augmentation_batches_are_the_permuted_examples():
  c = make_config(batch_size=8, augment=False)
  with tfds.testing.mock_data(num_examples=20):
    batches = take(data.train_iterator(c), 5)  # 2 steps per epoch: 2.5 epochs
    images, labels = sources.load_split(c.data, "train")
  for step, b in enumerate(batches):
    epoch, i = divmod(step, 2)
    rows = np.random.default_rng([c.seed, epoch]).permutation(20)[i * 8:(i + 1) * 8]
    np.testing.assert_array_equal(b["image"], images[rows])
    np.testing.assert_array_equal(b["label"], labels[rows])


def test_augmentation_changes_images_but_not_order():
  with tfds.testing.mock_data(num_examples=32):
    plain = take(data.train_iterator(make_config(augment=False)), 4)
    augmented = take(data.train_iterator(make_config(augment=True)), 4)
  changed = 0
  for p, a in zip(plain, augmented):
    np.testing.assert_array_equal(p["label"], a["label"])
    changed += sum(not np.array_equal(x, y) for x, y in zip(p["image"], a["image"]))
  assert changed >= 28  # an identity crop without flip has probability 1/162


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(process_count):
  c = make_config(batch_size=8)
  with tfds.testing.mock_data(num_examples=36):  # 4 steps per epoch, remainder 4 dropped
    whole = take(data.train_iterator(c), 9)
    parts = [take(data.train_iterator(c, process_index=p, process_count=process_count), 9)
             for p in range(process_count)]
  joined = [{k: np.concatenate([parts[p][s][k] for p in range(process_count)])
             for k in ("image", "label")} for s in range(9)]
  assert_batches_equal(joined, whole)


def test_same_seed_same_batches_other_seed_differs():
  with tfds.testing.mock_data(num_examples=32):
    a = take(data.train_iterator(make_config()), 5)
    b = take(data.train_iterator(make_config()), 5)
    c = make_config()
    c.seed = 1
    other = take(data.train_iterator(c), 5)
  assert_batches_equal(a, b)
  assert not all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, other))
  assert not all(np.array_equal(x["label"], y["label"]) for x, y in zip(a, other))


def test_start_step_resumes_exactly_across_epochs():
  c = make_config(batch_size=8)
  with tfds.testing.mock_data(num_examples=43):  # 5 steps per epoch
    full = take(data.train_iterator(c), 14)
    for k in (3, 5, 7):
      resumed = take(data.train_iterator(c, start_step=k), 14 - k)
      assert_batches_equal(resumed, full[k:])
    resumed = take(data.train_iterator(c, start_step=7, process_index=1, process_count=2), 3)
  for r, f in zip(resumed, full[7:]):
    np.testing.assert_array_equal(r["image"], f["image"][4:])


def test_each_epoch_visits_every_example_once():
  c = make_config(batch_size=8, augment=False)
  with tfds.testing.mock_data(num_examples=24):
    images, _ = sources.load_split(c.data, "train")
    batches = take(data.train_iterator(c), 6)
  for epoch in range(2):
    seen = np.concatenate([b["image"] for b in batches[3 * epoch:3 * epoch + 3]])
    assert image_keys(seen) == image_keys(images)
  assert not np.array_equal(batches[0]["image"], batches[3]["image"])  # reshuffled


def test_balanced_subset_and_cap():
  labels = np.array([2, 0, 1, 0, 2, 2, 1, 0, 1, 0])
  np.testing.assert_array_equal(sources.train_subset(labels, 3, 2, None), [0, 1, 2, 3, 4, 6])
  np.testing.assert_array_equal(sources.train_subset(labels, 3, 2, 4), [0, 1, 2, 3])
  np.testing.assert_array_equal(sources.train_subset(labels, 3, None, 3), [0, 1, 2])
  with pytest.raises(ValueError, match=r"train_examples_per_class=4.*class 1"):
    sources.train_subset(labels, 3, 4, None)

  c = make_config(batch_size=10, augment=False, train_examples_per_class=3)
  with tfds.testing.mock_data(num_examples=200):
    _, all_labels = sources.load_split(c.data, "train")
    assert data.get_dataset_info(c.data).num_train == 30
    assert data.steps_per_epoch(c) == 3
    epoch = np.concatenate([b["label"] for b in take(data.train_iterator(c), 3)])
  np.testing.assert_array_equal(np.bincount(epoch, minlength=10), [3] * 10)
  assert all(np.bincount(all_labels, minlength=10) > 3)


def test_train_examples_caps_the_epoch():
  c = make_config(batch_size=4, augment=False, train_examples=10)
  with tfds.testing.mock_data(num_examples=40):
    images, _ = sources.load_split(c.data, "train")
    assert data.steps_per_epoch(c) == 2
    seen = np.concatenate([b["image"] for b in take(data.train_iterator(c), 6)])
  assert set(image_keys(seen)) <= set(image_keys(images[:10]))


def test_batch_errors_name_the_field():
  with tfds.testing.mock_data(num_examples=16):
    with pytest.raises(ValueError, match=r"config\.batch_size=10.*divisible.*4"):
      data.train_iterator(make_config(batch_size=10), process_count=4)
    with pytest.raises(ValueError, match=r"config\.batch_size=32.*16 training examples"):
      data.train_iterator(make_config(batch_size=32))
    with pytest.raises(ValueError, match=r"config\.batch_size=32"):
      data.steps_per_epoch(make_config(batch_size=32))
    with pytest.raises(ValueError, match=r"config\.eval_batch_size=7"):
      data.eval_iterator(make_config(eval_batch_size=7), process_count=2)


# ---------------------------------------------------------------------------
# Eval pipeline
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("process_count", [1, 3])
def test_eval_covers_every_test_example_once(process_count):
  c = make_config("cifar100", eval_batch_size=6, test_examples=31)
  with tfds.testing.mock_data(num_examples=37):
    images, labels = sources.test_arrays(c.data)
    steps = data.num_eval_steps(c, process_count=process_count)
    runs = [list(data.eval_iterator(c, process_index=p, process_count=process_count))
            for p in range(process_count)]
  assert len(labels) == 31 and steps == 6
  local = 6 // process_count
  got_images, got_labels = [], []
  for run in runs:
    assert len(run) == steps
    for b in run:
      assert b["image"].shape == (local, 32, 32, 3) and b["image"].dtype == np.uint8
      assert b["label"].dtype == np.int32 and b["mask"].dtype == np.bool_
      assert (b["image"][~b["mask"]] == 0).all() and (b["label"][~b["mask"]] == 0).all()
      got_images.append(b["image"][b["mask"]])
      got_labels.append(b["label"][b["mask"]])
  got_labels = np.concatenate(got_labels)
  assert len(got_labels) == 31
  assert collections.Counter(got_labels.tolist()) == collections.Counter(labels.tolist())
  assert image_keys(np.concatenate(got_images)) == image_keys(images)


# ---------------------------------------------------------------------------
# ImageNet (mock data only: nothing real here)
# ---------------------------------------------------------------------------


def test_imagenet_on_mock_data():
  c = make_config("imagenet2012", batch_size=4, eval_batch_size=4)
  with tfds.testing.mock_data(num_examples=10):
    info = data.get_dataset_info(c.data)
    train = take(data.train_iterator(c), 3)
    again = take(data.train_iterator(c), 3)
    resumed = take(data.train_iterator(c, start_step=1), 2)
    half = next(data.train_iterator(c, process_index=1, process_count=2))
    evals = list(data.eval_iterator(c))
    steps = data.num_eval_steps(c)
  assert (info.num_classes, info.image_shape, info.num_test) == (1000, (224, 224, 3), 10)
  for b in train:
    assert b["image"].shape == (4, 224, 224, 3) and b["image"].dtype == np.uint8
    assert b["label"].dtype == np.int32
  assert half["image"].shape == (2, 224, 224, 3)
  assert_batches_equal(train, again)
  assert_batches_equal(resumed, train[1:])
  assert steps == len(evals) == 3
  assert sum(int(b["mask"].sum()) for b in evals) == 10
  assert evals[-1]["mask"].tolist() == [True, True, False, False]
  assert evals[0]["image"].shape == (4, 224, 224, 3)


# ---------------------------------------------------------------------------
# Extra batch fields for the baselines (CS-KD pairs, PS-KD example ids)
# ---------------------------------------------------------------------------

def test_class_partners_are_other_examples_of_the_same_class():
  labels = np.array([0, 1, 0, 2, 1, 0, 2, 1, 3])  # class 3 has a single example
  order = np.array([4, 0, 8, 2, 6, 1, 5, 3, 7])
  for seed in range(5):
    partners = in_memory.class_partners(order, labels, np.random.default_rng(seed))
    np.testing.assert_array_equal(labels[partners], labels[order])
    alone = order == 8
    assert np.all(partners[~alone] != order[~alone]) and partners[alone] == 8


def test_pairs_and_example_ids_leave_the_batches_unchanged():
  """Turning the extra fields on adds keys only: same images, labels and order."""
  with tfds.testing.mock_data(num_examples=40):
    plain = take(data.train_iterator(make_config(batch_size=8)), 6)
    extra = take(data.train_iterator(make_config(batch_size=8, class_pairs=True,
                                                 example_ids=True)), 6)
    images, labels = sources.load_split(make_config().data, "train")
  for p, e in zip(plain, extra):
    assert set(e) == {"image", "label", "example_id", "pair_image", "pair_label"}
    np.testing.assert_array_equal(p["image"], e["image"])
    np.testing.assert_array_equal(p["label"], e["label"])
    np.testing.assert_array_equal(e["pair_label"], e["label"])
    np.testing.assert_array_equal(labels[e["example_id"]], e["label"])
  # Example ids index the kept examples: each appears once per epoch (5 steps of 8 = 40).
  ids = np.concatenate([e["example_id"] for e in extra[:5]])
  np.testing.assert_array_equal(np.sort(ids), np.arange(40))


def test_example_ids_are_dense_over_a_subset():
  with tfds.testing.mock_data(num_examples=60):
    c = make_config(name="fashion_mnist", batch_size=10, example_ids=True,
                    train_examples_per_class=2)
    batch = next(data.train_iterator(c))
    _, labels = sources.load_split(c.data, "train")
  keep = sources.train_subset(labels, 10, 2, None)
  assert batch["example_id"].max() < len(keep) == 20
  np.testing.assert_array_equal(labels[keep[batch["example_id"]]], batch["label"])


def test_streamed_dataset_refuses_pairs_and_ids():
  for field in ("class_pairs", "example_ids"):
    c = make_config(name="imagenet2012", **{field: True})
    with pytest.raises(ValueError, match=f"config.data.{field}=True needs an in-memory dataset"):
      data.train_iterator(c)
