"""Beyond the paper: the hybrid's extractor with a transformer head (attention).

Same extractor and 49-step sequence as configs/cnn_lstm.py; the Conv1D+LSTM
head is replaced by a 2-block transformer encoder with attention pooling::

    python launch.py --config configs/cnn_attention.py --workdir runs/cnn_attention \
        --config.data.path=../shared/data/PBC_dataset_normal_DIB

It also trains with augmentation (random flips and 90-degree rotations),
AdamW and a warm-up + cosine schedule. Variants: ``:cpu`` (112 px, four
extractor stages, 8 epochs, sized for a 2-core CPU) and ``:tiny`` (seconds,
synthetic data).
"""

import ml_collections

from configs import cnn_lstm


def augmented_adamw_cosine(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Beyond the paper's recipe: augmentation (cells have no up or down), decoupled
  weight decay and a warm-up + cosine schedule (configs/best.py builds on it)."""
  c.data.augment.flips = True
  c.data.augment.rot90 = True
  c.optimizer.name = 'adamw'
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = 'warmup_cosine'
  c.schedule.warmup_epochs = 1.0
  return c


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  c = cnn_lstm.get_config(variant)
  c.name = c.name.replace('cnn_lstm', 'cnn_attention')
  c.model = ml_collections.ConfigDict({
      'name': 'cnn_attention',
      'conv_impl': c.model.conv_impl,
      'extractor_features': c.model.extractor_features,
      'width': 64,
      'depth': 2,
      'num_heads': 4,
      'mlp_dim': 128,
      'dropout': 0.1,
      # Flax's initialisers: the recipe's Results rows were trained with them
      # (beyond the paper, so no framework to be faithful to).
      'initializers': 'flax',
      'bn_momentum': c.model.bn_momentum,
      'bn_epsilon': c.model.bn_epsilon,
      'norm': c.model.norm,
      'input_norm': c.model.input_norm,  # (The transformer head has LayerNorm of its own.)
  })
  c = augmented_adamw_cosine(c)
  if variant == 'cpu':
    c.num_epochs = 8
  return c
