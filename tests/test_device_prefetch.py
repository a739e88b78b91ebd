"""prefetch_to_device on the 8 fake CPU devices of tests/conftest.py."""

import jax
import numpy as np
import pytest

from mixskd_jax.train import sharding
from mixskd_jax.train.device_prefetch import prefetch_to_device


def local_batches(n, pulled):
  """n batches {'image': (8, 2, 2, 1) uint8, 'label': (8,) int32}; records each pull."""
  for i in range(n):
    pulled.append(i)
    yield {"image": np.full((8, 2, 2, 1), i, np.uint8),
           "label": np.arange(8, dtype=np.int32) + 8 * i}


@pytest.mark.parametrize("size", [0, 1, 2, 5])
def test_order_sharding_and_how_far_ahead(size):
  assert jax.device_count() == 8
  data_sharding = sharding.data_sharding(sharding.make_mesh())
  pulled = []
  out = prefetch_to_device(local_batches(4, pulled), data_sharding, size=size)
  for i in range(4):
    batch = next(out)
    # Batch i is yielded once batches i+1 .. i+size were converted (and no more).
    assert pulled == list(range(min(i + size, 3) + 1))
    for k, v in batch.items():
      assert isinstance(v, jax.Array) and v.sharding == data_sharding
      assert len(v.addressable_shards) == 8 and v.addressable_shards[0].data.shape[0] == 1
    np.testing.assert_array_equal(np.asarray(batch["image"]), i)
    np.testing.assert_array_equal(np.asarray(batch["label"]), np.arange(8) + 8 * i)
  assert next(out, None) is None


def test_negative_size_names_the_field():
  with pytest.raises(ValueError, match=r"config\.data\.device_prefetch=-1"):
    prefetch_to_device(iter([]), sharding.data_sharding(sharding.make_mesh()), size=-1)
