"""The paper's two networks as Keras layers, the paper's own framework.

Why this exists: the paper's Tables 1 and 2 are Keras models. Building them
here layer for layer, copying bcjax's weights in and comparing outputs pins
what a table cannot say: the flatten order, the LSTM's gate order and bias,
'same' padding, pooling floors and the BatchNorm conventions
(``tests/test_fidelity.py``). Keras 3 runs on the JAX backend, so no
TensorFlow is needed::

    from benchmarks import keras_reference as kr
    model = kr.build(config)                      # a bcjax ml_collections config
    kr.copy_weights(model, variables)             # bcjax variables -> Keras
    logits = kr.predict(model, images)            # eval mode

The hybrids' BatchNorm follows bcjax's config (``bn_momentum``,
``bn_epsilon``; PyTorch's convention 0.9 / 1e-5), not Keras' defaults
(0.99 / 1e-3), so the two agree; :func:`build` says so in the layer's
arguments. Dropout is the identity in eval mode in both.
"""

from __future__ import annotations

import os

os.environ.setdefault('KERAS_BACKEND', 'jax')

import keras  # noqa: E402  (the backend is chosen before the import)
import numpy as np  # noqa: E402


def _bn(config, name: str) -> keras.layers.Layer:
  # Keras' momentum is the running average's decay, as in Flax.
  return keras.layers.BatchNormalization(momentum=config.model.bn_momentum,
                                         epsilon=config.model.bn_epsilon, name=name)


def table1(config) -> keras.Model:
  """Table 1: Conv 32, pool, drop, Conv 64, pool, drop, flatten, Dense 64, drop, Dense."""
  m = config.model
  s = config.image_size
  x = inputs = keras.Input((s, s, 3))
  for i, f in enumerate((32, 64)):
    x = keras.layers.Conv2D(f, 3, activation='relu', name=f'conv{i + 1}')(x)
    x = keras.layers.MaxPooling2D(2)(x)
    x = keras.layers.Dropout(m.dropout_conv)(x)
  x = keras.layers.Flatten()(x)
  x = keras.layers.Dense(m.dense_features, activation='relu', name='dense1')(x)
  x = keras.layers.Dropout(m.dropout_dense)(x)
  x = keras.layers.Dense(config.num_classes, name='logits')(x)
  return keras.Model(inputs, x, name='cnn')


def table2_head(config, steps: int = 49, features: int = 64) -> keras.Model:
  """Table 2: the Conv1D + BatchNorm + MaxPool1D x2, LSTM 100, LSTM 50, Dense head."""
  x = inputs = keras.Input((steps, features))
  x = _head_layers(config, x)
  return keras.Model(inputs, x, name='table2_head')


def _head_layers(config, x):
  for i, f in enumerate((64, 128)):
    x = keras.layers.Conv1D(f, 3, name=f'head_conv1d_{i + 1}')(x)
    x = _bn(config, f'head_bn{i + 1}')(x)
    x = keras.layers.MaxPooling1D(2)(x)
  x = keras.layers.LSTM(100, return_sequences=True, name='head_lstm1')(x)
  x = keras.layers.Dropout(config.model.dropout)(x)
  x = keras.layers.LSTM(50, name='head_lstm2')(x)
  x = keras.layers.Dropout(config.model.dropout)(x)
  return keras.layers.Dense(config.num_classes, name='head_logits')(x)


def cnn_lstm(config) -> keras.Model:
  """The whole hybrid: (conv 3x3 same, BatchNorm, ReLU, max-pool 2) stages, raster read, head."""
  s = config.image_size
  x = inputs = keras.Input((s, s, 3))
  for i, f in enumerate(config.model.extractor_features):
    x = keras.layers.Conv2D(f, 3, padding='same', name=f'extractor_conv{i + 1}')(x)
    x = _bn(config, f'extractor_bn{i + 1}')(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.MaxPooling2D(2)(x)
  side, c = x.shape[1], x.shape[-1]
  x = keras.layers.Reshape((side * side, c))(x)  # Row by row: the paper's 49 x 64.
  x = _head_layers(config, x)
  return keras.Model(inputs, x, name='cnn_lstm')


def build(config) -> keras.Model:
  """The Keras twin of ``config.model.name`` ('cnn' or 'cnn_lstm')."""
  if config.model.name == 'cnn':
    return table1(config)
  if config.model.name == 'cnn_lstm':
    return cnn_lstm(config)
  raise ValueError(f"no Keras twin of model {config.model.name!r}; known: 'cnn', 'cnn_lstm'")


def lstm_weights(cell: dict) -> list[np.ndarray]:
  """Flax's per-gate LSTM tree -> Keras' [kernel, recurrent_kernel, bias] (gates i, f, c, o)."""
  gates = 'ifgo'
  kernel = np.concatenate([cell[f'i{g}']['kernel'] for g in gates], axis=-1)
  recurrent = np.concatenate([cell[f'h{g}']['kernel'] for g in gates], axis=-1)
  bias = np.concatenate([cell[f'h{g}']['bias'] for g in gates], axis=-1)
  return [kernel, recurrent, bias]


def _head_weights(params: dict, stats: dict) -> dict[str, list[np.ndarray]]:
  w = {}
  for i in (1, 2):
    conv = params[f'conv1d_{i}']
    w[f'head_conv1d_{i}'] = [conv['kernel'], conv['bias']]
    bn, st = params[f'bn{i}'], stats[f'bn{i}']
    w[f'head_bn{i}'] = [bn['scale'], bn['bias'], st['mean'], st['var']]
  for i in (1, 2):
    w[f'head_lstm{i}'] = lstm_weights(params[f'lstm{i}']['cell'])
  w['head_logits'] = [params['logits']['kernel'], params['logits']['bias']]
  return w


def _numpy_tree(tree) -> dict:
  return {k: (_numpy_tree(v) if hasattr(v, 'items') else np.asarray(v)) for k, v in tree.items()}


def _set(model: keras.Model, weights: dict[str, list[np.ndarray]]) -> None:
  for layer in model.layers:
    if layer.weights:
      layer.set_weights(weights.pop(layer.name))
  if weights:
    raise ValueError(f'bcjax weights without a Keras layer: {sorted(weights)}')


def copy_weights(model: keras.Model, variables: dict) -> None:
  """Sets every Keras layer's weights from bcjax's ``variables`` (params and batch_stats)."""
  p = _numpy_tree(variables['params'])
  stats = _numpy_tree(variables.get('batch_stats', {}))
  if 'head' in p:
    weights = _head_weights(p['head'], stats.get('head', {}))
    ex, ex_stats = p.get('extractor', {}), stats.get('extractor', {})
    for name in ex:
      if name.startswith('conv'):
        weights[f'extractor_{name}'] = [ex[name]['kernel'], ex[name]['bias']]
      elif name.startswith('bn'):
        weights[f'extractor_{name}'] = [ex[name]['scale'], ex[name]['bias'],
                                        ex_stats[name]['mean'], ex_stats[name]['var']]
  else:
    weights = {name: [p[name]['kernel'], p[name]['bias']] for name in p}
  _set(model, weights)


def predict(model: keras.Model, x: np.ndarray) -> np.ndarray:
  """Eval-mode forward pass (dropout off, BatchNorm from its moving statistics)."""
  return np.asarray(model(np.asarray(x), training=False))


def copy_head_weights(model: keras.Model, variables: dict) -> None:
  """Sets :func:`table2_head`'s weights from a cnn_lstm's ``variables``."""
  _set(model, _head_weights(_numpy_tree(variables['params']['head']),
                            _numpy_tree(variables['batch_stats']['head'])))


__all__ = ['build', 'table1', 'table2_head', 'cnn_lstm', 'copy_weights', 'copy_head_weights',
           'lstm_weights', 'predict']
