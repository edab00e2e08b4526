"""The tf.data pipeline and the synthetic source (bcjax/data/pipeline.py).

Everything here runs on the synthetic source at tiny sizes: seconds in total.
"""

import numpy as np
import pytest
import tensorflow as tf

from bcjax import data
from bcjax import errors
from bcjax.data import images
from bcjax.data import synthetic
from configs import default
from conftest import override


def tiny_config(**overrides):
  config = default.tiny(default.get_config())
  config.image_size = 16
  return override(config, **overrides)


@pytest.fixture(autouse=True)
def _fresh_cache():
  data.clear_cache()
  yield
  data.clear_cache()


def batches(dataset):
  return list(dataset.as_numpy_iterator())


def test_prepare_synthetic_sizes():
  info = data.prepare(tiny_config())
  assert info.class_names == data.CLASS_NAMES
  assert info.split_sizes == {'train': 45, 'validation': 9, 'test': 10}
  assert info.image_size == 16
  assert data.steps_per_epoch(tiny_config(), info) == 45 // 8


def test_train_batches_have_device_layout():
  config = tiny_config()
  out = batches(data.make_train_dataset(config, epoch=0, local_device_count=2))
  assert len(out) == data.steps_per_epoch(config, data.prepare(config))
  assert set(out[0]) == {'image', 'label'}
  assert out[0]['image'].shape == (2, 4, 16, 16, 3)
  assert out[0]['image'].dtype == np.uint8  # Unscaled: the train step scales.
  assert out[0]['label'].shape == (2, 4) and out[0]['label'].dtype == np.int32
  assert out[0]['image'].max() > 1


def test_train_order_is_a_function_of_seed_and_epoch():
  config = tiny_config(**{'data.augment.flips': True, 'data.augment.rot90': True})
  first = batches(data.make_train_dataset(config, epoch=3, local_device_count=1))
  data.clear_cache()
  again = batches(data.make_train_dataset(config, epoch=3, local_device_count=1))
  other = batches(data.make_train_dataset(config, epoch=4, local_device_count=1))
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  assert not np.array_equal(first[0]['image'], other[0]['image'])


def test_train_batches_are_the_cached_pixels_unflipped_and_the_step_flips_them():
  """The flags change no streamed batch and no eval batch; the train step applies them."""
  from conftest import assert_the_step_flips
  plain = tiny_config()
  aug = tiny_config(**{'data.augment.flips': True, 'data.augment.rot90': True})
  a = batches(data.make_train_dataset(plain, epoch=0, local_device_count=1))
  b = batches(data.make_train_dataset(aug, epoch=0, local_device_count=1))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  pixels, labels = data.train_pixels(aug, process_index=0, process_count=1)
  stored = {im.tobytes(): label for im, label in zip(pixels, labels)}
  # A flip or turn of these would not be stored as it is: none is symmetric.
  assert not any(np.rot90(z, k).tobytes() in stored for x in pixels
                 for z, turns in ((x, (1, 2, 3)), (x[:, ::-1], (0, 1, 2, 3))) for k in turns)
  for batch in b:
    assert batch['image'].dtype == np.uint8
    for x, label in zip(batch['image'][0], batch['label'][0]):
      assert stored[x.tobytes()] == label  # The stored pixels as they are.
  assert_the_step_flips(b[0]['image'], b[0]['label'])
  e1 = batches(data.make_eval_dataset(plain, 'test', local_device_count=1))
  e2 = batches(data.make_eval_dataset(aug, 'test', local_device_count=1))
  assert e1[0]['image'].dtype == np.float32
  np.testing.assert_array_equal(e1[0]['image'], e2[0]['image'])


@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_eval_sees_every_example_once(process_count):
  config = tiny_config()
  seen, num_batches = [], set()
  for pi in range(process_count):
    out = batches(data.make_eval_dataset(
        config, 'validation', process_index=pi, process_count=process_count,
        local_device_count=2, batch_size=6 * process_count // 3 * 2))
    num_batches.add(len(out))
    for b in out:
      assert b['image'].shape[:2] == b['mask'].shape == b['label'].shape
      assert b['file_name'].shape == b['mask'].shape
      assert (b['file_name'][~b['mask']] == b'').all()
      assert (b['image'][~b['mask']] == 0).all()
      seen += b['file_name'][b['mask']].tolist()
  assert len(num_batches) == 1  # Same number of batches on every process.
  assert sorted(seen) == [f'synthetic/validation/{i:05d}'.encode() for i in range(9)]


def test_train_shards_are_disjoint_and_equally_long():
  config = tiny_config(batch_size=4)
  per_process = []
  for pi in range(2):
    out = batches(data.make_train_dataset(
        config, epoch=0, process_index=pi, process_count=2, local_device_count=1))
    assert len(out) == 45 // 4
    per_process.append({x.tobytes() for b in out for x in b['image'][0]})
  assert not per_process[0] & per_process[1]


def test_batch_size_not_divisible_is_a_user_error():
  with pytest.raises(errors.UserError, match='config.batch_size=8 must be'):
    data.make_train_dataset(tiny_config(), epoch=0, local_device_count=3)
  with pytest.raises(errors.UserError, match='eval batch size=10'):
    data.make_eval_dataset(tiny_config(), 'test', local_device_count=4,
                           batch_size=10)


def test_every_tf_data_source_has_a_reader_and_only_those():
  from bcjax.data import sources
  assert set(sources.READERS) == {n for n, s in data.SOURCES.items() if s.tf_data}
  assert [data.streamer_name(tiny_config(**{'data.source': n})) for n in data.SOURCES] == [
      'pipeline', 'pipeline', 'pipeline', 'packed']


def test_unknown_source_and_split_are_user_errors():
  with pytest.raises(errors.UserError, match="known: pbc, bloodmnist, synthetic"):
    data.prepare(tiny_config(**{'data.source': 'pbcc'}))
  with pytest.raises(errors.UserError, match="unknown split 'valid'"):
    data.make_eval_dataset(tiny_config(), 'valid', local_device_count=1)


def test_later_epochs_read_the_cache(monkeypatch):
  calls = tf.Variable(0)
  original = images.resize_uint8

  def counting_resize(image, size):
    calls.assign_add(1)
    return original(image, size)

  monkeypatch.setattr(images, 'resize_uint8', counting_resize)
  config = tiny_config()
  for epoch in range(3):
    batches(data.make_train_dataset(config, epoch=epoch, local_device_count=1))
  assert int(calls.numpy()) == 45


def test_preprocess_is_the_same_eagerly_and_in_tf_data():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (37, 41, 3), dtype=np.uint8)
  eager = data.preprocess(image, 16)
  assert isinstance(eager, np.ndarray) and eager.dtype == np.float32
  batch = data.preprocess(image[None], 16)
  np.testing.assert_array_equal(batch[0], eager)
  graph = next(iter(tf.data.Dataset.from_tensors(image).map(
      lambda x: data.preprocess(x, 16))))
  np.testing.assert_array_equal(graph.numpy(), eager)
  same = data.preprocess(image[:16, :16], 16)
  np.testing.assert_array_equal(same, image[:16, :16] / np.float32(255))


def test_synthetic_is_deterministic_balanced_and_sized():
  a, la = synthetic.make_split(seed=1, split='test', num=16, image_size=24)
  b, lb = synthetic.make_split(seed=1, split='test', num=16, image_size=24)
  c, _ = synthetic.make_split(seed=2, split='test', num=16, image_size=24)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  assert a.shape == (16, 24, 24, 3) and a.dtype == np.uint8
  assert np.bincount(la).tolist() == [2] * 8


def test_synthetic_classes_are_learnable():
  """Even a nearest-centroid rule on 8x8 thumbnails beats chance by far."""
  def features(x):
    x = x.reshape(len(x), 8, 4, 8, 4, 3).mean(axis=(2, 4)) / 255.0
    return x.reshape(len(x), -1)
  x, y = synthetic.make_split(seed=0, split='train', num=400, image_size=32)
  xt, yt = synthetic.make_split(seed=0, split='test', num=160, image_size=32)
  centroids = np.stack([features(x[y == k]).mean(0) for k in range(8)])
  d = ((features(xt)[:, None] - centroids[None]) ** 2).sum(-1)
  assert (d.argmin(1) == yt).mean() > 0.6
