"""Beyond the paper: the hybrid with attention in place of the LSTM.

The paper names attention mechanisms as future work. This model keeps the
hybrid's 2-D feature extractor (the same 7x7x64 map read as 49 steps) and
replaces the Conv1D+LSTM head with a small pre-LayerNorm transformer encoder
over the sequence (learned position embeddings), followed by attention pooling:
a learned query attends over the encoded steps (big_vision's "MAP" head). Unlike
the LSTM, which reads the raster order left to right and must carry what it saw
in the first rows through 49 steps, every step here attends to every other one.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bcjax.models import initializers as inits
from bcjax.models import layers
from bcjax.models.cnn_lstm import FeatureExtractor


class EncoderBlock(nn.Module):
  """Pre-LN transformer block: self-attention, then a GELU MLP, both residual."""
  num_heads: int
  mlp_dim: int
  dropout: float
  dtype: jnp.dtype = jnp.float32
  initializers: str = 'flax'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    y = nn.LayerNorm(dtype=self.dtype, name='ln1')(x)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                        **inits.attention(self.initializers),
                                        name='attention')(y, y)
    x = x + layers.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(dtype=self.dtype, name='ln2')(x)
    y = layers.Dense(self.mlp_dim, dtype=self.dtype, initializers=self.initializers,
                     name='mlp1')(y)
    y = nn.gelu(y)
    y = layers.Dense(x.shape[-1], dtype=self.dtype, initializers=self.initializers,
                     name='mlp2')(y)
    return x + layers.Dropout(self.dropout, deterministic=not train)(y)


class AttentionPool(nn.Module):
  """Multi-head attention pooling: one learned query over the sequence."""
  num_heads: int
  dtype: jnp.dtype = jnp.float32
  initializers: str = 'flax'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    probe = self.param('probe', nn.initializers.xavier_uniform(), (1, 1, x.shape[-1]))
    probe = jnp.tile(probe, (x.shape[0], 1, 1)).astype(x.dtype)
    y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype,
                                        **inits.attention(self.initializers),
                                        name='attention')(probe, x)
    return y[:, 0]


class AttentionHead(nn.Module):
  num_classes: int = 8
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 128
  dropout: float = 0.1
  dtype: jnp.dtype = jnp.float32
  initializers: str = 'flax'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = layers.Dense(self.width, dtype=self.dtype, initializers=self.initializers,
                     name='embed')(x)
    pos = self.param('pos_embedding', nn.initializers.normal(0.02), (1, *x.shape[1:]))
    x = x + pos.astype(x.dtype)
    for i in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout, self.dtype,
                       self.initializers, name=f'block{i + 1}')(x, train=train)
    x = nn.LayerNorm(dtype=self.dtype, name='ln')(x)
    x = AttentionPool(self.num_heads, self.dtype, self.initializers, name='pool')(x)
    x = layers.Dropout(self.dropout, deterministic=not train)(x)
    return layers.Dense(self.num_classes, dtype=self.dtype, initializers=self.initializers,
                        name='logits')(x)


class CNNAttention(nn.Module):
  num_classes: int = 8
  extractor_features: Sequence[int] = (16, 32, 64, 64, 64)
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 128
  dropout: float = 0.1
  # Flax's: the scheme of this model's runs in docs/results.md
  # (bcjax/models/initializers.py; 'keras' | 'torch' | 'flax').
  initializers: str = 'flax'
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  norm: str = 'batch'  # The extractor's normalisation (bcjax/models/cnn_lstm.py NORMS).
  input_norm: str = 'none'  # bcjax/models/cnn_lstm.py INPUT_NORMS.
  conv_impl: str = 'auto'
  dtype: jnp.dtype = jnp.float32
  axis_name: str | None = None  # Device axis the extractor's BatchNorm averages over.

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = x.astype(self.dtype)
    seq = FeatureExtractor(tuple(self.extractor_features), self.conv_impl, self.dtype,
                           self.axis_name, self.initializers, self.bn_momentum,
                           self.bn_epsilon, self.norm, self.input_norm,
                           name='extractor')(x, train=train)
    logits = AttentionHead(self.num_classes, self.width, self.depth, self.num_heads,
                           self.mlp_dim, self.dropout, self.dtype, self.initializers,
                           name='head')(seq, train=train)
    return logits.astype(jnp.float32)
