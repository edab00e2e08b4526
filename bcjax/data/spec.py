"""What every data source hands the pipeline: class names, sizes, raw splits.

Sources (``synthetic``, ``bloodmnist``, ``pbc``) differ in where examples come
from; the pipeline (``bcjax/data/pipeline.py``) differs in nothing. A source
returns a :class:`RawSplit`: a tf.data.Dataset of
``{'image', 'label', 'file_name'}`` in a fixed order, its size, and whether
``image`` is still encoded bytes (PBC's JPEGs) or already uint8 pixels.
"""

import dataclasses

import tensorflow as tf

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
class DatasetInfo:
  """What a trainer needs to know about a prepared source.

  Attributes:
    class_names: The eight class names, in label order (alphabetical).
    split_sizes: Examples per split: ``train``, ``validation``, ``test`` (and
      ``all`` for a labelled folder read directly).
    image_size: Side in pixels of the square images the pipeline yields.
  """
  class_names: tuple[str, ...]
  split_sizes: dict[str, int]
  image_size: int


@dataclasses.dataclass(frozen=True)
class RawSplit:
  """One split as a source provides it, before decoding and batching.

  Attributes:
    dataset: Elements ``{'image', 'label', 'file_name'}`` in a fixed order;
      ``image`` is encoded bytes (tf.string) when ``encoded``, else uint8
      (H, W, 3) pixels.
    size: Number of elements.
    encoded: Whether ``image`` still needs decoding.
  """
  dataset: tf.data.Dataset
  size: int
  encoded: bool
