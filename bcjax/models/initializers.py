"""Initialisers as an experiment choice: Keras's, PyTorch's or Flax's defaults.

Why this exists: the same network starts from different weights in different
frameworks, and for the paper's Table 1 CNN that alone moves test accuracy by
many points (docs/initializers.md). A framework default is an experiment
choice, so ``config.model.initializers`` names one of three schemes and every
layer of every model takes its kernel, bias and recurrent initialisers from it:

=========  =============================  ============================  ==========================
scheme     conv / dense kernels           conv / dense biases           LSTM
=========  =============================  ============================  ==========================
``keras``  Glorot-uniform                 zeros                         Glorot-uniform input
           (``sqrt(6 / (fan_in +                                        kernel over all four
           fan_out))``)                                                 gates, orthogonal
                                                                        recurrent kernel over all
                                                                        four gates, bias zeros
                                                                        with forget gate 1
``torch``  U(+-1/sqrt(fan_in))            U(+-1/sqrt(fan_in))           every weight
           (``kaiming_uniform(a=sqrt 5)``)                              U(+-1/sqrt(units)); bias
                                                                        the sum of PyTorch's two
                                                                        (``b_ih + b_hh``)
``flax``   LeCun-normal (truncated)       zeros                         LeCun-normal input kernel
                                                                        per gate, orthogonal
                                                                        recurrent kernel per gate,
                                                                        bias zeros
=========  =============================  ============================  ==========================

``fan_in`` of a convolution is ``prod(kernel_size) * in``, as all three
frameworks count it. Attention layers (``cnn_attention``, beyond the paper)
follow the same pattern: Keras's MultiHeadAttention is Glorot-uniform with zero
biases, PyTorch's ``nn.MultiheadAttention`` Xavier-uniform input projections
with zero biases and a default ``Linear`` output projection with a zero bias,
Flax's LeCun-normal with zero biases. Normalisation layers start at scale 1,
offset 0 in every framework; ``cnn_attention``'s position embedding and
pooling query are the model's own choice and do not change with the scheme.

Keras draws an LSTM's input kernel as one ``(in, 4 * units)`` matrix and its
recurrent kernel as one orthogonal ``(units, 4 * units)`` matrix (orthonormal
rows); Flax keeps one kernel per gate. :func:`lstm` draws the joint matrix and
hands each gate its slice, so the 'keras' weights have Keras's distribution
exactly while checkpoints keep Flax's per-gate layout (gate order i, f, g, o
in all three frameworks).

Parameter shapes, names and counts never depend on the scheme: a checkpoint
trained under one loads under another.
"""

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import initializers as flax_init

from bcjax.errors import UserError

Initializer = Callable[..., jax.Array]

SCHEMES = ('keras', 'torch', 'flax')
LSTM_GATES = ('i', 'f', 'g', 'o')  # Keras, PyTorch and Flax all order the gates so.


def check(scheme: str) -> str:
  if scheme not in SCHEMES:
    raise UserError(f'unknown config.model.initializers {scheme!r}; known: {", ".join(SCHEMES)}')
  return scheme


def _uniform(bound: float) -> Initializer:
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def kernel(scheme: str) -> Initializer:
  """Kernels of shape ``(*window, in, out)`` (conv) or ``(in, out)`` (dense)."""
  check(scheme)
  if scheme == 'keras':
    return flax_init.glorot_uniform()
  if scheme == 'torch':
    # kaiming_uniform_(a=sqrt(5)): bound = sqrt(6 / ((1 + 5) * fan_in)) = 1 / sqrt(fan_in).
    return flax_init.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
  return flax_init.lecun_normal()


def bias(scheme: str, fan_in: int) -> Initializer:
  """Biases of a conv or dense layer whose kernel has ``fan_in`` inputs per output."""
  check(scheme)
  if scheme == 'torch':
    return _uniform(1.0 / np.sqrt(fan_in))
  return flax_init.zeros_init()


def attention(scheme: str) -> dict[str, Initializer]:
  """Keyword arguments for ``flax.linen.MultiHeadDotProductAttention``.

  Flax initialises each projection's kernel as one ``(in, heads * head_dim)``
  matrix (``DenseGeneral`` flattens it), so fans are those of that matrix.
  """
  check(scheme)
  if scheme == 'keras':
    return dict(kernel_init=flax_init.glorot_uniform(), bias_init=flax_init.zeros_init())
  if scheme == 'torch':
    return dict(kernel_init=flax_init.xavier_uniform(), bias_init=flax_init.zeros_init(),
                out_kernel_init=kernel('torch'), out_bias_init=flax_init.zeros_init())
  return dict(kernel_init=flax_init.lecun_normal(), bias_init=flax_init.zeros_init())


def lstm(scheme: str, n_in: int, units: int, shared_key: jax.Array | None
         ) -> dict[str, tuple[Initializer, Initializer, Initializer]]:
  """Per gate (``'i', 'f', 'g', 'o'``): (input kernel, recurrent kernel, bias) initialisers.

  ``shared_key`` seeds the joint ``(in, 4 * units)`` / ``(units, 4 * units)``
  draws that the 'keras' gates slice (the key each parameter is handed is
  then unused); the other schemes draw every gate independently, from the
  key flax hands that parameter.
  """
  check(scheme)
  out = {}
  for g, gate in enumerate(LSTM_GATES):
    if scheme == 'keras':
      cols = slice(g * units, (g + 1) * units)

      # Flax also calls an initialiser abstractly, with a dummy key, to check a
      # loaded parameter's shape: then there is no shared key, only shapes.
      def input_kernel(key, shape, dtype=jnp.float32, cols=cols):
        k = jax.random.fold_in(key if shared_key is None else shared_key, 0)
        return flax_init.glorot_uniform()(k, (n_in, 4 * units), dtype)[:, cols].reshape(shape)

      def recurrent_kernel(key, shape, dtype=jnp.float32, cols=cols):
        k = jax.random.fold_in(key if shared_key is None else shared_key, 1)
        return flax_init.orthogonal()(k, (units, 4 * units), dtype)[:, cols].reshape(shape)

      forget = gate == 'f'

      def gate_bias(key, shape, dtype=jnp.float32, forget=forget):
        del key
        return jnp.full(shape, 1.0 if forget else 0.0, dtype)  # unit_forget_bias=True
      out[gate] = (input_kernel, recurrent_kernel, gate_bias)
    elif scheme == 'torch':
      bound = 1.0 / np.sqrt(units)

      def two_biases(key, shape, dtype=jnp.float32, bound=bound):
        k1, k2 = jax.random.split(key)  # b_ih + b_hh, each U(+-1/sqrt(units)).
        return _uniform(bound)(k1, shape, dtype) + _uniform(bound)(k2, shape, dtype)
      out[gate] = (_uniform(bound), _uniform(bound), two_biases)
    else:
      out[gate] = (flax_init.lecun_normal(), flax_init.orthogonal(), flax_init.zeros_init())
  return out


def fan_in(kernel_shape: Sequence[int]) -> int:
  """Inputs per output of a ``(*window, in, out)`` kernel."""
  return int(np.prod(kernel_shape[:-1]))
