"""The facts of bcjax's input, without TensorFlow: sources, splits, batch geometry.

Both streamers (tf.data, bcjax/data/pipeline.py; NumPy arrays of a packed
file, bcjax/data/packed.py) batch by the rules written once here: how a
global batch divides over processes and devices, how many steps an epoch
has, and how evaluation pads every process to the same number of batches
with masked examples (:func:`eval_batches`, the one place that pads and
scales an eval batch). ``bcjax.data`` re-exports them; nothing here imports
TensorFlow, so a host without it can train on packed data.

A tf.data source returns a :class:`RawSplit`: a tf.data.Dataset of
``{'image', 'label', 'file_name'}`` in a fixed order, its size, and whether
``image`` is still encoded bytes (PBC's JPEGs) or already uint8 pixels.
"""

import dataclasses
import math
import queue
import threading
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from bcjax import errors

# Alphabetical order of PBC's class folders, which is also BloodMNIST's label
# order, so a model trained on one source reads the other's labels unchanged.
CLASS_NAMES: tuple[str, ...] = (
    'basophil',
    'eosinophil',
    'erythroblast',
    'ig',
    'lymphocyte',
    'monocyte',
    'neutrophil',
    'platelet',
)

SPLITS = ('train', 'validation', 'test')


@dataclasses.dataclass(frozen=True)
class Source:
  """A value of ``config.data.source``: which streamer batches it.

  ``tf_data``: tf.data (bcjax/data/pipeline.py) over the reader that
  ``bcjax.data.sources.READERS`` holds for the name; otherwise the NumPy
  streamer (bcjax/data/packed.py), which needs no TensorFlow. The readers sit
  in a table of their own because importing them imports TensorFlow.
  """
  tf_data: bool


SOURCES: dict[str, Source] = {
    'pbc': Source(tf_data=True),  # The PBC folder or zip, through a TFDS builder.
    'bloodmnist': Source(tf_data=True),  # MedMNIST's npz files.
    'synthetic': Source(tf_data=True),  # Drawn cells: tests, smoke runs.
    'packed': Source(tf_data=False),  # A --mode=pack .npz of another source's splits.
}


def source(config) -> Source:
  name = config.data.source
  if name not in SOURCES:
    raise errors.UserError(
        f'unknown config.data.source {name!r}; known: {", ".join(SOURCES)}')
  return SOURCES[name]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a trainer needs to know about a prepared source.

  Attributes:
    class_names: The eight class names, in label order (alphabetical).
    split_sizes: Examples per split: ``train``, ``validation``, ``test`` (a
      packed file may hold fewer).
    image_size: Side in pixels of the square images the input yields.
  """
  class_names: tuple[str, ...]
  split_sizes: dict[str, int]
  image_size: int


@dataclasses.dataclass(frozen=True)
class RawSplit:
  """One split as a tf.data source provides it, before decoding and batching.

  Attributes:
    dataset: A tf.data.Dataset of ``{'image', 'label', 'file_name'}`` in a
      fixed order; ``image`` is encoded bytes (tf.string) when ``encoded``,
      else uint8 (H, W, 3) pixels.
    size: Number of elements.
    encoded: Whether ``image`` still needs decoding.
  """
  dataset: Any
  size: int
  encoded: bool


def batch_geometry(global_batch: int, process_count: int,
                   local_device_count: int, what: str) -> tuple[int, int]:
  """Per-process and per-device batch of a global batch, or a UserError."""
  unit = process_count * local_device_count
  if global_batch <= 0 or global_batch % unit:
    raise errors.UserError(
        f'{what}={global_batch} must be a positive multiple of process_count '
        f'x local_device_count = {process_count} x {local_device_count} = {unit}')
  per_process = global_batch // process_count
  return per_process, per_process // local_device_count


def shard_size(total: int, process_index: int, process_count: int) -> int:
  """Examples of ``total`` that process ``process_index`` reads (every ``process_count``-th)."""
  return len(range(process_index, total, process_count))


def train_steps(train_examples: int, batch_size: int) -> int:
  """Steps in one epoch: full global batches of the train split (at least one).

  Every process's shard holds at least this many full per-process batches,
  so all processes take the same number of steps.
  """
  steps = train_examples // batch_size
  if steps < 1:
    raise errors.UserError(
        f'the train split has {train_examples} examples, fewer than one batch '
        f'(config.batch_size={batch_size})')
  return steps


def eval_padding(total: int, per_process: int, process_index: int,
                 process_count: int) -> tuple[int, int]:
  """(batches, padded examples) of this process's share of an eval split.

  Every process yields as many batches as the longest shard needs, so
  collectives never wait on a process that ran out; the rest is padding,
  marked ``mask`` False, that the step does not count.
  """
  num_batches = max(1, math.ceil(shard_size(total, 0, process_count) / per_process))
  return num_batches, num_batches * per_process - shard_size(total, process_index, process_count)


def to_float(images: np.ndarray) -> np.ndarray:
  """uint8 to float32 in [0, 1]: the paper's /255, one float32 copy of the batch."""
  out = images.astype(np.float32)
  out /= np.float32(255.0)
  return out


def eval_batches(chunks: Iterable[dict[str, np.ndarray]], count: int, *, per_process: int,
                 local_device_count: int, per_device: int,
                 image_shape: tuple[int, ...]) -> Iterator[dict[str, np.ndarray]]:
  """``count`` eval batches from this process's real rows: padded, masked, scaled, device-shaped.

  ``chunks`` yields this process's examples in order, up to ``per_process``
  at a time: ``{'image': uint8 [n, *image_shape], 'label': [n], 'file_name':
  bytes [n]}``. Each batch is filled up to ``per_process`` with padding
  (zero image, label 0, ``file_name`` b'', ``mask`` False); once ``chunks``
  runs out the remaining batches are padding only (:func:`eval_padding`:
  every process yields as many batches as the longest shard needs). Images
  come out float32 in [0, 1], ``[local_device_count, per_device, ...]``.
  """
  chunks = iter(chunks)
  shape = (local_device_count, per_device)
  for _ in range(count):
    rows = next(chunks, None)
    n = 0 if rows is None else len(rows['label'])
    image = np.zeros((per_process, *image_shape), np.uint8)
    label = np.zeros(per_process, np.int32)
    mask = np.arange(per_process) < n
    file_name = np.full(per_process, b'', dtype=object)
    if n:
      image[:n], label[:n], file_name[:n] = rows['image'], rows['label'], rows['file_name']
    yield {'image': to_float(image).reshape(*shape, *image_shape),
           'label': label.reshape(shape), 'mask': mask.reshape(shape),
           'file_name': file_name.reshape(shape)}


class Batches:
  """The two ``tf.data.Dataset`` methods the training and eval loops call.

  ``make(start)`` yields the batches from index ``start`` on, so ``skip`` (a
  resumed epoch) builds none of the batches it skips. The batches are made in
  a thread, a few ahead of the consumer.
  """

  def __init__(self, make: Callable[[int], Iterator[dict]], start: int = 0):
    self._make = make
    self._start = start

  def skip(self, count: int) -> 'Batches':
    return Batches(self._make, self._start + count)

  def as_numpy_iterator(self) -> Iterator[dict]:
    return _background(self._make(self._start), depth=4)


def _background(items: Iterator, depth: int) -> Iterator:
  """Runs ``items`` in a thread, ``depth`` ahead (NumPy copies release the GIL)."""
  q: queue.Queue = queue.Queue(depth)
  done = object()

  def work():
    try:
      for item in items:
        q.put(item)
      q.put(done)
    except BaseException as e:  # pylint: disable=broad-except  (re-raised in the consumer)
      q.put(e)

  threading.Thread(target=work, daemon=True).start()
  while True:
    item = q.get()
    if item is done:
      return
    if isinstance(item, BaseException):
      raise item
    yield item
