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
