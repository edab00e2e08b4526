"""The paper's Table 1 baseline: a small CNN on 64x64 RGB, Adam.

Train on the real PBC data::

    python launch.py --config configs/cnn.py --workdir runs/cnn \
        --config.data.path=../shared/data/PBC_dataset_normal_DIB

Seconds-long smoke run on synthetic data::

    python launch.py --config configs/cnn.py:tiny --workdir /tmp/cnn_tiny
"""

import ml_collections

from configs import default


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  c = default.get_config()
  c.name = 'cnn'
  c.model.name = 'cnn'
  c.model.dropout_conv = 0.25
  c.model.dropout_dense = 0.5
  c.model.dense_features = 64
  c.image_size = 64
  c.data.source = 'pbc'
  c.batch_size = 64
  c.num_epochs = 30
  c.optimizer.learning_rate = 1e-3
  if variant == 'tiny':
    c = default.tiny(c)
    c.image_size = 32
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/cnn.py; known: 'tiny'")
  return c
