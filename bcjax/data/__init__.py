"""Input data for bcjax: the one entry the trainer, evaluation and launch.py call.

Usage::

    from bcjax import data

    info = data.prepare(config)        # builds PBC once into tfds_dir
    steps = data.steps_per_epoch(config, info)
    for epoch in range(config.num_epochs):
      for batch in data.make_train_dataset(config, epoch=epoch).as_numpy_iterator():
        ...  # batch['image']: uint8 [devices, per_device, H, W, 3]; the train step augments
    for batch in data.make_eval_dataset(config, 'test').as_numpy_iterator():
      ...  # plus batch['mask'] (False on padding) and batch['file_name']

Sources (``config.data.source``, the registry ``SOURCES`` in
bcjax/data/spec.py): ``pbc`` (the PBC dataset through a TFDS builder,
bcjax/data/pbc_builder.py), ``bloodmnist`` (MedMNIST npz files),
``synthetic`` (drawn cells, bcjax/data/synthetic.py) and ``packed`` (a
``--mode=pack`` file, bcjax/data/packed.py). Two streamers batch them by the
same rules (spec.py): tf.data (bcjax/data/pipeline.py) for the first three,
whose readers it finds in ``bcjax.data.sources.READERS``, and NumPy for
``packed``. This module picks the streamer, once, from ``SOURCES``, and
imports neither: TensorFlow is loaded only when a tf.data source is read
(and then kept off the GPUs, bcjax/data/tf_cpu.py), so training on a packed
file never imports it.

``train_pixels`` hands the decoded train shard to the device path
(bcjax/data/resident.py, ``config.data.placement``), which keeps it on the
devices and gathers batches there instead of streaming them.
"""

import sys
from types import ModuleType
from typing import Any

import jax
import numpy as np

from bcjax.data import spec
from bcjax.data.spec import CLASS_NAMES, SOURCES, SPLITS, DatasetInfo, batch_geometry
from bcjax.errors import UserError

__all__ = [
    'CLASS_NAMES', 'SOURCES', 'SPLITS', 'DatasetInfo', 'streamer_name', 'batch_geometry',
    'clear_cache', 'damaged_input_error', 'fingerprint', 'is_damaged_input',
    'make_eval_dataset', 'make_train_dataset', 'prepare', 'preprocess', 'read_image',
    'split_facts', 'steps_per_epoch', 'train_pixels', 'uses_tensorflow',
]


def _streamer(config, split: str | None = None) -> ModuleType:
  """bcjax.data.pipeline (tf.data) or bcjax.data.packed (NumPy), imported on first use.

  The split 'all' is a labelled folder read by tf.data whatever the source,
  so a run trained on a packed file is evaluated on another lab's folder
  with its own recorded config and only the path and split changed.
  """
  if split == 'all' or uses_tensorflow(config):
    from bcjax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow)
    return pipeline
  from bcjax.data import packed  # pylint: disable=g-import-not-at-top
  return packed


def streamer_name(config) -> str:
  """'pipeline' (tf.data) or 'packed' (NumPy): the streamer that batches ``config.data.source``."""
  return 'pipeline' if uses_tensorflow(config) else 'packed'


def uses_tensorflow(config) -> bool:
  """Whether reading ``config.data.source`` loads TensorFlow."""
  return spec.source(config).tf_data


def prepare(config, *, print_summary: bool | None = None) -> DatasetInfo:
  """Builds ``config.data.source`` once and describes it.

  For ``pbc`` the first call builds the TFDS dataset into
  ``config.data.tfds_dir`` and prints the split summary; later calls only
  read its metadata (in well under a second). ``synthetic`` and
  ``bloodmnist`` have nothing to build; ``packed`` reads its file's header.

  Args:
    config: The experiment config.
    print_summary: True prints the summary even when already built
      (``--mode=prepare``); None (default) prints it after a build only.
  """
  return _streamer(config).prepare(config, print_summary=print_summary)


def fingerprint(config, info: DatasetInfo | None = None) -> dict[str, Any]:
  """What a run's data is, to compare on resume: source, path, content and split sizes.

  Without ``info`` only what can be known before preparing (nothing is
  built): the source, its path and a hash of its content where the source
  has one (the PBC folder's listing, the packed file's labels and names, the
  BloodMNIST file's size). With ``info`` the split sizes too. The synthetic
  source is a pure function of config fields, which the config check covers.
  """
  facts: dict[str, Any] = {'source': config.data.source}
  facts.update(_streamer(config).fingerprint(config))
  if info is not None:
    facts['split_sizes'] = {k: int(v) for k, v in info.split_sizes.items()}
  return facts


def steps_per_epoch(config, info: DatasetInfo) -> int:
  """Training steps in one epoch: full global batches of the train split (a UserError if none)."""
  return spec.train_steps(info.split_sizes['train'], config.batch_size)


def split_facts(config, split: str) -> tuple[tuple[str, ...], int]:
  """(class names, number of examples) of ``split``.

  'all' is a folder read directly, not a prepared split: nothing is built
  (``prepare`` would build a dataset from the folder), and its size is known
  once the folder has been read - by the same memoised read the eval dataset
  then uses.
  """
  if split == 'all':
    size = _streamer(config, 'all').split_size(config, 'all', process_index=jax.process_index(),
                                       process_count=jax.process_count())
    return CLASS_NAMES, size
  info = prepare(config)
  if split not in info.split_sizes:
    raise UserError(f'unknown split {split!r}; known: {", ".join(sorted(info.split_sizes))}, all')
  return tuple(info.class_names), info.split_sizes[split]


def _processes(process_index, process_count, local_device_count) -> dict[str, int]:
  return {'process_index': jax.process_index() if process_index is None else process_index,
          'process_count': jax.process_count() if process_count is None else process_count,
          'local_device_count': (jax.local_device_count() if local_device_count is None
                                 else local_device_count)}


def make_train_dataset(config, *, epoch: int, process_index: int | None = None,
                       process_count: int | None = None,
                       local_device_count: int | None = None) -> Any:
  """One epoch of training batches for this process.

  The order is a pure function of ``(config.seed, epoch)``, so a resumed
  run replays the same epoch. Every process yields :func:`steps_per_epoch`
  batches of ``{'image': uint8 [D, b, H, W, 3], 'label': int32 [D, b]}``:
  the pixels unaugmented and unscaled (the train step flips, rotates and
  scales them, bcjax/augment.py), with D local devices and
  ``b = config.batch_size // process_count // D``. The result offers
  ``skip(n)`` and ``as_numpy_iterator()`` (a tf.data.Dataset, or its NumPy
  stand-in for packed data).

  Raises:
    errors.UserError: ``config.batch_size`` is not a multiple of
      ``process_count * local_device_count``.
  """
  where = _processes(process_index, process_count, local_device_count)
  batch_geometry(config.batch_size, where['process_count'], where['local_device_count'],
                 'config.batch_size')
  return _streamer(config).make_train_dataset(config, epoch=epoch, **where)


def train_pixels(config, *, process_index: int | None = None,
                 process_count: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """This process's shard of the train split, decoded once: (uint8 [n, S, S, 3], int32 [n]).

  The rows the streamers read (every ``process_count``-th example
  from ``process_index``), in the split's order, before any shuffle or
  augmentation: what bcjax/data/resident.py keeps on the devices. Read from
  the tf.data cache or the packed file, so JPEGs are decoded at most once.
  """
  return _streamer(config).train_pixels(
      config, process_index=jax.process_index() if process_index is None else process_index,
      process_count=jax.process_count() if process_count is None else process_count)


def make_eval_dataset(config, split: str, *, process_index: int | None = None,
                      process_count: int | None = None,
                      local_device_count: int | None = None,
                      batch_size: int | None = None) -> Any:
  """Every example of ``split`` exactly once across processes, padded.

  Yields ``image`` float32 [D, b, H, W, 3], ``label`` int32 [D, b], ``mask``
  bool [D, b] (False on padding) and ``file_name`` string [D, b] (b'' on
  padding). ``batch_size`` (default ``config.eval_batch_size``) is global.
  ``split='all'`` reads the labelled folder at ``config.data.path``.
  """
  where = _processes(process_index, process_count, local_device_count)
  batch_size = batch_size or config.eval_batch_size
  batch_geometry(batch_size, where['process_count'], where['local_device_count'],
                 'eval batch size')
  return _streamer(config, split).make_eval_dataset(config, split, batch_size=batch_size,
                                                   **where)


def is_damaged_input(error: BaseException) -> bool:
  """Whether ``error`` is tf.data failing on damaged stored records (a cut or overwritten file)."""
  return type(error).__name__ == 'DataLossError' and type(error).__module__.startswith(
      'tensorflow')


def damaged_input_error(config, error: BaseException) -> UserError:
  """The one line for :func:`is_damaged_input`: the prepared folder to delete, where known."""
  reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else 'DataLossError'
  if config.data.source == 'pbc':
    from bcjax.data import pbc_builder  # pylint: disable=g-import-not-at-top  (TFDS)
    return UserError(pbc_builder.damaged_message(pbc_builder.builder(config), reason))
  return UserError(f'the data of config.data.source={config.data.source!r} is damaged '
                   f'({reason}); restore {config.data.path or "it"} from a copy')


def clear_cache() -> None:
  """Forgets every cached split (tests; a long notebook session)."""
  for name in ('bcjax.data.pipeline', 'bcjax.data.packed'):  # Loaded ones only: no TensorFlow.
    module = sys.modules.get(name)
    if module is not None:
      module.clear_cache()


def read_image(path: str) -> np.ndarray:
  """An image file as uint8 RGB, read as the pipeline reads it (TensorFlow's decoder)."""
  from bcjax.data import images  # pylint: disable=g-import-not-at-top  (TensorFlow: import late)
  return images.read_image(path)


def preprocess(images_uint8, image_size: int) -> np.ndarray:
  """The pipeline's resize and /255, for one image or a batch (float32)."""
  from bcjax.data import images  # pylint: disable=g-import-not-at-top  (TensorFlow: import late)
  return images.preprocess(images_uint8, image_size)
