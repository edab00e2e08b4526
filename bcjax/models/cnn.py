"""The paper's Table 1 baseline CNN.

Conv 32 3x3 valid, ReLU, MaxPool 2, Dropout; Conv 64 3x3 valid, ReLU, MaxPool 2,
Dropout; Flatten; Dense 64, ReLU, Dropout; Dense num_classes.

On 64x64x3 input the flattened map is 14x14x64 = 12,544 and, with 8 outputs,
the model has **822,792 parameters**. The paper's Table 1 ends in a 10-way
Dense (650 parameters) for an 8-class problem, and its stated total (205,448)
does not match the sum of its own rows; we build the 8-class network its
rows describe.

Its initialisers default to Keras's, the paper's framework
(``initializers='keras'``, :mod:`bcjax.models.initializers`).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from bcjax.models import layers


class CNN(nn.Module):
  num_classes: int = 8
  dense_features: int = 64
  dropout_conv: float = 0.25
  dropout_dense: float = 0.5
  initializers: str = 'keras'  # bcjax/models/initializers.py: 'keras' | 'torch' | 'flax'.
  conv_impl: str = 'auto'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = x.astype(self.dtype)
    for i, features in enumerate((32, 64)):
      x = layers.Conv(features, (3, 3), padding='VALID', impl=self.conv_impl,
                      dtype=self.dtype, initializers=self.initializers, name=f'conv{i + 1}')(x)
      x = nn.relu(x)
      x = layers.MaxPool(2, self.conv_impl, name=f'pool{i + 1}')(x)
      x = layers.Dropout(self.dropout_conv, deterministic=not train)(x)
    x = layers.Flatten(name='flatten')(x)
    x = layers.Dense(self.dense_features, dtype=self.dtype, initializers=self.initializers,
                     name='dense1')(x)
    x = nn.relu(x)
    x = layers.Dropout(self.dropout_dense, deterministic=not train)(x)
    x = layers.Dense(self.num_classes, dtype=self.dtype, initializers=self.initializers,
                     name='logits')(x)
    return x.astype(jnp.float32)
