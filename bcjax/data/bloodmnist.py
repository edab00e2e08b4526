"""BloodMNIST (MedMNIST v2): PBC's images, centre-cropped and downscaled.

MedMNIST ships each resolution as one npz, ``bloodmnist.npz`` (28 px) and
``bloodmnist_64.npz`` / ``_128`` / ``_224``, with keys
``{train,val,test}_{images,labels}`` (labels shaped (N, 1)) and its own
official split, which is used as is. Its labels follow the same alphabetical
class order as PBC's folders, so models move between the two unchanged::

    --config.data.source=bloodmnist --config.data.path=~/medmnist

``config.data.path`` is a folder holding the files or one npz. From a
folder, the file at ``config.image_size`` is taken when present, otherwise
the smallest larger one (downscaled, antialiased), otherwise the largest.
"""

import functools
import os
import re

import numpy as np

from bcjax import errors
from bcjax.data import spec
from bcjax.data.tf_cpu import tf

_FILE = re.compile(r'^bloodmnist(?:_(\d+))?\.npz$')
_SPLIT_KEYS = {'train': 'train', 'validation': 'val', 'test': 'test'}


def find_file(path: str, image_size: int) -> str:
  """The npz to read for ``image_size`` (see the module docstring)."""
  path = os.path.expanduser(path)
  if not path:
    raise errors.UserError(
        "config.data.source='bloodmnist' needs --config.data.path=<folder "
        'holding bloodmnist*.npz, or one npz>')
  if os.path.isfile(path):
    return path
  if not os.path.isdir(path):
    raise errors.UserError(f'{path} does not exist')
  found = {}
  for name in os.listdir(path):
    match = _FILE.match(name)
    if match:
      found[int(match.group(1) or 28)] = os.path.join(path, name)
  if not found:
    raise errors.UserError(
        f'no bloodmnist*.npz in {path} (expected bloodmnist.npz, '
        'bloodmnist_64.npz, bloodmnist_128.npz or bloodmnist_224.npz)')
  larger = [s for s in found if s >= image_size]
  return found[min(larger) if larger else max(found)]


def fingerprint(config) -> dict:
  """The npz read and its size: another file, or one downloaded again and changed, differs."""
  file = os.path.abspath(find_file(config.data.path, config.image_size))
  return {'path': file, 'bytes': os.path.getsize(file)}


@functools.lru_cache(maxsize=2)
def _load(file: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  try:
    with np.load(file) as npz:
      out = {}
      for split, key in _SPLIT_KEYS.items():
        images = npz[f'{key}_images']
        labels = npz[f'{key}_labels'].reshape(-1).astype(np.int32)
        if images.ndim == 3:  # Grayscale MedMNIST variants: repeat to RGB.
          images = np.repeat(images[..., None], 3, axis=-1)
        if images.dtype != np.uint8 or images.shape[-1] != 3:
          raise ValueError(f'{key}_images is {images.dtype} {images.shape}, '
                           'expected uint8 (N, H, W, 3)')
        if len(images) != len(labels):
          raise ValueError(f'{key}_images and {key}_labels differ in length')
        out[split] = (images, labels)
      return out
  except (OSError, KeyError, ValueError) as e:
    raise errors.UserError(f'cannot read BloodMNIST file {file}: {e}') from None


def prepare(config) -> spec.DatasetInfo:
  """Reads the npz once (kept in memory) and reports its official splits."""
  arrays = _load(find_file(config.data.path, config.image_size))
  sizes = {split: len(labels) for split, (_, labels) in arrays.items()}
  return spec.DatasetInfo(spec.CLASS_NAMES, sizes, config.image_size)


def raw_split(config, split: str) -> spec.RawSplit:
  """One official split; the pipeline resizes when the file's size differs."""
  file = find_file(config.data.path, config.image_size)
  images, labels = _load(file)[split]
  stem = os.path.basename(file)[:-len('.npz')]
  names = np.array([f'{stem}/{split}/{i:05d}' for i in range(len(labels))],
                   dtype=bytes)
  dataset = tf.data.Dataset.from_tensor_slices(
      {'image': images, 'label': labels, 'file_name': names})
  return spec.RawSplit(dataset, len(labels), encoded=False)
