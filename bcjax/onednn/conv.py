"""``conv``: a stride-1 convolution (1-D or 2-D, NHWC / HWIO, plus bias) run by oneDNN.

The forward pass and both gradients are oneDNN primitives called through the
XLA FFI (``conv.cc``); :func:`jax.custom_vjp` ties them together, so
``jax.grad``, ``jit``, ``pmap``, ``shard_map`` and ``lax.scan`` treat the op
like any other. A gradient nobody uses (the input image's) is a dead custom
call that XLA removes. A 1-D convolution is the 2-D one with a height of 1.

Float32 only, CPU only: callers check :func:`bcjax.onednn.build.available`
first (``bcjax.models.layers.Conv`` does).
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.onednn import build

Padding = tuple[tuple[int, int], ...]


def same_padding(kernel_size: Sequence[int]) -> Padding:
  """'SAME' for stride 1, as XLA pads it: the extra row/column goes after."""
  return tuple(((k - 1) // 2, k // 2) for k in kernel_size)


def _attrs(padding: Padding) -> dict[str, np.int64]:
  (top, bottom), (left, right) = padding
  return dict(pad_top=np.int64(top), pad_bottom=np.int64(bottom),
              pad_left=np.int64(left), pad_right=np.int64(right))


def _call(target: str, shapes, *args, padding: Padding):
  if not build.available():
    raise RuntimeError(f'oneDNN kernels unavailable: {build.status().reason}')
  return jax.ffi.ffi_call(build.TARGETS[target], shapes,
                          vmap_method='sequential')(*args, **_attrs(padding))


def _forward(x, kernel, bias, padding):
  n, h, w, _ = x.shape
  kh, kw, _, features = kernel.shape
  (top, bottom), (left, right) = padding
  out = jax.ShapeDtypeStruct((n, h + top + bottom - kh + 1, w + left + right - kw + 1, features),
                             jnp.float32)
  return _call('BcjaxConvForward', out, x, kernel, bias, padding=padding)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv2d(x, kernel, bias, padding):
  return _forward(x, kernel, bias, padding)


def _conv2d_fwd(x, kernel, bias, padding):
  return _forward(x, kernel, bias, padding), (x, kernel)


def _conv2d_bwd(padding, residuals, g):
  x, kernel = residuals
  g = g.astype(jnp.float32)
  gx = _call('BcjaxConvBackwardData', jax.ShapeDtypeStruct(x.shape, jnp.float32),
             g, kernel, padding=padding)
  gk, gb = _call('BcjaxConvBackwardWeights',
                 (jax.ShapeDtypeStruct(kernel.shape, jnp.float32),
                  jax.ShapeDtypeStruct(kernel.shape[-1:], jnp.float32)),
                 x, g, padding=padding)
  return gx, gk, gb


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv(x: jax.Array, kernel: jax.Array, bias: jax.Array,
         padding: Sequence[tuple[int, int]]) -> jax.Array:
  """``conv_general_dilated(x, kernel, 1, padding, ('N..C', '..IO', 'N..C')) + bias``.

  Args:
    x: (N, W, C) or (N, H, W, C) float32.
    kernel: (KW, C, O) or (KH, KW, C, O) float32.
    bias: (O,) float32.
    padding: one (before, after) pair per spatial axis.
  """
  padding = tuple((int(a), int(b)) for a, b in padding)
  if x.ndim == 3:  # 1-D: a 2-D convolution over a height of 1.
    y = _conv2d(x[:, None], kernel[None], bias, ((0, 0),) + padding)
    return y[:, 0]
  if x.ndim != 4:
    raise ValueError(f'oneDNN conv takes 1-D or 2-D NHWC inputs, got shape {x.shape}')
  return _conv2d(x, kernel, bias, padding)
