"""Optimiser and schedule from the config."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bcjax import optim
from bcjax.errors import UserError
from conftest import override


def _config(**kw):
  from configs import cnn
  c = cnn.get_config('tiny')
  c.num_epochs = 10
  return override(c, **kw)


PARAMS = {'dense': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones((2,))}}


def _update(config, grads=None, steps=1):
  tx, _ = optim.make(config, steps_per_epoch=10)
  state = tx.init(PARAMS)
  grads = grads or jax.tree.map(jnp.ones_like, PARAMS)
  for _ in range(steps):
    updates, state = tx.update(grads, state, PARAMS)
  return updates


@pytest.mark.parametrize('name', ['adam', 'adamw', 'sgd'])
def test_each_optimizer_steps_against_the_gradient(name):
  u = _update(_config(**{'optimizer.name': name}))
  assert all(float(x.max()) < 0 for x in jax.tree.leaves(u))


def test_unknown_names_list_known():
  with pytest.raises(UserError, match=r"unknown config.optimizer.name 'foo'; known: adam, adamw, sgd"):
    optim.make(_config(**{'optimizer.name': 'foo'}), 10)
  with pytest.raises(UserError, match='known: constant, warmup_cosine'):
    optim.make(_config(**{'schedule.name': 'linear'}), 10)


def test_warmup_cosine_schedule():
  _, schedule = optim.make(_config(**{'schedule.name': 'warmup_cosine',
                                      'schedule.warmup_epochs': 1.0}), 10)
  lr = 1e-3
  assert float(schedule(0)) == 0.0
  assert float(schedule(10)) == pytest.approx(lr)
  assert float(schedule(55)) == pytest.approx(lr / 2, rel=1e-2)
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-9)


def test_weight_decay_touches_kernels_only():
  zero = jax.tree.map(jnp.zeros_like, PARAMS)
  for name in ('adam', 'adamw', 'sgd'):
    u = _update(_config(**{'optimizer.name': name, 'optimizer.weight_decay': 0.1}), zero)
    assert float(jnp.abs(u['dense']['kernel']).min()) > 0, name
    assert float(jnp.abs(u['dense']['bias']).max()) == 0, name


def test_gradient_clipping():
  big = jax.tree.map(lambda p: 1e3 * jnp.ones_like(p), PARAMS)
  c = _config(**{'optimizer.name': 'sgd', 'optimizer.momentum': 0.0,
                 'optimizer.learning_rate': 1.0, 'optimizer.grad_clip_norm': 1.0})
  u = _update(c, big)
  norm = optax.tree.norm(u)
  assert float(norm) == pytest.approx(1.0, rel=1e-5)


def test_frozen_subtree_zeroes_its_updates():
  from configs import cnn_lstm
  c = cnn_lstm.get_config('tiny')
  c.optimizer.frozen = 'extractor'
  params = {'extractor': {'w': jnp.ones(3)}, 'head': {'w': jnp.ones(3)}}
  tx, _ = optim.make(c, 10)
  u, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  np.testing.assert_array_equal(u['extractor']['w'], 0)
  assert float(jnp.abs(u['head']['w']).min()) > 0
  c.optimizer.frozen = 'head/w'  # Any model's subtree, at any depth.
  tx, _ = optim.make(c, 10)
  u, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
  np.testing.assert_array_equal(u['head']['w'], 0)
  c.optimizer.frozen = 'extractr'
  tx, _ = optim.make(c, 10)
  with pytest.raises(UserError, match="frozen='extractr' names no parameters; the model has "
                     'extractor, head'):
    tx.init(params)


def test_init_loads_a_subtree_of_any_model(monkeypatch):
  from configs import cnn
  from bcjax import checkpointing, train_state
  c = cnn.get_config('tiny')
  fresh = train_state.init_variables(c, jax.random.key(0))['params']
  other = jax.tree.map(lambda p: np.full_like(p, 7.0), fresh)
  monkeypatch.setattr(checkpointing, 'load_params', lambda path: other)
  c.init.checkpoint, c.init.subtree = 'runs/pretrained', 'conv1'
  got = train_state.pretrained_params(c, fresh)
  np.testing.assert_array_equal(got['conv1']['kernel'], 7.0)
  np.testing.assert_array_equal(got['dense1']['kernel'], fresh['dense1']['kernel'])
  c.init.subtree = ''
  assert all((x == 7.0).all() for x in jax.tree.leaves(train_state.pretrained_params(c, fresh)))
  c.init.subtree = 'conv9'
  with pytest.raises(UserError, match="subtree='conv9': runs/pretrained holds no such"):
    train_state.pretrained_params(c, fresh)
  c.init.subtree = 'conv1'
  monkeypatch.setattr(checkpointing, 'load_params',
                      lambda path: dict(other, conv1={'kernel': np.ones(3), 'bias': np.ones(3)}))
  with pytest.raises(UserError, match="'conv1' in runs/pretrained do not fit"):
    train_state.pretrained_params(c, fresh)
