"""The same network, the same numbers: bcjax against Keras (the paper's framework) and PyTorch.

Three things are pinned here:

- each initialiser scheme (``config.model.initializers``) draws what its
  framework draws: bounds, variances, the LSTM's forget-gate bias, the joint
  orthogonal recurrent kernel;
- with the same weights copied in, bcjax's forward pass (every convolution
  lowering) equals the paper's Table 1 and Table 2 built as Keras layers
  (``benchmarks/keras_reference.py``) within 1e-5 in eval mode, which fixes
  the flatten order, the LSTM's gate order and BatchNorm's conventions;
- the same against the PyTorch peers (``benchmarks/torch_reference.py``).

Keras runs on the JAX backend (no TensorFlow needed); PyTorch comes with the
``bench`` extra. Each comparison is skipped when its framework is missing.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax import models
from bcjax.errors import UserError
from bcjax.models import initializers as inits
from bcjax.models import layers
from bcjax.onednn import build as onednn_build
from configs import cnn as cnn_config
from configs import cnn_lstm as cnn_lstm_config

LOWERINGS = ['native', 'matmul'] + (['onednn'] if onednn_build.available() else [])


def _init(config, scheme, seed=0):
  config.model.initializers = scheme
  model = models.build_model(config)
  x = jnp.zeros((1, config.image_size, config.image_size, 3))
  return model, model.init(jax.random.key(seed), x, train=False)


def _flat(tree):
  return {'/'.join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


# --------------------------------------------------------------------------
# What each scheme draws.

@pytest.mark.parametrize('scheme', inits.SCHEMES)
def test_table1_initial_weights_follow_the_scheme(scheme):
  _, variables = _init(cnn_config.get_config(), scheme)
  p = _flat(variables['params'])
  for name in ('conv1', 'conv2', 'dense1', 'logits'):
    k, b = p[f'{name}/kernel'], p[f'{name}/bias']
    fan_in, fan_out = inits.fan_in(k.shape), int(np.prod(k.shape[:-2])) * k.shape[-1]
    if scheme == 'keras':
      bound = np.sqrt(6.0 / (fan_in + fan_out))
      assert np.abs(k).max() <= bound and np.abs(k).max() > 0.95 * bound
      np.testing.assert_allclose(k.var(), bound ** 2 / 3, rtol=0.25)
      assert not b.any()
    elif scheme == 'torch':
      bound = 1.0 / np.sqrt(fan_in)
      for w in (k, b):
        assert np.abs(w).max() <= bound
      assert np.abs(k).max() > 0.95 * bound
      np.testing.assert_allclose(k.var(), bound ** 2 / 3, rtol=0.25)
      assert np.abs(b).max() > 0.5 * bound  # PyTorch's biases are drawn, not zero.
    else:
      # LeCun normal: variance 1 / fan_in after truncation at 2 standard
      # deviations of the underlying normal (whose std is 1 / .8796 of that).
      assert np.abs(k).max() <= 2.0 / 0.87962566 / np.sqrt(fan_in) * 1.0001
      np.testing.assert_allclose(k.var(), 1.0 / fan_in, rtol=0.25)
      assert not b.any()


def _lstm_cell(scheme, seed=0):
  """The first LSTM of Table 2's head: 128 inputs, 100 units."""
  lstm = layers.LSTM(100, initializers=scheme)
  variables = lstm.init(jax.random.key(seed), jnp.zeros((1, 10, 128)))
  return _flat(variables['params']['cell'])


def test_keras_lstm_draws_one_joint_glorot_and_orthogonal_matrix():
  cell = _lstm_cell('keras')
  kernel = np.concatenate([cell[f'i{g}/kernel'] for g in 'ifgo'], axis=-1)   # (128, 400)
  recurrent = np.concatenate([cell[f'h{g}/kernel'] for g in 'ifgo'], axis=-1)  # (100, 400)
  bound = np.sqrt(6.0 / (128 + 400))  # Glorot over the joint (in, 4 * units) matrix.
  assert np.abs(kernel).max() <= bound and np.abs(kernel).max() > 0.95 * bound
  # Orthonormal rows over all four gates (no single gate's block is orthogonal).
  np.testing.assert_allclose(recurrent @ recurrent.T, np.eye(100), atol=1e-5)
  assert np.abs(cell['hf/kernel'] @ cell['hf/kernel'].T - np.eye(100)).max() > 0.1
  np.testing.assert_array_equal(cell['hf/bias'], 1.0)  # unit_forget_bias
  for g in 'igo':
    np.testing.assert_array_equal(cell[f'h{g}/bias'], 0.0)
  # The four gates are slices of one draw, not four equal draws.
  assert not np.array_equal(cell['ii/kernel'], cell['if/kernel'])


def test_torch_lstm_is_uniform_with_two_summed_biases():
  cell = _lstm_cell('torch')
  bound = 1.0 / np.sqrt(100)
  for g in 'ifgo':
    for w in (cell[f'i{g}/kernel'], cell[f'h{g}/kernel']):
      assert np.abs(w).max() <= bound and np.abs(w).max() > 0.95 * bound
  bias = np.concatenate([cell[f'h{g}/bias'] for g in 'ifgo'])
  # b_ih + b_hh: a triangular distribution on +-2 bound, variance 2 * bound^2 / 3.
  assert np.abs(bias).max() <= 2 * bound and np.abs(bias).max() > bound
  np.testing.assert_allclose(bias.var(), 2 * bound ** 2 / 3, rtol=0.3)


def test_flax_lstm_is_per_gate_orthogonal_with_zero_bias():
  cell = _lstm_cell('flax')
  for g in 'ifgo':
    np.testing.assert_allclose(cell[f'h{g}/kernel'] @ cell[f'h{g}/kernel'].T, np.eye(100),
                               atol=1e-5)
    np.testing.assert_array_equal(cell[f'h{g}/bias'], 0.0)


def test_schemes_change_values_not_the_tree():
  for config in (cnn_config.get_config(), cnn_lstm_config.get_config()):
    trees = []
    for scheme in inits.SCHEMES:
      config.model.initializers = scheme
      model = models.build_model(config)
      x = jnp.zeros((1, config.image_size, config.image_size, 3))
      trees.append(jax.eval_shape(lambda m=model, x=x: m.init(jax.random.key(0), x, train=False)))
    assert trees[0] == trees[1] == trees[2]
  conv = {s: layers.Conv(8, (3, 3), impl='native', initializers=s) for s in inits.SCHEMES}
  k = {s: np.asarray(c.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']['kernel'])
       for s, c in conv.items()}
  assert not np.array_equal(k['keras'], k['flax']) and not np.array_equal(k['torch'], k['flax'])


def test_paper_configs_default_to_keras_and_a_bad_scheme_is_one_line():
  assert cnn_config.get_config().model.initializers == 'keras'
  assert cnn_lstm_config.get_config().model.initializers == 'keras'
  config = cnn_config.get_config()
  config.model.initializers = 'lasagne'
  with pytest.raises(UserError, match="initializers 'lasagne'; known: keras, torch, flax"):
    models.build_model(config)


# --------------------------------------------------------------------------
# The same weights give the same outputs as Keras.

def _randomise_batch_stats(variables, seed=1):
  """Non-trivial BatchNorm scales, offsets and running statistics, to pin the conventions."""
  rng = np.random.default_rng(seed)
  out = flax.core.unfreeze(jax.tree.map(np.asarray, variables))
  flat = flax.traverse_util.flatten_dict(out)
  for key, v in flat.items():
    if key[-1] == 'var':
      flat[key] = rng.uniform(0.5, 2.0, v.shape).astype(np.float32)
    elif key[-1] == 'mean' or (key[-1] in ('scale', 'bias') and 'bn' in key[-2]):
      flat[key] = (rng.normal(size=v.shape) * 0.3 + (key[-1] == 'scale')).astype(np.float32)
  return flax.traverse_util.unflatten_dict(flat)


def _images(config, n=3, seed=0):
  return np.random.default_rng(seed).uniform(
      size=(n, config.image_size, config.image_size, 3)).astype(np.float32)


@pytest.fixture(scope='module')
def kr():
  pytest.importorskip('keras')
  from benchmarks import keras_reference
  return keras_reference


# Table 1 under XLA's own convolutions in the default run; the hybrid and the
# other lowerings (each a compile of its own) in the slow tier.
@pytest.mark.parametrize('name,impl', [
    (n, i) if (n, i) == ('cnn', 'native') else pytest.param(n, i, marks=pytest.mark.slow)
    for n in ('cnn', 'cnn_lstm') for i in LOWERINGS])
def test_models_match_keras(kr, name, impl):
  """Table 1 at 64 px, and the whole hybrid (tiny: two extractor stages, then Table 2's head)."""
  config = cnn_config.get_config() if name == 'cnn' else cnn_lstm_config.get_config('tiny')
  config.model.conv_impl = impl
  model, variables = _init(config, 'keras')
  variables = _randomise_batch_stats(variables)
  keras_model = kr.build(config)
  assert keras_model.count_params() == sum(x.size for x in jax.tree.leaves(variables))
  kr.copy_weights(keras_model, variables)
  x = _images(config)
  np.testing.assert_allclose(model.apply(variables, x, train=False), kr.predict(keras_model, x),
                             atol=1e-5, rtol=0)


def test_table2_head_matches_keras(kr):
  """The paper's head on its 49 x 64 sequence: gate order, LSTM bias, BatchNorm conventions."""
  config = cnn_lstm_config.get_config()
  head = models.cnn_lstm.SequenceHead(config.num_classes, config.model.dropout, 'native',
                                      initializers='keras', bn_momentum=config.model.bn_momentum,
                                      bn_epsilon=config.model.bn_epsilon)
  seq = np.random.default_rng(0).normal(size=(3, 49, 64)).astype(np.float32)
  variables = _randomise_batch_stats(head.init(jax.random.key(0), seq, train=False))
  keras_head = kr.table2_head(config)
  trainable = sum(np.size(w) for w in keras_head.trainable_weights)
  assert trainable == sum(x.size for x in jax.tree.leaves(variables['params'])) == 159_648
  assert keras_head.count_params() == 160_032  # The paper's total, with BatchNorm statistics.
  kr.copy_head_weights(keras_head, {'params': {'head': variables['params']},
                                    'batch_stats': {'head': variables['batch_stats']}})
  np.testing.assert_allclose(head.apply(variables, seq, train=False),
                             kr.predict(keras_head, seq), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------
# ... and as the PyTorch peers.

@pytest.fixture(scope='module')
def torch_ref():
  pytest.importorskip('torch')
  from benchmarks import torch_reference
  return torch_reference


def _to_torch(torch_model, variables, config):
  """bcjax variables -> the PyTorch peer's state dict (NCHW, (out, in) weights)."""
  import torch
  from benchmarks.keras_reference import lstm_weights  # The gate concatenation, one home.
  p = _flat(variables['params'])
  stats = _flat(variables.get('batch_stats', {}))
  sd = {}
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a))  # noqa: E731
  if config.model.name == 'cnn':
    sd['features.0.weight'] = t(p['conv1/kernel'].transpose(3, 2, 0, 1))
    sd['features.0.bias'] = t(p['conv1/bias'])
    sd['features.4.weight'] = t(p['conv2/kernel'].transpose(3, 2, 0, 1))
    sd['features.4.bias'] = t(p['conv2/bias'])
    # Flax flattens (h, w, c); PyTorch (c, h, w).
    k = p['dense1/kernel']
    c = 64
    side = int(np.sqrt(k.shape[0] // c))
    k = k.reshape(side, side, c, -1).transpose(2, 0, 1, 3).reshape(k.shape[0], -1)
    sd['classifier.1.weight'] = t(k.T)
    sd['classifier.1.bias'] = t(p['dense1/bias'])
    sd['classifier.4.weight'] = t(p['logits/kernel'].T)
    sd['classifier.4.bias'] = t(p['logits/bias'])
  else:
    for i, _ in enumerate(config.model.extractor_features):
      conv, bn = f'extractor/conv{i + 1}', f'extractor/bn{i + 1}'
      sd[f'extractor.{4 * i}.weight'] = t(p[f'{conv}/kernel'].transpose(3, 2, 0, 1))
      sd[f'extractor.{4 * i}.bias'] = t(p[f'{conv}/bias'])
      for ours, theirs in (('scale', 'weight'), ('bias', 'bias')):
        sd[f'extractor.{4 * i + 1}.{theirs}'] = t(p[f'{bn}/{ours}'])
      sd[f'extractor.{4 * i + 1}.running_mean'] = t(stats[f'{bn}/mean'])
      sd[f'extractor.{4 * i + 1}.running_var'] = t(stats[f'{bn}/var'])
    for j, i in ((0, 1), (3, 2)):
      sd[f'head_conv.{j}.weight'] = t(p[f'head/conv1d_{i}/kernel'].transpose(2, 1, 0))
      sd[f'head_conv.{j}.bias'] = t(p[f'head/conv1d_{i}/bias'])
      sd[f'head_conv.{j + 1}.weight'] = t(p[f'head/bn{i}/scale'])
      sd[f'head_conv.{j + 1}.bias'] = t(p[f'head/bn{i}/bias'])
      sd[f'head_conv.{j + 1}.running_mean'] = t(stats[f'head/bn{i}/mean'])
      sd[f'head_conv.{j + 1}.running_var'] = t(stats[f'head/bn{i}/var'])
    for i in (1, 2):
      cell = variables['params']['head'][f'lstm{i}']['cell']
      kernel, recurrent, bias = (np.asarray(a) for a in lstm_weights(cell))
      sd[f'lstm{i}.weight_ih_l0'] = t(kernel.T)
      sd[f'lstm{i}.weight_hh_l0'] = t(recurrent.T)
      sd[f'lstm{i}.bias_ih_l0'] = t(bias)
      sd[f'lstm{i}.bias_hh_l0'] = t(np.zeros_like(bias))
    sd['logits.weight'] = t(p['head/logits/kernel'].T)
    sd['logits.bias'] = t(p['head/logits/bias'])
  missing, unexpected = torch_model.load_state_dict(sd, strict=False)
  assert not unexpected and all('num_batches_tracked' in m for m in missing), (missing, unexpected)


@pytest.mark.parametrize('name', ['cnn', 'cnn_lstm'])
def test_models_match_the_pytorch_peers(torch_ref, name):
  import torch
  config = cnn_config.get_config() if name == 'cnn' else cnn_lstm_config.get_config('tiny')
  config.model.conv_impl = 'native'
  model, variables = _init(config, 'torch')
  variables = _randomise_batch_stats(variables)
  torch_model = torch_ref.build(config, channels_last=False)
  _to_torch(torch_model, variables, config)
  torch_model.eval()
  x = _images(config)
  with torch.no_grad():
    theirs = torch_model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(model.apply(variables, x, train=False), theirs, atol=1e-5, rtol=0)


def test_lstm_layer_matches_flax_optimized_cell():
  """The LSTM layer's own scan computes what ``OptimizedLSTMCell`` under ``nn.RNN`` does."""
  import flax.linen as nn
  x = np.random.default_rng(0).normal(size=(2, 10, 12)).astype(np.float32)
  ours = layers.LSTM(7, return_sequences=True, initializers='torch')
  variables = ours.init(jax.random.key(0), x)
  reference = nn.RNN(nn.OptimizedLSTMCell(7, name='cell'))
  np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x),
                             atol=1e-6, rtol=0)
