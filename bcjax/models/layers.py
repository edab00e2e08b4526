"""Convolution and max-pooling with a backend-chosen lowering.

Why this exists: the fastest convolution differs by backend. On CPU it is
oneDNN's JIT kernels (PyTorch's too), which ``impl='onednn'`` calls through the
XLA FFI (:mod:`bcjax.onednn`; several times XLA:CPU's own code for the
extractors' layers, ``docs/benchmarks.md``). Where those kernels cannot be
built, ``impl='matmul'`` is the CPU fallback: XLA:CPU lowers the gradient of ``lax.conv_general_dilated`` with
respect to its input to a slow generic transposed convolution, and the gradient
of ``lax.reduce_window`` max-pooling to a slow select-and-scatter (measured in
``docs/benchmarks.md``), so the convolution is written as shifted slices +
one matmul ("im2col") and the pool as reshape + max, making every gradient a
slice, pad or matmul. On GPU/TPU the native ops are the fast ones. All
lowerings compute the same function with the same parameter names and shapes,
so checkpoints move freely between them; ``impl='auto'`` decides by the
default backend.

The other layers here exist for the same reasons: a dropout that draws fewer
random bits (:class:`Dropout`), BatchNorm -> ReLU -> pool fused for XLA:CPU
(:class:`BatchNormReluPool`), and Keras-shaped LSTM / flatten / raster layers
so the paper's tables read the same in code.
"""

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from bcjax.errors import UserError
from bcjax.models import initializers as inits
from bcjax.onednn import build as onednn_build
from bcjax.onednn import conv as onednn_conv

IMPLS = ('auto', 'native', 'matmul', 'onednn')


def resolve_impl(impl: str) -> str:
  """Maps 'auto' to 'onednn' on CPU ('matmul' where it cannot be built) and 'native' elsewhere.

  Pooling and the fused BatchNorm stage treat 'onednn' as 'matmul': only
  convolutions go to oneDNN.
  """
  if impl not in IMPLS:
    raise ValueError(f'unknown conv_impl {impl!r}; known: {", ".join(IMPLS)}')
  if impl == 'auto':
    if jax.default_backend() != 'cpu':
      return 'native'
    return 'onednn' if onednn_build.available() else 'matmul'
  if impl == 'onednn' and not onednn_build.available():
    raise UserError(f"conv_impl='onednn': {onednn_build.status().reason}")
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
  ``bias`` of shape ``(features,)``, exactly as ``flax.linen.Conv``, drawn as
  the ``initializers`` scheme says (:mod:`bcjax.models.initializers`).
  """
  features: int
  kernel_size: Sequence[int]
  padding: str = 'VALID'
  impl: str = 'auto'
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32
  initializers: str = 'flax'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    impl = resolve_impl(self.impl)
    ks = tuple(self.kernel_size)
    shape = (*ks, x.shape[-1], self.features)
    kernel = self.param('kernel', inits.kernel(self.initializers), shape, self.param_dtype)
    bias = self.param('bias', inits.bias(self.initializers, inits.fan_in(shape)),
                      (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    if self.padding not in ('VALID', 'SAME'):
      raise ValueError(f"padding must be 'VALID' or 'SAME', got {self.padding!r}")
    if impl == 'onednn' and x.dtype == jnp.float32 and kernel.dtype == jnp.float32:
      pads = (onednn_conv.same_padding(ks) if self.padding == 'SAME'
              else tuple((0, 0) for _ in ks))
      return onednn_conv.conv(x, kernel, bias, pads)
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


def _dyadic_bits(rate: float) -> int | None:
  """Fewest random bits b (1, 2, 4 or 8) with rate * 2**b whole, or None."""
  for bits in (1, 2, 4, 8):
    if float(rate * 2 ** bits).is_integer():
      return bits
  return None


def dropout_keep_mask(rng: jax.Array, rate: float, shape: Sequence[int]) -> jax.Array:
  """Boolean keep-mask, each entry True with probability ``1 - rate``, independently.

  Why not ``jax.random.bernoulli``: it spends 32 random bits (one threefry
  output) per element, and drawing them was a measurable part of the CNN's CPU
  train step (``docs/benchmarks.md``). A dyadic rate ``k / 2**b`` (0.5, 0.25, 0.125,
  ...) needs only ``b`` bits: each 32-bit word is cut into ``32 / b`` fields,
  uniform on ``[0, 2**b)``, and an element is kept when its field is at least
  ``k``, with probability exactly ``1 - rate``. Other rates fall back to
  ``jax.random.bernoulli`` (flax's own mask, draw for draw).
  """
  bits = _dyadic_bits(rate)
  if bits is None:
    return jax.random.bernoulli(rng, 1.0 - rate, tuple(shape))
  n = 1
  for d in shape:
    n *= d
  per_word = 32 // bits
  words = jax.random.bits(rng, (-(-n // per_word),), jnp.uint32)
  shifts = jnp.arange(per_word, dtype=jnp.uint32) * bits
  fields = (words[:, None] >> shifts) & jnp.uint32(2 ** bits - 1)
  threshold = jnp.uint32(round(rate * 2 ** bits))
  return (fields.reshape(-1)[:n] >= threshold).reshape(shape)


class Dropout(nn.Module):
  """Inverted dropout as ``flax.linen.Dropout``, with :func:`dropout_keep_mask`'s mask.

  Kept elements are scaled by ``1 / (1 - rate)``; no variables; the key comes
  from the ``'dropout'`` rng collection, as in flax.
  """
  rate: float
  deterministic: bool | None = None
  rng_collection: str = 'dropout'

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool | None = None) -> jax.Array:
    deterministic = nn.merge_param('deterministic', self.deterministic, deterministic)
    if deterministic or self.rate == 0.0:
      return x
    if self.rate == 1.0:
      return jnp.zeros_like(x)
    keep = dropout_keep_mask(self.make_rng(self.rng_collection), self.rate, x.shape)
    return jax.lax.select(keep, x / (1.0 - self.rate), jnp.zeros_like(x))


class Dense(nn.Module):
  """``flax.linen.Dense`` (same ``kernel``/``bias`` names and shapes) with a scheme's initialisers."""
  features: int
  dtype: jnp.dtype | None = None
  param_dtype: jnp.dtype = jnp.float32
  initializers: str = 'flax'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (x.shape[-1], self.features)
    kernel = self.param('kernel', inits.kernel(self.initializers), shape, self.param_dtype)
    bias = self.param('bias', inits.bias(self.initializers, inits.fan_in(shape)),
                      (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
    return y + jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))


class _GateParams(nn.Module):
  """One gate's ``kernel`` (and ``bias``), where ``OptimizedLSTMCell`` keeps them."""
  shape: tuple[int, int]
  kernel_init: Callable
  bias_init: Callable | None = None

  @nn.compact
  def __call__(self):
    k = self.param('kernel', self.kernel_init, self.shape, jnp.float32)
    b = None if self.bias_init is None else self.param('bias', self.bias_init, self.shape[-1:],
                                                       jnp.float32)
    return k, b


class _LSTMParams(nn.Module):
  """The cell's parameters in ``OptimizedLSTMCell``'s tree: ``i{gate}/kernel`` (input),
  ``h{gate}/kernel`` and ``h{gate}/bias`` (recurrent), gates i, f, g, o."""
  features: int
  initializers: str = 'flax'

  @nn.compact
  def __call__(self, n_in: int):
    shared = self.make_rng('params') if self.is_initializing() else None
    per_gate = inits.lstm(self.initializers, n_in, self.features, shared)
    wi, wh, b = [], [], []
    for gate in inits.LSTM_GATES:
      k_in, k_rec, k_bias = per_gate[gate]
      wi.append(_GateParams((n_in, self.features), k_in, name=f'i{gate}')()[0])
      k, bias = _GateParams((self.features, self.features), k_rec, k_bias, name=f'h{gate}')()
      wh.append(k)
      b.append(bias)
    return (jnp.concatenate(wi, axis=-1), jnp.concatenate(wh, axis=-1),
            jnp.concatenate(b, axis=-1))


class LSTM(nn.Module):
  """An LSTM layer over (N, T, C): the whole sequence, or only its last step.

  Mirrors Keras' ``LSTM(units, return_sequences=...)`` used by the paper, so
  Table 2 reads the same here: sigmoid gates, tanh cell, gate order i, f, g
  (Keras' c), o, one bias. Parameters as ``OptimizedLSTMCell`` keeps them
  (``cell/{ii,if,ig,io}/kernel``, ``cell/{hi,hf,hg,ho}/{kernel,bias}``):
  ``4 * (in * units + units * units + units)``. The input projection of every
  step is one matmul before the scan; the scan does only the recurrent one.
  """
  features: int
  return_sequences: bool = True
  dtype: jnp.dtype | None = None
  initializers: str = 'flax'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    wi, wh, b = _LSTMParams(self.features, self.initializers, name='cell')(x.shape[-1])
    x, wi, wh, b = nn.dtypes.promote_dtype(x, wi, wh, b, dtype=self.dtype)
    xw = jnp.einsum('ntc,cg->tng', x, wi)  # (T, N, 4 * units), time first for the scan.
    n, u = x.shape[0], self.features

    def step(carry, xw_t):
      c, h = carry
      z = xw_t + (h @ wh + b)
      i, f, g, o = jnp.split(z, 4, axis=-1)
      c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
      h = jax.nn.sigmoid(o) * jnp.tanh(c)
      return (c, h), h

    zeros = jnp.zeros((n, u), xw.dtype)
    (_, h), hs = jax.lax.scan(step, (zeros, zeros), xw)
    return jnp.swapaxes(hs, 0, 1) if self.return_sequences else h


class RasterSequence(nn.Module):
  """(N, H, W, C) -> (N, H*W, C): a feature map read row by row as a sequence."""

  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    return x.reshape(n, h * w, c)


# --------------------------------------------------------------------------
# BatchNorm -> ReLU -> max-pool as one differentiable function.
#
# Why: in the cnn_lstm extractor at 224 px, batch 128, every full-resolution
# map is 411 MB (16 channels) and XLA's autodiff of flax BatchNorm, ReLU and
# the pool keeps and re-reads several of them (normalised map, ReLU output,
# pool masks, BatchNorm's backward passes). Memory traffic, not arithmetic,
# bounds that step on CPU. Here the forward reads the conv output twice (batch
# statistics, then normalise + pool in one pass) and keeps, besides it, only
# quarter-size maps: which window position won (int8, -1 where ReLU zeroes the
# output) and the conv output there. ReLU is applied after the pool (relu and
# max commute). The backward reduces on those quarter-size maps and writes the
# input gradient in one full-size pass. Like XLA's select-and-scatter (the
# native pool's gradient) and PyTorch, a window's first maximum takes the whole
# cotangent; jnp.max's gradient would share it among exact ties instead.
# Measured: docs/benchmarks.md.

def _pool_windows(x: jax.Array, window: int) -> jax.Array:
  """(N, H, W, C) -> (N, H/w, w, W/w, w, C); spatial sizes divisible by w."""
  n, h, w, c = x.shape
  return x.reshape(n, h // window, window, w // window, window, c)


def _batch_moments(x, axis_name):
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(jnp.float32)
  mean = xf.mean(axes)
  mean2 = (xf * xf).mean(axes)
  if axis_name is not None:
    mean, mean2 = jax.lax.pmean(jnp.stack([mean, mean2]), axis_name)
  var_raw = mean2 - mean * mean
  return mean, jnp.maximum(0.0, var_raw), var_raw


def _bn_relu_pool_fwd_impl(x, scale, bias, window, axis_name, epsilon, pool_impl='matmul'):
  """Train-mode forward under plain autodiff: (pooled output, batch mean, batch var)."""
  mean, var, _ = _batch_moments(x, axis_name)
  y = (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias
  # relu(max(y)) == max(relu(y)): ReLU on the pooled map is 1/window**2 the work.
  return jax.nn.relu(max_pool(y, window, impl=pool_impl)), mean, var


def _normalise_and_pool(x, mean, mul, bias, window):
  """Max over each window of (x - mean) * mul + bias: (max, winner index, x at winner)."""
  xw = _pool_windows(x, window)
  best = best_x = winner = None
  for k in range(window * window):
    xk = xw[:, :, k // window, :, k % window, :]
    yk = (xk - mean) * mul + bias
    if best is None:
      best, best_x, winner = yk, xk, jnp.zeros(yk.shape, jnp.int8)
      continue
    better = yk > best  # Strict: the first maximum keeps a tie.
    best = jnp.where(better, yk, best)
    best_x = jnp.where(better, xk, best_x)
    winner = jnp.where(better, jnp.int8(k), winner)
  return best, winner, best_x


def _make_bn_relu_pool(window, axis_name, epsilon):
  @jax.custom_vjp
  def f(x, scale, bias):
    return fwd(x, scale, bias)[0]

  def fwd(x, scale, bias):
    mean, var, var_raw = _batch_moments(x, axis_name)
    mul = jax.lax.rsqrt(var + epsilon) * scale
    best, winner, best_x = _normalise_and_pool(x, mean, mul, bias, window)
    winner = jnp.where(best > 0, winner, jnp.int8(-1))  # ReLU passes no gradient there.
    return (jax.nn.relu(best), mean, var), (x, winner, best_x, mean, var, var_raw, scale)

  def bwd(res, g):
    x, winner, best_x, mean, var, var_raw, scale = res
    gp, gmean_ext, gvar_ext = g
    n = x.size // x.shape[-1]
    r = jax.lax.rsqrt(var + epsilon)
    mul = r * scale
    # The normalised map's cotangent is gp at each window's winner, 0 elsewhere,
    # so its sums over the batch are sums over the pooled map.
    g_win = jnp.where(winner >= 0, gp, 0.0)
    axes = tuple(range(x.ndim - 1))
    sum_gy = g_win.sum(axes)
    sum_gy_xc = (g_win * (best_x - mean)).sum(axes)
    gscale = sum_gy_xc * r
    gbias = sum_gy
    # Cotangents of the batch statistics (mean m, var v = m2 - m^2, r = (v+eps)^-1/2).
    gr = sum_gy_xc * scale
    gv = gr * (-0.5) * r * r * r + gvar_ext
    gv = jnp.where(var_raw > 0, gv, 0.0)
    gm = -sum_gy * mul + gmean_ext - 2.0 * mean * gv
    gm2 = gv
    if axis_name is not None:
      gm, gm2 = jax.lax.pmean(jnp.stack([gm, gm2]), axis_name)
    position = (jnp.arange(window, dtype=jnp.int8)[:, None, None] * window
                + jnp.arange(window, dtype=jnp.int8)[None, None, :])[None, None, :, :, :, None]
    hit = winner[:, :, None, :, None, :] == position
    gyw = jnp.where(hit, (g_win * mul)[:, :, None, :, None, :], 0.0)
    dx = gyw + gm / n + gm2 * (2.0 / n) * _pool_windows(x, window)
    return dx.reshape(x.shape).astype(x.dtype), gscale, gbias

  f.defvjp(fwd, bwd)
  return f


class BatchNormReluPool(nn.Module):
  """``nn.BatchNorm`` -> ReLU -> :func:`max_pool` (2-D), fused for XLA:CPU.

  Same variables as ``flax.linen.BatchNorm`` (params ``scale``/``bias``,
  batch_stats ``mean``/``var``), same function and gradient (where a pool
  window holds exact ties, its first maximum takes the cotangent, as the
  native pool's gradient gives it).
  """
  use_running_average: bool
  window: int = 2
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: jnp.dtype | None = None
  axis_name: str | None = None
  impl: str = 'auto'  # CPU ('onednn', 'matmul'): fused; 'native': XLA's autodiff.

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    f = x.shape[-1]
    ra_mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32), (f,))
    ra_var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32), (f,))
    scale = self.param('scale', nn.initializers.ones, (f,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (f,), jnp.float32)
    impl = resolve_impl(self.impl)
    if self.use_running_average:
      y = (x - ra_mean.value) * (jax.lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias
      return jax.nn.relu(max_pool(y, self.window, impl=impl))
    if impl != 'native' and x.ndim == 4 and all(s % self.window == 0 for s in x.shape[1:-1]):
      p, mean, var = _make_bn_relu_pool(self.window, self.axis_name, self.epsilon)(
          x, scale, bias)
    else:
      p, mean, var = _bn_relu_pool_fwd_impl(x, scale, bias, self.window,
                                            self.axis_name, self.epsilon, impl)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return p
