"""tf.data from a source's raw split to device-shaped batches.

One path for every source::

    raw split ─ shard(process) ─ decode + resize (uint8) ─ cache ─┬─ train: shuffle(seed, epoch) ─ batch (uint8) ────────┐
                                                                  └─ eval:  batch ─ (NumPy) padding (mask False) ─ /255 ─┤
                                                                      reshape [devices, per_device, H, W, 3] ─ prefetch ─┘

Training batches stay uint8 and unaugmented: the train step flips, rotates
and scales them (bcjax/augment.py), as it does on every input path.

Why it is built this way:

* The cached dataset (decoded, resized, uint8) is memoised per process, so
  each call of ``make_train_dataset(config, epoch=e)`` builds a new shuffle
  on top of the same cache: JPEGs are decoded in the first epoch only.
* The training order is a pure function of ``(config.seed, epoch)``
  (``reshuffle_each_iteration=False`` with a derived seed), so a resumed run
  replays the same epoch.
* Every process reads a disjoint shard and yields the same number of batches,
  so collectives never wait on a process that ran out of data. Evaluation
  pads the last batch with masked examples instead of dropping any, by the
  NumPy streamer's code (``spec.eval_batches``): one padding for both.
"""

import collections

import numpy as np

from bcjax.data import images
from bcjax.data import sources
from bcjax.data import spec
from bcjax.data.tf_cpu import tf

AUTOTUNE = tf.data.AUTOTUNE
_MEMO_SIZE = 8
_memo: collections.OrderedDict = collections.OrderedDict()


def clear_cache() -> None:
  """Forgets every cached split (tests; a long notebook session)."""
  _memo.clear()


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.autotune.enabled = True
  return options


def _data_key(config) -> tuple:
  data = config.data.to_dict()
  for irrelevant in ('augment', 'shuffle_buffer', 'prefetch', 'split'):
    data.pop(irrelevant, None)
  return tuple(sorted((k, repr(v)) for k, v in data.items()))


def cached_split(config, split: str, *, process_index: int,
                 process_count: int) -> tuple[tf.data.Dataset, int]:
  """This process's shard of ``split``: decoded, resized uint8, cached.

  Args:
    config: The experiment config.
    split: Split name.
    process_index: This process.
    process_count: All processes.

  Returns:
    The dataset of ``{'image': uint8 (S, S, 3), 'label': int32,
    'file_name': string}`` and the size of the whole split (all shards).
  """
  size = config.image_size
  key = (_data_key(config), size, split, process_index, process_count)
  if key in _memo:
    _memo.move_to_end(key)
    return _memo[key]
  raw = sources.raw_split(config, split)
  dataset = raw.dataset
  if process_count > 1:
    dataset = dataset.shard(process_count, process_index)

  def to_pixels(example):
    image = example['image']
    if raw.encoded:
      image = images.decode(image)
    image = tf.ensure_shape(images.resize_uint8(image, size), (size, size, 3))
    return {'image': image,
            'label': tf.cast(example['label'], tf.int32),
            'file_name': example['file_name']}

  dataset = dataset.map(to_pixels, num_parallel_calls=AUTOTUNE)
  if not config.data.cache:
    return dataset, raw.size
  _memo[key] = (dataset.cache(), raw.size)
  while len(_memo) > _MEMO_SIZE:
    _memo.popitem(last=False)
  return _memo[key]


def _derived_seed(*parts: int) -> int:
  """A platform-independent 31-bit seed from integers (numpy SeedSequence)."""
  state = np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts])
  return int(state.generate_state(1)[0] >> 1)


def _to_device_layout(local_device_count: int, per_device: int):
  def finish(batch):
    return {name: tf.reshape(value, [local_device_count, per_device] + value.shape[1:].as_list())
            for name, value in batch.items()}
  return finish


def train_dataset(config, cached: tf.data.Dataset, total: int, *, epoch: int,
                  process_index: int, process_count: int,
                  local_device_count: int) -> tf.data.Dataset:
  """One epoch of shuffled, device-shaped training batches of uint8 pixels (the step augments)."""
  per_process, per_device = spec.batch_geometry(
      config.batch_size, process_count, local_device_count, 'config.batch_size')
  steps = spec.train_steps(total, config.batch_size)
  mine = spec.shard_size(total, process_index, process_count)
  buffer = max(1, min(int(config.data.shuffle_buffer), mine))
  shuffle_seed = _derived_seed(config.seed, epoch, 0)

  dataset = cached.shuffle(buffer, seed=shuffle_seed,
                           reshuffle_each_iteration=False)
  # Every shard holds at least `steps` full batches (see steps_per_epoch), and
  # take() makes all processes yield exactly that many.
  dataset = dataset.batch(per_process, drop_remainder=True,
                          num_parallel_calls=AUTOTUNE).take(steps)
  dataset = dataset.map(_to_device_layout(local_device_count, per_device),
                        num_parallel_calls=AUTOTUNE)
  return dataset.prefetch(AUTOTUNE).with_options(_options())


def eval_dataset(config, cached: tf.data.Dataset, total: int, *,
                 batch_size: int, process_index: int, process_count: int,
                 local_device_count: int) -> spec.Batches:
  """Every example once, in order, padded to full batches with mask False (spec.eval_batches)."""
  per_process, per_device = spec.batch_geometry(
      batch_size, process_count, local_device_count, 'eval batch size')
  num_batches, _ = spec.eval_padding(total, per_process, process_index, process_count)
  size = config.image_size
  chunks = cached.batch(per_process, num_parallel_calls=AUTOTUNE).prefetch(AUTOTUNE)
  chunks = chunks.with_options(_options())

  def batches(start):
    return spec.eval_batches(chunks.skip(start).as_numpy_iterator(), num_batches - start,
                             per_process=per_process, local_device_count=local_device_count,
                             per_device=per_device, image_shape=(size, size, 3))

  return spec.Batches(batches)


# --------------------------------------------------------------------------
# The streamer bcjax.data calls for the tf.data sources (pbc, bloodmnist, synthetic).


def prepare(config, *, print_summary: bool | None = None) -> spec.DatasetInfo:
  return sources.prepare(config, print_summary=print_summary)


def fingerprint(config) -> dict:
  return sources.fingerprint(config)


def split_size(config, split: str, *, process_index: int, process_count: int) -> int:
  """Examples of ``split`` (all shards); 'all' is known once its folder is read."""
  return cached_split(config, split, process_index=process_index,
                      process_count=process_count)[1]


def train_pixels(config, *, process_index: int,
                 process_count: int) -> tuple[np.ndarray, np.ndarray]:
  """This process's shard of the train split from the cache: uint8 images and int32 labels."""
  cached, _ = cached_split(config, 'train', process_index=process_index,
                           process_count=process_count)
  images, labels = [], []
  for batch in cached.batch(1024).prefetch(2).as_numpy_iterator():
    images.append(batch['image'])
    labels.append(batch['label'])
  return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def make_train_dataset(config, *, epoch: int, process_index: int, process_count: int,
                       local_device_count: int) -> tf.data.Dataset:
  cached, total = cached_split(config, 'train', process_index=process_index,
                               process_count=process_count)
  dataset = train_dataset(config, cached, total, epoch=epoch, process_index=process_index,
                          process_count=process_count, local_device_count=local_device_count)
  return dataset.map(lambda b: {'image': b['image'], 'label': b['label']})


def make_eval_dataset(config, split: str, *, batch_size: int, process_index: int,
                      process_count: int, local_device_count: int) -> tf.data.Dataset:
  cached, total = cached_split(config, split, process_index=process_index,
                               process_count=process_count)
  return eval_dataset(config, cached, total, batch_size=batch_size,
                      process_index=process_index, process_count=process_count,
                      local_device_count=local_device_count)
