"""Input data for bcjax: sources, splits and the tf.data pipeline.

Usage::

    from bcjax import data

    info = data.prepare(config)        # builds PBC once into tfds_dir
    for epoch in range(config.num_epochs):
      for batch in data.make_train_dataset(config, epoch=epoch).as_numpy_iterator():
        ...  # batch['image']: float32 [devices, per_device, H, W, 3]
    for batch in data.make_eval_dataset(config, 'test'):
      ...  # plus batch['mask'] (False on padding) and batch['file_name']

Sources (``config.data.source``): ``pbc`` (the PBC dataset through a TFDS
builder, bcjax/data/pbc_builder.py), ``bloodmnist`` (MedMNIST npz files) and
``synthetic`` (drawn cells, bcjax/data/synthetic.py). TensorFlow is used for
tf.data only and is hidden from the GPUs at import so that it never takes
accelerator memory from JAX.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

import tensorflow as tf  # pylint: disable=g-import-not-at-top

try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TensorFlow already initialised its devices elsewhere.
  pass

import jax  # pylint: disable=g-import-not-at-top

from bcjax.data import images  # pylint: disable=g-import-not-at-top
from bcjax.data import pipeline
from bcjax.data import sources
from bcjax.data.images import preprocess
from bcjax.data.images import read_image
from bcjax.data.spec import CLASS_NAMES
from bcjax.data.spec import DatasetInfo

__all__ = [
    'CLASS_NAMES', 'DatasetInfo', 'clear_cache', 'make_eval_dataset',
    'make_train_dataset', 'prepare', 'preprocess', 'read_image',
    'steps_per_epoch',
]

clear_cache = pipeline.clear_cache


def prepare(config, *, print_summary: bool | None = None) -> DatasetInfo:
  """Builds ``config.data.source`` once and describes it.

  For ``pbc`` the first call builds the TFDS dataset into
  ``config.data.tfds_dir`` and prints the split summary; later calls only
  read its metadata (in well under a second). ``synthetic`` and
  ``bloodmnist`` have nothing to build.

  Args:
    config: The experiment config.
    print_summary: True prints the summary even when already built
      (``--mode=prepare``); None (default) prints it after a build only.
  """
  return sources.prepare(config, print_summary=print_summary)


def _processes(process_index, process_count, local_device_count):
  return (jax.process_index() if process_index is None else process_index,
          jax.process_count() if process_count is None else process_count,
          jax.local_device_count() if local_device_count is None
          else local_device_count)


def make_train_dataset(config, *, epoch: int, process_index: int | None = None,
                       process_count: int | None = None,
                       local_device_count: int | None = None) -> tf.data.Dataset:
  """One epoch of training batches for this process.

  The order and the augmentation are pure functions of ``(config.seed,
  epoch)``, so a resumed run replays the same epoch. Every process yields
  :func:`steps_per_epoch` batches of ``{'image': float32 [D, b, H, W, 3],
  'label': int32 [D, b]}``, with D local devices and
  ``b = config.batch_size // process_count // D``.

  Raises:
    errors.UserError: ``config.batch_size`` is not a multiple of
      ``process_count * local_device_count``.
  """
  pi, pc, devices = _processes(process_index, process_count, local_device_count)
  pipeline.batch_geometry(config.batch_size, pc, devices, 'config.batch_size')
  cached, total = pipeline.cached_split(
      config, 'train', sources.raw_split, process_index=pi, process_count=pc)
  dataset = pipeline.train_dataset(
      config, cached, total, epoch=epoch, process_index=pi, process_count=pc,
      local_device_count=devices)
  return dataset.map(lambda b: {'image': b['image'], 'label': b['label']})


def make_eval_dataset(config, split: str, *, process_index: int | None = None,
                      process_count: int | None = None,
                      local_device_count: int | None = None,
                      batch_size: int | None = None) -> tf.data.Dataset:
  """Every example of ``split`` exactly once across processes, padded.

  Yields ``image`` float32 [D, b, H, W, 3], ``label`` int32 [D, b], ``mask``
  bool [D, b] (False on padding) and ``file_name`` string [D, b] (b'' on
  padding). ``batch_size`` (default ``config.eval_batch_size``) is global.
  ``split='all'`` reads the labelled folder at ``config.data.path``.
  """
  pi, pc, devices = _processes(process_index, process_count, local_device_count)
  batch_size = batch_size or config.eval_batch_size
  pipeline.batch_geometry(batch_size, pc, devices, 'eval batch size')
  cached, total = pipeline.cached_split(
      config, split, sources.raw_split, process_index=pi, process_count=pc)
  return pipeline.eval_dataset(
      config, cached, total, batch_size=batch_size, process_index=pi,
      process_count=pc, local_device_count=devices)


def steps_per_epoch(config, info: DatasetInfo) -> int:
  """Training steps in one epoch: full global batches of the train split."""
  return info.split_sizes['train'] // config.batch_size
