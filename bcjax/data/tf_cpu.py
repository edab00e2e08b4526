"""TensorFlow for tf.data only, hidden from the GPUs before anything else uses it.

Every module of bcjax.data that needs TensorFlow imports it from here
(``from bcjax.data.tf_cpu import tf``), so whichever of them is imported first,
TensorFlow never takes accelerator memory from JAX. ``bcjax.data`` itself
does not import it: runs on packed data (bcjax/data/packed.py) never load it.
"""

import os

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

import tensorflow as tf  # pylint: disable=g-import-not-at-top

try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TensorFlow already initialised its devices elsewhere.
  pass

__all__ = ['tf']
