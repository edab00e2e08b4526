"""The paper's Table 2 hybrid: a 2-D CNN feature extractor and a Conv1D+LSTM head.

The paper feeds its head a 49-step x 64-feature sequence produced by "a
pre-trained CNN used as feature extractor" on 224x224 RGB. We build that
extractor as ``len(extractor_features)`` stages of (conv 3x3 SAME, BatchNorm,
ReLU, max-pool 2): five stages take 224 px to a 7x7x64 map, read in raster
order (row by row) as 49 steps of 64 features. No pretrained weights can be
downloaded here, so the extractor trains jointly by default; any run can load
it from a checkpoint and freeze it (``config.init.subtree='extractor'``,
``config.optimizer.frozen='extractor'``).

The head is Table 2 exactly: Conv1D 64 k3 valid, BatchNorm, MaxPool1D 2;
Conv1D 128 k3 valid, BatchNorm, MaxPool1D 2 -> (10, 128); LSTM 100 returning
the sequence, Dropout; LSTM 50 returning its last state, Dropout; Dense 8.
It holds **159,648** parameters in ``params`` and **384** in ``batch_stats``:
160,032, the paper's total.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bcjax.models import layers


# The extractor's normalisation after each convolution (``config.model.norm``).
# BatchNorm normalises by statistics of the training lab's images, stored with
# the model, so another lab's differently bright or stained cells arrive off
# centre; GroupNorm and LayerNorm normalise each image by its own statistics
# (per group of channels, or over all of them) and keep no such memory.
NORMS = ('batch', 'group', 'layer')
# Per-image standardisation of the input (``config.model.input_norm``):
# 'channels' subtracts each image's per-channel mean and divides by its
# per-channel standard deviation, removing a global colour cast and contrast
# before the first convolution, in training and at test time alike.
INPUT_NORMS = ('none', 'channels')
# The Table 2 head's two BatchNorms (``config.model.head_norm``), or LayerNorm
# over each sequence step's features: with 'group' or 'layer' in the extractor
# too, the model keeps no statistics of the training lab at all.
HEAD_NORMS = ('batch', 'layer')
GROUPS = 8  # GroupNorm's groups (fewer where a stage has fewer channels).


def standardise(x: jax.Array, mode: str) -> jax.Array:
  """``x`` per image and channel to zero mean and unit deviation ('channels'), or as it is."""
  if mode == 'none':
    return x
  mean = x.mean(axis=(1, 2), keepdims=True)
  var = x.var(axis=(1, 2), keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + 1e-4)


class FeatureExtractor(nn.Module):
  """2-D CNN mapping (N, H, W, 3) images to an (N, H*W / 4**stages, C) sequence."""
  features: Sequence[int] = (16, 32, 64, 64, 64)
  conv_impl: str = 'auto'
  dtype: jnp.dtype = jnp.float32
  axis_name: str | None = None  # Device axis BatchNorm statistics are averaged over.
  initializers: str = 'keras'
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  norm: str = 'batch'  # One of NORMS.
  input_norm: str = 'none'  # One of INPUT_NORMS.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = standardise(x, self.input_norm)
    for i, f in enumerate(self.features):
      x = layers.Conv(f, (3, 3), padding='SAME', impl=self.conv_impl, dtype=self.dtype,
                      initializers=self.initializers, name=f'conv{i + 1}')(x)
      if self.norm != 'batch':
        groups = 1 if self.norm == 'layer' else min(GROUPS, f)
        x = nn.GroupNorm(num_groups=groups, epsilon=self.bn_epsilon, dtype=self.dtype,
                         name=f'{self.norm}norm{i + 1}')(x)
        x = nn.relu(x)
        x = layers.MaxPool(2, self.conv_impl, name=f'pool{i + 1}')(x)
      elif self.dtype == jnp.float32:
        # BatchNorm -> ReLU -> max-pool as one function with a hand-written
        # gradient: same variables, same outputs (docs/benchmarks.md).
        x = layers.BatchNormReluPool(not train, 2, momentum=self.bn_momentum,
                                     epsilon=self.bn_epsilon, axis_name=self.axis_name,
                                     impl=self.conv_impl, name=f'bn{i + 1}')(x)
      else:
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                         epsilon=self.bn_epsilon, dtype=self.dtype,
                         axis_name=self.axis_name, name=f'bn{i + 1}')(x)
        x = nn.relu(x)
        x = layers.MaxPool(2, self.conv_impl, name=f'pool{i + 1}')(x)
    return layers.RasterSequence(name='sequence')(x)  # e.g. 7x7x64 -> 49 x 64.


class SequenceHead(nn.Module):
  """Table 2: Conv1D/BatchNorm/MaxPool1D x2, LSTM 100 (sequence), LSTM 50 (last)."""
  num_classes: int = 8
  dropout: float = 0.2
  conv_impl: str = 'auto'
  dtype: jnp.dtype = jnp.float32
  axis_name: str | None = None  # Device axis BatchNorm statistics are averaged over.
  initializers: str = 'keras'
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  norm: str = 'batch'  # 'batch' (Table 2) or 'layer' (each step of each sequence by itself).

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    for i, f in enumerate((64, 128)):
      x = layers.Conv(f, (3,), padding='VALID', impl=self.conv_impl, dtype=self.dtype,
                      initializers=self.initializers, name=f'conv1d_{i + 1}')(x)
      if self.norm == 'layer':
        x = nn.LayerNorm(epsilon=self.bn_epsilon, dtype=self.dtype, name=f'ln{i + 1}')(x)
      else:
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                         epsilon=self.bn_epsilon, dtype=self.dtype,
                         axis_name=self.axis_name, name=f'bn{i + 1}')(x)
      x = layers.MaxPool(2, self.conv_impl, name=f'pool{i + 1}')(x)
    x = layers.LSTM(100, return_sequences=True, dtype=self.dtype,
                    initializers=self.initializers, name='lstm1')(x)
    x = layers.Dropout(self.dropout, deterministic=not train)(x)
    x = layers.LSTM(50, return_sequences=False, dtype=self.dtype,
                    initializers=self.initializers, name='lstm2')(x)
    x = layers.Dropout(self.dropout, deterministic=not train)(x)
    return layers.Dense(self.num_classes, dtype=self.dtype, initializers=self.initializers,
                        name='logits')(x)


class CNNLSTM(nn.Module):
  num_classes: int = 8
  extractor_features: Sequence[int] = (16, 32, 64, 64, 64)
  dropout: float = 0.2
  initializers: str = 'keras'  # bcjax/models/initializers.py: 'keras' | 'torch' | 'flax'.
  # BatchNorm in PyTorch's convention (Keras': momentum 0.99, epsilon 1e-3).
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  norm: str = 'batch'  # The extractor's normalisation: one of NORMS.
  input_norm: str = 'none'  # One of INPUT_NORMS.
  head_norm: str = 'batch'  # The head's: one of HEAD_NORMS.
  conv_impl: str = 'auto'
  dtype: jnp.dtype = jnp.float32
  axis_name: str | None = None  # Device axis BatchNorm statistics are averaged over.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = x.astype(self.dtype)
    seq = FeatureExtractor(tuple(self.extractor_features), self.conv_impl,
                           self.dtype, self.axis_name, self.initializers, self.bn_momentum,
                           self.bn_epsilon, self.norm, self.input_norm,
                           name='extractor')(x, train=train)
    logits = SequenceHead(self.num_classes, self.dropout, self.conv_impl,
                          self.dtype, self.axis_name, self.initializers, self.bn_momentum,
                          self.bn_epsilon, self.head_norm, name='head')(seq, train=train)
    return logits.astype(jnp.float32)
