"""Convolution and max-pooling with a backend-chosen lowering.

Why this exists: on XLA:CPU the gradient of ``lax.conv_general_dilated`` with
respect to its input lowers to a slow generic transposed convolution, and the
gradient of ``lax.reduce_window`` max-pooling to a slow select-and-scatter
(measured in ``benchmarks/README.md``). Writing the convolution as shifted
slices + one matmul ("im2col") and the pool as reshape + max makes every
gradient a slice, pad or matmul, which XLA:CPU runs several times faster. On
GPU/TPU the native ops are the fast ones. Both lowerings compute the same
function with the same parameter names and shapes, so checkpoints move freely
between them; ``impl='auto'`` decides by the default backend.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

IMPLS = ('auto', 'native', 'matmul')


def resolve_impl(impl: str) -> str:
  """Maps 'auto' to 'matmul' on CPU and 'native' elsewhere."""
  if impl not in IMPLS:
    raise ValueError(f'unknown conv_impl {impl!r}; known: {", ".join(IMPLS)}')
  if impl == 'auto':
    return 'matmul' if jax.default_backend() == 'cpu' else 'native'
  return impl


def _pad_same(x: jax.Array, kernel_size: Sequence[int]) -> jax.Array:
  pads = [(0, 0)]
  for k in kernel_size:
    pads.append(((k - 1) // 2, k // 2))
  pads.append((0, 0))
  return jnp.pad(x, pads)


class Conv(nn.Module):
  """Stride-1 N-d convolution (1-D or 2-D), 'VALID' or 'SAME' padding.

  Parameters are ``kernel`` of shape ``(*kernel_size, in, features)`` and
  ``bias`` of shape ``(features,)``, exactly as ``flax.linen.Conv``.
  """
  features: int
  kernel_size: Sequence[int]
  padding: str = 'VALID'
  impl: str = 'auto'
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    impl = resolve_impl(self.impl)
    ks = tuple(self.kernel_size)
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*ks, x.shape[-1], self.features), self.param_dtype)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.features,),
                      self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self.padding not in ('VALID', 'SAME'):
      raise ValueError(f"padding must be 'VALID' or 'SAME', got {self.padding!r}")
    if impl == 'native':
      nd = len(ks)
      spec = ('NWC', 'WIO', 'NWC') if nd == 1 else ('NHWC', 'HWIO', 'NHWC')
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=(1,) * nd, padding=self.padding,
          dimension_numbers=spec)
      return y + bias
    if self.padding == 'SAME':
      x = _pad_same(x, ks)
    spatial = x.shape[1:-1]
    out = [s - k + 1 for s, k in zip(spatial, ks)]
    # One shifted slice per kernel tap, concatenated on the channel axis, in
    # the same (taps..., in) order as the flattened kernel.
    patches = []
    for offset in _taps(ks):
      idx = (slice(None),) + tuple(slice(o, o + n) for o, n in zip(offset, out))
      patches.append(x[idx])
    patches = jnp.concatenate(patches, axis=-1)
    y = patches @ kernel.reshape(-1, self.features)
    return y + bias


def _taps(kernel_size: Sequence[int]):
  if len(kernel_size) == 1:
    return [(i,) for i in range(kernel_size[0])]
  return [(i,) + rest for i in range(kernel_size[0]) for rest in _taps(kernel_size[1:])]


def max_pool(x: jax.Array, window: int, impl: str = 'auto') -> jax.Array:
  """Non-overlapping max-pool (stride = window, 'VALID': a remainder is cut).

  Works on 1-D ``(N, L, C)`` and 2-D ``(N, H, W, C)`` inputs.
  """
  impl = resolve_impl(impl)
  nd = x.ndim - 2
  if impl == 'native':
    return nn.max_pool(x, (window,) * nd, strides=(window,) * nd, padding='VALID')
  spatial = x.shape[1:-1]
  kept = [s // window * window for s in spatial]
  x = x[(slice(None),) + tuple(slice(0, k) for k in kept)]
  shape = [x.shape[0]]
  for k in kept:
    shape += [k // window, window]
  shape.append(x.shape[-1])
  x = x.reshape(shape)
  return x.max(axis=tuple(2 + 2 * i for i in range(nd)))


class MaxPool(nn.Module):
  """Module form of :func:`max_pool`, so model summaries list it as a layer."""
  window: int = 2
  impl: str = 'auto'

  def __call__(self, x: jax.Array) -> jax.Array:
    return max_pool(x, self.window, impl=self.impl)


class Flatten(nn.Module):
  """Flattens all but the batch axis (a named layer in model summaries)."""

  def __call__(self, x: jax.Array) -> jax.Array:
    return x.reshape(x.shape[0], -1)


class LSTM(nn.Module):
  """An LSTM layer over (N, T, C): the whole sequence, or only its last step.

  Mirrors Keras' ``LSTM(units, return_sequences=...)`` used by the paper, so
  Table 2 reads the same here. Gate parameters as ``OptimizedLSTMCell``:
  ``4 * (in * units + units * units + units)``.
  """
  features: int
  return_sequences: bool = True
  dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = nn.RNN(nn.OptimizedLSTMCell(self.features, dtype=self.dtype, name='cell'))(x)
    return y if self.return_sequences else y[:, -1]


class RasterSequence(nn.Module):
  """(N, H, W, C) -> (N, H*W, C): a feature map read row by row as a sequence."""

  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    return x.reshape(n, h * w, c)
