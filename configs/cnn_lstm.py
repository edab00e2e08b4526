"""The paper's Table 2 hybrid: 2-D CNN feature extractor + Conv1D/LSTM head.

The extractor maps 224x224 RGB to a 7x7x64 map, read in raster order as the
paper's 49-step x 64-feature sequence; the head is Table 2. Train on PBC::

    python launch.py --config configs/cnn_lstm.py --workdir runs/cnn_lstm \
        --config.data.path=../shared/data/PBC_dataset_normal_DIB

Sized for a 2-core CPU (112 px, four extractor stages, same 49x64 sequence)::

    python launch.py --config configs/cnn_lstm.py:cpu --workdir runs/cnn_lstm_cpu \
        --config.data.path=../shared/data/PBC_dataset_normal_DIB

Seconds-long smoke run on synthetic data::

    python launch.py --config configs/cnn_lstm.py:tiny --workdir /tmp/cnn_lstm_tiny
"""

import ml_collections

from configs import default


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  c = default.get_config()
  c.name = 'cnn_lstm'
  c.model.name = 'cnn_lstm'
  # Extractor: one (conv 3x3 SAME, BatchNorm, ReLU, max-pool 2) stage per
  # entry; 5 stages take 224 px to a 7x7 grid. The last entry is the
  # sequence's feature size (64 in the paper).
  c.model.extractor_features = (16, 32, 64, 64, 64)
  # A pretrained extractor: --config.init.checkpoint=WORKDIR
  # --config.init.subtree=extractor, and --config.optimizer.frozen=extractor to
  # train only the head (configs/default.py).
  c.model.dropout = 0.2
  c.model.initializers = 'keras'  # The paper's framework (configs/default.py).
  # BatchNorm in PyTorch's convention (Keras' defaults: momentum 0.99, epsilon
  # 1e-3); bcjax's hybrids have always used these.
  c.model.bn_momentum = 0.9
  c.model.bn_epsilon = 1e-5
  # The extractor's normalisation: 'batch' (the paper's), 'group' or 'layer'
  # (per image, bcjax/models/cnn_lstm.py); and the input's: 'none' or
  # 'channels' (each image standardised per channel before the first conv).
  c.model.norm = 'batch'
  c.model.input_norm = 'none'
  c.model.head_norm = 'batch'  # Table 2's BatchNorm, or 'layer'.
  c.image_size = 224
  c.data.source = 'pbc'
  c.batch_size = 64
  c.num_epochs = 30
  c.optimizer.learning_rate = 1e-3
  if variant == 'cpu':
    # Sized for a 2-core CPU: 112 px and four stages still give the 7x7 grid
    # (49 steps x 64 features) the head reads; about 4x fewer FLOPs.
    c.name = 'cnn_lstm:cpu'
    c.image_size = 112
    c.model.extractor_features = (16, 32, 64, 64)
    c.num_epochs = 15
  elif variant == 'tiny':
    c = default.tiny(c)
    c.image_size = 28
    c.model.extractor_features = (8, 8)  # 28 px -> 7x7 grid, 49 steps.
  elif variant:
    raise ValueError(f"unknown variant {variant!r} of configs/cnn_lstm.py; known: 'cpu', 'tiny'")
  return c
