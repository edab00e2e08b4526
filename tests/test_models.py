"""Models: the paper's parameter counts, shapes, registry, lowering equivalence."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax import models
from bcjax.errors import UserError
from bcjax.models import layers
from bcjax.onednn import build as onednn_build
from configs import cnn, cnn_attention, cnn_lstm


def _count(tree) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def _init_shapes(config):
  model = models.build_model(config)
  x = jnp.zeros((2, config.image_size, config.image_size, 3))
  return jax.eval_shape(lambda: model.init(
      {'params': jax.random.key(0), 'dropout': jax.random.key(1)}, x, train=False))


def test_cnn_has_822792_parameters():
  variables = _init_shapes(cnn.get_config())
  assert set(variables) == {'params'}
  assert _count(variables['params']) == 822_792
  assert variables['params']['dense1']['kernel'].shape == (12_544, 64)
  assert variables['params']['logits']['kernel'].shape == (64, 8)


def test_cnn_lstm_head_matches_paper_table2():
  variables = _init_shapes(cnn_lstm.get_config())
  assert _count(variables['params']['head']) == 159_648
  assert _count(variables['batch_stats']['head']) == 384
  assert variables['params']['head']['lstm1']['cell']['hf']['kernel'].shape == (100, 100)


def test_cnn_lstm_extractor_yields_49_by_64_sequence():
  config = cnn_lstm.get_config()
  x = jnp.zeros((1, 224, 224, 3))
  extractor = models.cnn_lstm.FeatureExtractor(tuple(config.model.extractor_features))
  ev = jax.eval_shape(lambda: extractor.init(jax.random.key(0), x, train=False))
  out = jax.eval_shape(lambda v: extractor.apply(v, x, train=False), ev)
  assert out.shape == (1, 49, 64)


@pytest.mark.parametrize('config_module', [cnn, cnn_lstm, cnn_attention])
@pytest.mark.parametrize('train', [False, True])
def test_output_shapes_in_train_and_eval(config_module, train):
  config = config_module.get_config('tiny')
  model = models.build_model(config)
  x = jax.random.uniform(jax.random.key(0), (3, config.image_size, config.image_size, 3))
  variables = model.init({'params': jax.random.key(1)}, x, train=False)
  if train:
    logits, updates = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(2)},
                                  mutable=['batch_stats'])
    if 'batch_stats' in variables:  # BatchNorm statistics move in train mode only.
      moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                           variables['batch_stats'], updates['batch_stats'])
      assert any(jax.tree.leaves(moved))
  else:
    logits = model.apply(variables, x, train=False)
  assert logits.shape == (3, 8)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


def test_dropout_only_in_train_mode():
  config = cnn.get_config('tiny')
  model = models.build_model(config)
  x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
  variables = model.init({'params': jax.random.key(1)}, x, train=False)
  eval_a = model.apply(variables, x, train=False)
  eval_b = model.apply(variables, x, train=False)
  np.testing.assert_array_equal(eval_a, eval_b)
  train_a = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(3)})
  train_b = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(4)})
  assert not np.allclose(train_a, train_b)


@pytest.mark.parametrize('rate', [0.5, 0.25, 0.125, 0.75, 1 / 256])
def test_dyadic_dropout_keeps_each_element_independently_with_one_minus_rate(rate):
  shape = (512, 1024)
  keep = np.asarray(layers.dropout_keep_mask(jax.random.key(0), rate, shape))
  assert keep.shape == shape and keep.dtype == bool
  n, p = keep.size, 1 - rate
  assert abs(keep.mean() - p) < 6 * np.sqrt(p * (1 - p) / n)
  # Neighbours share a random word; they must still be independent.
  both = (keep[:, :-1] & keep[:, 1:]).mean()
  assert abs(both - p * p) < 6 * np.sqrt(p * p * (1 - p * p) / n)
  # And the mask is the documented function of the random bits.
  bits = layers._dyadic_bits(rate)
  words = np.asarray(jax.random.bits(jax.random.key(0), (n * bits // 32,), jnp.uint32))
  fields = (words[:, None] >> (np.arange(32 // bits, dtype=np.uint32) * bits)) & (2 ** bits - 1)
  np.testing.assert_array_equal(keep.ravel(), fields.ravel() >= round(rate * 2 ** bits))


@pytest.mark.parametrize('rate', [0.1, 0.2, 0.5])
def test_dropout_layer_matches_flax(rate):
  x = jax.random.normal(jax.random.key(1), (3, 37, 5))
  rngs = {'dropout': jax.random.key(2)}
  ours = layers.Dropout(rate).apply({}, x, deterministic=False, rngs=rngs)
  kept = np.asarray(ours) != 0
  np.testing.assert_allclose(np.asarray(ours)[kept], np.asarray(x / (1 - rate))[kept], rtol=1e-6)
  assert 0 < kept.mean() < 1
  theirs = nn.Dropout(rate).apply({}, x, deterministic=False, rngs=rngs)
  if layers._dyadic_bits(rate) is None:  # The same mask, draw for draw.
    np.testing.assert_array_equal(ours, theirs)
  np.testing.assert_array_equal(layers.Dropout(rate).apply({}, x, deterministic=True), x)


def _lowerings():
  """Every conv lowering this machine runs; 'onednn' where its kernels build."""
  return ('native', 'matmul') + (('onednn',) if onednn_build.available() else ())


@pytest.mark.parametrize('config_module', [cnn, pytest.param(cnn_lstm, marks=pytest.mark.slow)])
def test_all_lowerings_compute_the_same_function(config_module):
  """Same params, same outputs and gradients, whichever lowering runs."""
  config = config_module.get_config('tiny')
  x = jax.random.uniform(jax.random.key(0), (2, config.image_size, config.image_size, 3))
  results = {}
  for impl in _lowerings():
    config.model.conv_impl = impl
    model = models.build_model(config)
    variables = model.init({'params': jax.random.key(1)}, x, train=False)

    def loss(params, model=model, variables=variables):
      out = model.apply({**variables, 'params': params}, x, train=False)
      return jnp.sum(out ** 2)

    results[impl] = (jax.tree.map(np.asarray, variables['params']),
                     loss(variables['params']), jax.grad(loss)(variables['params']))
  p_a, l_a, g_a = results.pop('native')
  for p_b, l_b, g_b in results.values():
    jax.tree.map(np.testing.assert_array_equal, p_a, p_b)
    np.testing.assert_allclose(l_a, l_b, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_a, g_b)


@pytest.mark.parametrize('padding', ['VALID', 'SAME'])
@pytest.mark.parametrize('shape,kernel', [((2, 9, 7, 3), (3, 3)), ((2, 11, 4), (3,)),
                                          ((1, 6, 6, 2), (2, 2))])
def test_conv_lowerings_agree(padding, shape, kernel):
  """Outputs and the gradients of input, kernel and bias, against XLA's native conv."""
  x = jax.random.normal(jax.random.key(0), shape)
  results = {}
  for impl in _lowerings():
    conv = layers.Conv(5, kernel, padding=padding, impl=impl)
    variables = conv.init(jax.random.key(1), x)
    variables = {'params': {**variables['params'], 'bias': jnp.arange(5.0) / 5}}
    y = conv.apply(variables, x)
    cotangent = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    grads = jax.grad(lambda v, x: jnp.sum(conv.apply(v, x) * cotangent), argnums=(0, 1))(
        variables, x)
    results[impl] = (y, grads)
  y_ref, g_ref = results.pop('native')
  for y, grads in results.values():
    assert y.shape == y_ref.shape
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4),
                 grads, g_ref)


@pytest.mark.parametrize('shape', [(2, 7, 9, 3), (2, 29, 4), (1, 8, 8, 1)])
def test_max_pool_lowerings_agree(shape):
  x = jax.random.normal(jax.random.key(0), shape)
  native = layers.max_pool(x, 2, impl='native')
  matmul = layers.max_pool(x, 2, impl='matmul')
  np.testing.assert_array_equal(native, matmul)
  g_native = jax.grad(lambda x: jnp.sum(layers.max_pool(x, 2, impl='native') ** 2))(x)
  g_matmul = jax.grad(lambda x: jnp.sum(layers.max_pool(x, 2, impl='matmul') ** 2))(x)
  np.testing.assert_allclose(g_native, g_matmul, rtol=1e-6)


def test_auto_lowering_picks_onednn_on_cpu_else_matmul():
  assert jax.default_backend() == 'cpu'
  assert layers.resolve_impl('auto') == ('onednn' if onednn_build.available() else 'matmul')
  with pytest.raises(ValueError, match='unknown conv_impl'):
    layers.resolve_impl('winograd')


def test_cpu_variants_keep_the_49_step_sequence():
  for module in (cnn_lstm, cnn_attention):
    config = module.get_config('cpu')
    assert config.image_size == 112
    x = jnp.zeros((1, 112, 112, 3))
    extractor = models.cnn_lstm.FeatureExtractor(tuple(config.model.extractor_features))
    ev = jax.eval_shape(lambda: extractor.init(jax.random.key(0), x, train=False))
    assert jax.eval_shape(lambda v: extractor.apply(v, x, train=False), ev).shape == (1, 49, 64)


def test_unknown_model_lists_known_names():
  config = cnn.get_config('tiny')
  config.model.name = 'resnet9000'
  with pytest.raises(UserError, match=r"unknown model 'resnet9000'; known models: cnn, cnn_attention, cnn_lstm"):
    models.build_model(config)


def test_registry_builds_a_new_model_without_touching_the_trainer():
  """A model with neither BatchNorm nor convolutions declares no axis_name and no conv_impl."""
  class Tiny(nn.Module):
    num_classes: int = 8
    width: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train):
      return nn.Dense(self.num_classes)(nn.Dense(self.width)(x.reshape(x.shape[0], -1)))

  models.MODELS['tiny_test'] = Tiny
  try:
    config = cnn.get_config('tiny')
    config.model = {'name': 'tiny_test', 'width': 3, 'conv_impl': 'auto'}
    model = models.build_model(config, axis_name='devices')
    assert model.width == 3 and model.num_classes == 8
    config.model.unknown_field = 1
    with pytest.raises(UserError, match="config.model does not fit model 'tiny_test'"):
      models.build_model(config)
  finally:
    del models.MODELS['tiny_test']


def test_bfloat16_compute_keeps_float32_params_and_logits():
  config = cnn.get_config('tiny')
  config.dtype = 'bfloat16'
  model = models.build_model(config)
  x = jnp.ones((2, 32, 32, 3))
  variables = model.init({'params': jax.random.key(0)}, x, train=False)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables['params']))
  assert model.apply(variables, x, train=False).dtype == jnp.float32


class _ReferenceExtractor(nn.Module):
  """The extractor as plain flax BatchNorm -> ReLU -> MaxPool, for the fused path."""
  features: tuple = (8, 16)

  @nn.compact
  def __call__(self, x, *, train):
    for i, f in enumerate(self.features):
      x = layers.Conv(f, (3, 3), padding='SAME', impl='matmul', name=f'conv{i + 1}')(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name=f'bn{i + 1}')(x)
      x = layers.max_pool(nn.relu(x), 2, impl='matmul')
    return layers.RasterSequence(name='sequence')(x)


@pytest.mark.parametrize('train', [pytest.param(True, marks=pytest.mark.slow), False])
def test_fused_batchnorm_relu_pool_matches_flax_composition(train):
  """layers.BatchNormReluPool (hand-written VJP) == nn.BatchNorm, ReLU, max-pool."""
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3)) * 2 + 0.5
  x = x.at[0, :4, :4].set(-5.0)  # Pool windows with ties at ReLU's zero.
  fused = models.cnn_lstm.FeatureExtractor((8, 16), conv_impl='matmul')
  reference = _ReferenceExtractor((8, 16))
  variables = reference.init(jax.random.key(1), x, train=False)
  assert jax.tree.map(np.shape, variables) == jax.tree.map(
      np.shape, fused.init(jax.random.key(1), x, train=False))
  stats = jax.tree.map(lambda a: a + 0.3, variables['batch_stats'])
  w = jax.random.normal(jax.random.key(3), (2, 4, 16))

  def loss(module, params, x):
    out = module.apply({'params': params, 'batch_stats': stats}, x, train=train,
                       mutable=['batch_stats'] if train else False)
    out, updates = out if train else (out, {})
    return jnp.sum(jnp.tanh(out) * w), updates

  results = []
  for module in (reference, fused):
    (value, updates), grads = jax.jit(jax.value_and_grad(
        lambda p, x, m=module: loss(m, p, x), argnums=(0, 1), has_aux=True))(
            variables['params'], x)
    results.append((value, updates, grads))
  (v0, u0, g0), (v1, u1, g1) = results
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), u1, u0)
  # Conv biases before BatchNorm have a true gradient of zero: compare the rest.
  flat0 = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(g0)}
  flat1 = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(g1)}
  assert flat0.keys() == flat1.keys()
  for key in flat0:
    if "'bias']" in key and 'conv' in key and train:
      continue
    scale = float(jnp.max(jnp.abs(flat0[key]))) + 1e-6
    assert float(jnp.max(jnp.abs(flat1[key] - flat0[key]))) / scale < 1e-4, key


def test_fused_stage_gives_a_tied_window_cotangent_to_its_first_maximum():
  """Exact ties (common after ReLU'd zeros feed a conv) follow XLA's native pool gradient."""
  x = jax.random.normal(jax.random.key(0), (2, 4, 6, 3))
  x = x.at[0, 0:2, 2:4, :].set(3.0)  # One window, four equal values, positive after BatchNorm.
  layer = layers.BatchNormReluPool(False, 2, impl='matmul')
  variables = layer.init(jax.random.key(1), x)
  params = {'scale': jnp.array([1.0, -0.5, 2.0]), 'bias': jnp.array([0.1, 0.2, -0.1])}
  cotangent = jax.random.normal(jax.random.key(2), (2, 2, 3, 3))

  def reference(x, params):  # flax BatchNorm, ReLU, native (select-and-scatter) max-pool.
    y, _ = nn.BatchNorm(use_running_average=False, momentum=0.99).apply(
        {'params': params, 'batch_stats': variables['batch_stats']}, x, mutable=['batch_stats'])
    return nn.max_pool(nn.relu(y), (2, 2), strides=(2, 2))

  def fused(x, params):
    return layer.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                       mutable=['batch_stats'])[0]

  grads = [jax.grad(lambda x, p, f=f: jnp.sum(f(x, p) * cotangent), argnums=(0, 1))(x, params)
           for f in (reference, fused)]
  np.testing.assert_allclose(fused(x, params), reference(x, params), rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), *grads)
  gx = grads[1][0][0, 0:2, 2:4, 0]
  assert gx[0, 0] != gx[0, 1] and gx[0, 1] == gx[1, 0] == gx[1, 1]  # The first took it all.


@pytest.mark.parametrize('config_module', [cnn_lstm, cnn_attention])
def test_per_image_normalisation_keeps_no_training_lab_statistics(config_module):
  """norm='group'/'layer' (and head_norm='layer') leave no BatchNorm statistics in the
  extractor (or model), and each image's logits do not depend on the rest of its batch."""
  c = config_module.get_config('tiny')
  c.model.norm, c.model.input_norm = 'group', 'channels'
  if 'head_norm' in c.model:
    c.model.head_norm = 'layer'
  model = models.build_model(c)
  x = jax.random.uniform(jax.random.key(0), (4, c.image_size, c.image_size, 3))
  variables = model.init({'params': jax.random.key(1), 'dropout': jax.random.key(2)}, x,
                         train=False)
  assert 'batch_stats' not in variables
  names = jax.tree_util.keystr(variables['params']['extractor'])
  assert 'groupnorm1' in names and 'bn1' not in names
  alone = model.apply(variables, x[:1], train=False)
  together = model.apply(variables, x, train=False)[:1]
  np.testing.assert_allclose(np.asarray(alone), np.asarray(together), rtol=1e-4, atol=1e-5)
  # A global brightness and contrast change of the input leaves the logits as they
  # were (input standardisation), up to the clip-free affine map.
  moved = model.apply(variables, 0.5 * x + 0.2, train=False)
  np.testing.assert_allclose(np.asarray(moved), np.asarray(model.apply(variables, x, train=False)),
                             rtol=1e-3, atol=1e-3)


def test_batch_norm_extractor_is_unchanged_by_the_norm_fields():
  c = cnn_lstm.get_config('tiny')
  x = jnp.ones((2, c.image_size, c.image_size, 3))
  default = models.build_model(c).init({'params': jax.random.key(0)}, x, train=False)
  c.model.norm, c.model.input_norm, c.model.head_norm = 'batch', 'none', 'batch'
  explicit = models.build_model(c).init({'params': jax.random.key(0)}, x, train=False)
  assert jax.tree.structure(default) == jax.tree.structure(explicit)
  assert 'bn1' in default['batch_stats']['extractor']
