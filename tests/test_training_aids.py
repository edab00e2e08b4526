"""config.ema_decay (a moving average of the weights) and config.profile_steps (a trace)."""

import dataclasses
import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bcjax import checkpointing, profiling, train, train_state
from bcjax.errors import UserError


def test_ema_follows_the_parameters_with_a_ramped_decay():
  params = {'w': jnp.array([1.0, -2.0])}
  state = train_state.EmaTrainState.create(apply_fn=None, params=params, tx=optax.sgd(0.5),
                                           batch_stats={}, ema_params=params, ema_decay=0.99)
  ema = np.array([1.0, -2.0])
  for t in range(4):
    grads = {'w': jnp.array([1.0, 2.0]) * (t + 1)}
    state = state.apply_gradients(grads=grads)
    decay = min(0.99, (1 + t) / (10 + t))  # t: the step before this update.
    ema = decay * ema + (1 - decay) * np.asarray(state.params['w'])
    np.testing.assert_allclose(state.ema_params['w'], ema, rtol=1e-6)
  assert not np.allclose(state.ema_params['w'], state.params['w'])


def test_without_ema_the_state_has_its_old_leaves():
  """Checkpoints written before ema_decay existed must restore: no new field, no new leaf."""
  from configs import cnn
  config = cnn.get_config('tiny')
  state = train_state.create(config, jax.random.key(0), optax.adam(1e-3))
  assert type(state) is train_state.TrainState and state.ema_params is None
  assert 'ema_params' not in {f.name for f in dataclasses.fields(state)}
  config.ema_decay = 0.999
  ema_state = train_state.create(config, jax.random.key(0), optax.adam(1e-3))
  assert isinstance(ema_state, train_state.EmaTrainState) and ema_state.ema_decay == 0.999
  jax.tree.map(np.testing.assert_array_equal, ema_state.ema_params, ema_state.params)


def test_restore_variables_gives_the_average_where_it_validated_better(tmp_path):
  params = {'w': np.ones(3, np.float32)}
  state = train_state.EmaTrainState.create(
      apply_fn=None, params=params, tx=optax.identity(), batch_stats={},
      ema_params={'w': np.full(3, 7.0, np.float32)}, ema_decay=0.9)
  ckpts = checkpointing.Checkpoints(str(tmp_path))
  ckpts.save('best', 1, state, {'eval_weights': 'ema'})
  ckpts.save('latest', 2, state, {'eval_weights': 'raw'})
  best, _ = ckpts.restore_variables('best')
  latest, _ = ckpts.restore_variables('latest')
  ckpts.close()
  np.testing.assert_array_equal(best['params']['w'], 7.0)
  np.testing.assert_array_equal(latest['params']['w'], 1.0)


def test_profile_steps_are_checked():
  assert profiling.check(()) is None
  assert profiling.check((3, 5)) == (3, 5)
  for bad in ((0, 2), (5, 3), (1,), ('a', 2)):
    with pytest.raises(UserError, match='config.profile_steps'):
      profiling.check(bad)


@pytest.mark.slow
def test_training_with_ema_and_a_profile(tmp_path):
  from configs import cnn
  config = cnn.get_config('tiny')
  config.num_epochs = 2
  config.ema_decay = 0.9
  config.profile_steps = (2, 3)
  workdir = str(tmp_path / 'run')
  metrics = train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'history.json')) as f:
    history = json.load(f)
  assert all(0 <= e['val_accuracy_ema'] <= 1 for e in history)
  best = max(max(e['val_accuracy'], e['val_accuracy_ema']) for e in history)
  assert metrics['best_val_accuracy'] == best
  assert metrics['weights'] in ('ema', 'raw')
  traces = glob.glob(os.path.join(workdir, 'profile', 'plugins', 'profile', '*', '*'))
  names = {os.path.basename(t) for t in traces}
  assert 'perfetto_trace.json.gz' in names and any(n.endswith('.xplane.pb') for n in names)
