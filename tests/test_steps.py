"""The per-device steps, mapped over the one device of this process."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax import models, optim, steps, train_state


def test_cross_entropy_label_smoothing():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  labels = jnp.array([0])
  plain = steps.cross_entropy(logits, labels, 3)
  np.testing.assert_allclose(plain, -jax.nn.log_softmax(logits)[:, 0], rtol=1e-6)
  smooth = steps.cross_entropy(logits, labels, 3, label_smoothing=0.3)
  target = jnp.array([0.8, 0.1, 0.1])
  np.testing.assert_allclose(smooth, -(target * jax.nn.log_softmax(logits)).sum(-1), rtol=1e-6)


def test_dihedral_views_are_the_eight_symmetries():
  x = jnp.arange(2 * 3 * 3 * 1.0).reshape(2, 3, 3, 1)
  views = steps.dihedral(x)
  assert len(views) == 8 and (views[0] == x).all()
  flat = {tuple(np.asarray(v[0, :, :, 0]).ravel()) for v in views}
  assert len(flat) == 8


def _mapped(fn, **kw):
  return jax.pmap(functools.partial(fn, **kw), axis_name=steps.AXIS, devices=jax.devices()[:1])


@pytest.fixture(scope='module')
def setup():
  from configs import cnn
  config = cnn.get_config('tiny')
  config.image_size = 16
  tx, _ = optim.make(config, 10)
  state = train_state.create(config, jax.random.key(0), tx)
  model = models.build_model(config, axis_name=steps.AXIS)
  rng = np.random.default_rng(0)
  batch = {'image': rng.random((1, 4, 16, 16, 3), np.float32),
           'label': np.array([[0, 1, 2, 3]], np.int32),
           'mask': np.array([[True, True, True, False]])}
  stacked = jax.tree.map(lambda x: np.asarray(x)[None], state)
  return config, model, stacked, batch


def test_train_step_counts_and_advances(setup):
  _, model, state, batch = setup
  step = _mapped(steps.train_step, model=model)
  new, m = step(state, {k: batch[k] for k in ('image', 'label')}, jax.random.split(jax.random.key(1), 1))
  assert int(new.step[0]) == 1
  assert int(m['count'][0]) == 4 and 0 <= int(m['correct'][0]) <= 4
  assert np.isfinite(float(m['loss_sum'][0]))
  changed = jax.tree.map(lambda a, b: bool((a != b).any()), state.params, new.params)
  assert all(jax.tree.leaves(changed))


def test_eval_step_ignores_padding(setup):
  _, model, state, batch = setup
  m, probs = _mapped(steps.eval_step, model=model)(state, batch)
  assert int(m['count'][0]) == 3
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-5)
  p = np.asarray(probs)[0]
  nll = -np.log(p[np.arange(3), batch['label'][0, :3]]).sum()
  np.testing.assert_allclose(float(m['loss_sum'][0]), nll, rtol=1e-5)
  assert int(m['correct'][0]) == int((p[:3].argmax(-1) == batch['label'][0, :3]).sum())


def test_eval_step_tta_averages_views(setup):
  _, model, state, batch = setup
  _, probs = _mapped(steps.eval_step, model=model, tta=True)(state, batch)
  variables = {'params': jax.tree.map(lambda x: x[0], state.params)}
  views = steps.dihedral(jnp.asarray(batch['image'][0]))
  want = np.mean([jax.nn.softmax(model.apply(variables, v, train=False)) for v in views], 0)
  np.testing.assert_allclose(np.asarray(probs)[0], want, rtol=1e-5, atol=1e-6)


def _train_once(config, microbatch_size, batch_size=8, size=16, images=None):
  tx, _ = optim.make(config, 10)
  state = jax.tree.map(lambda x: np.asarray(x)[None],
                       train_state.create(config, jax.random.key(0), tx))
  model = models.build_model(config, axis_name=steps.AXIS)
  rng = np.random.default_rng(0)
  if images is None:
    images = rng.random((batch_size, size, size, 3), np.float32)
  batch = {'image': images[None], 'label': rng.integers(0, 8, (1, batch_size)).astype(np.int32)}
  step = _mapped(steps.train_step, model=model, microbatch_size=microbatch_size)
  return state, step(state, batch, jax.random.split(jax.random.key(1), 1))


def test_microbatches_give_the_whole_batch_update_without_batchnorm():
  from configs import cnn
  config = cnn.get_config('tiny')
  config.image_size = 16
  config.model.dropout_conv = config.model.dropout_dense = 0.0  # Same masks on both sides.
  _, (whole, m1) = _train_once(config, 0)
  _, (micro, m4) = _train_once(config, 2)
  np.testing.assert_allclose(float(m4['loss_sum'][0]), float(m1['loss_sum'][0]), rtol=1e-5)
  assert int(m4['count'][0]) == 8 and int(m4['correct'][0]) == int(m1['correct'][0])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               whole.params, micro.params)


@pytest.mark.slow  # Compiles the microbatched hybrid step: about a minute on 2 cores.
def test_microbatches_with_batchnorm_average_the_running_statistics():
  from configs import cnn_lstm
  config = cnn_lstm.get_config('tiny')
  s = config.image_size
  images = np.random.default_rng(0).random((8, s, s, 3), np.float32)
  images[4:] *= 3.0  # Microbatches with different statistics.
  state, (micro, m) = _train_once(config, 4, images=images)
  assert int(m['count'][0]) == 8 and np.isfinite(float(m['loss_sum'][0]))
  model = models.build_model(config)
  variables = {'params': jax.tree.map(lambda x: x[0], state.params),
               'batch_stats': jax.tree.map(lambda x: x[0], state.batch_stats)}

  @jax.jit
  def updated(x):
    _, new = model.apply(variables, x, train=True, rngs={'dropout': jax.random.key(0)},
                         mutable=['batch_stats'])
    return new['batch_stats']['extractor']['bn1']

  got = jax.tree.map(lambda x: np.asarray(x)[0], micro.batch_stats)['extractor']['bn1']
  halves = [updated(images[:4]), updated(images[4:])]
  # Each microbatch normalises by its own statistics; the running averages
  # move by the mean of the microbatches' updates...
  for k in ('mean', 'var'):
    np.testing.assert_allclose(got[k], (halves[0][k] + halves[1][k]) / 2, rtol=1e-5, atol=1e-7)
  # ... which for the mean is the whole batch's update; for the variance it is not.
  whole = updated(images)
  np.testing.assert_allclose(got['mean'], whole['mean'], rtol=1e-5, atol=1e-7)
  old = np.asarray(variables['batch_stats']['extractor']['bn1']['var'])
  assert not np.allclose(got['var'] - old, whole['var'] - old, rtol=1e-3, atol=0)


def test_microbatch_size_must_divide_the_device_batch():
  from configs import cnn
  from bcjax.errors import UserError
  config = cnn.get_config('tiny')
  config.image_size = 16
  with pytest.raises(UserError, match='microbatch_size=3 does not divide'):
    _train_once(config, 3)
