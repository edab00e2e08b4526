"""Both device wrappers (pmap, jit + shard_map) match one device, for every registered model.

The comparison runs in a subprocess that forces 4 CPU devices before JAX is
imported (``python tests/test_parallel.py`` runs it directly); the pytest
process keeps its single default device. Every model in ``bcjax.models.MODELS``
is compared, from the ``tiny`` variant of its config (``configs/<name>.py``),
so a new model whose BatchNorm forgets ``axis_name`` (statistics left per
device) fails here.
"""

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
NUM_DEVICES = 4

from bcjax.models import MODELS  # pylint: disable=wrong-import-position  (no JAX computation)


def _config(name):
  config = importlib.import_module(f'configs.{name}').get_config('tiny')
  for field in config.model:  # Dropout masks depend on how the batch is split.
    if field.startswith('dropout'):
      config.model[field] = 0.0
  # SGD, not Adam: Adam divides by the gradient's size, so on parameters
  # whose true gradient is zero (a conv bias before BatchNorm) it turns
  # float round-off into full learning-rate steps of either sign.
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.1
  return config


def _configs():
  return {name: _config(name) for name in sorted(MODELS)}


def _run_steps(config, parallel, devices, batches, eval_batch):
  """Trains a few steps from one init; returns host params, stats, metrics."""
  import jax
  from bcjax import models, optim, parallel as par, steps, train_state
  config.parallel = parallel
  tx, _ = optim.make(config, steps_per_epoch=len(batches))
  state = train_state.create(config, jax.random.key(0), tx)
  runner = par.make_runner(config, models.build_model(config, axis_name=steps.AXIS), devices)
  state = runner.put_state(state)
  d = len(devices)
  metrics = []
  for b in batches:
    b = {k: v.reshape(d, -1, *v.shape[1:]) for k, v in b.items()}
    state, m = runner.train_step(state, runner.put_batch(b), jax.random.key(1))
    metrics.append(runner.get_metrics(m))
  eb = {k: v.reshape(d, -1, *v.shape[1:]) for k, v in eval_batch.items()}
  em, probs = runner.eval_step(state, runner.put_batch(eb))
  host = runner.get_state(state)
  return {'params': jax.tree.leaves(host.params), 'stats': jax.tree.leaves(host.batch_stats),
          'step': int(host.step), 'metrics': metrics, 'eval': runner.get_metrics(em),
          'probs': runner.get_rows(probs)}


def _submodules(config):
  """Every flax module the model builds (to tell models with BatchNorm)."""
  import jax
  import jax.numpy as jnp
  from bcjax import models
  seen = []
  model = models.build_model(config)

  def record(next_fun, args, kwargs, context):
    seen.append(context.module)
    return next_fun(*args, **kwargs)
  import flax.linen as nn
  with nn.intercept_methods(record):
    model.init(jax.random.key(0), jnp.zeros((1, config.image_size, config.image_size, 3)),
               train=False)
  return seen


def _compare_main(names, with_trainer):
  """Subprocess body: every wrapper on 4 devices vs shard_map on 1 device."""
  import jax
  assert jax.device_count() == NUM_DEVICES, jax.devices()
  rng = np.random.default_rng(0)
  out = {}
  for name, config in _configs().items():
    if name not in names:
      continue
    assert config.model.name == name, (name, config.model.name)
    config.batch_size = 8
    s = config.image_size
    batches = [{'image': rng.random((8, s, s, 3), np.float32),
                'label': rng.integers(0, 8, 8).astype(np.int32)} for _ in range(3)]
    eval_batch = {'image': rng.random((8, s, s, 3), np.float32),
                  'label': rng.integers(0, 8, 8).astype(np.int32),
                  'mask': np.array([True] * 5 + [False] * 3)}
    ref = _run_steps(config, 'shard_map', jax.devices()[:1], batches, eval_batch)
    for parallel in ('pmap', 'shard_map'):
      got = _run_steps(config, parallel, jax.devices(), batches, eval_batch)
      err = max(float(np.max(np.abs(a - b))) for a, b in
                zip(ref['params'] + ref['stats'], got['params'] + got['stats']))
      out[f'{name}/{parallel}'] = {
          'max_abs_diff': err, 'ref_step': ref['step'], 'step': got['step'],
          'ref_metrics': ref['metrics'], 'metrics': got['metrics'],
          'ref_eval': ref['eval'], 'eval': got['eval'],
          'probs_diff': float(np.max(np.abs(ref['probs'] - got['probs']))),
          'num_stats': len(ref['stats']),
          'has_batchnorm': any('BatchNorm' in type(m).__name__ for m in _submodules(config))}
  if not with_trainer:
    print('RESULT ' + json.dumps(out))
    return
  # The whole trainer on 4 devices under pmap (shard_map runs in-process in
  # test_train.py), and the one-line error for a batch that does not divide.
  import tempfile
  from configs import cnn
  from bcjax import train
  from bcjax.errors import UserError
  config = cnn.get_config('tiny')
  config.parallel = 'pmap'
  with tempfile.TemporaryDirectory() as workdir:
    out['train_pmap'] = train.train_and_evaluate(config, workdir)
  config.batch_size = 6
  try:
    with tempfile.TemporaryDirectory() as workdir:
      train.train_and_evaluate(config, workdir)
  except UserError as e:
    out['indivisible_error'] = str(e)
  print('RESULT ' + json.dumps(out))


# The default run compares the paper's hybrid (BatchNorm, LSTM) and runs the
# trainer on 4 devices; the other models are compared in the slow tier.
DEFAULT_MODELS = ('cnn_lstm',)


def _compare(*args):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={NUM_DEVICES}',
             JAX_PLATFORMS='cpu')
  p = subprocess.run([sys.executable, os.path.abspath(__file__), *args], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  line = [l for l in p.stdout.splitlines() if l.startswith('RESULT ')]
  assert p.returncode == 0 and line, p.stderr[-3000:]
  return json.loads(line[0][len('RESULT '):])


@pytest.fixture(scope='module')
def comparison():
  return _compare('--trainer', *DEFAULT_MODELS)


@pytest.fixture(scope='module')
def comparison_of_the_others():
  return _compare(*(m for m in sorted(MODELS) if m not in DEFAULT_MODELS))


@pytest.mark.parametrize('model', [
    m if m in DEFAULT_MODELS else pytest.param(m, marks=pytest.mark.slow) for m in sorted(MODELS)])
@pytest.mark.parametrize('parallel', ['pmap', 'shard_map'])
def test_wrapper_matches_single_device(request, model, parallel):
  fixture = 'comparison' if model in DEFAULT_MODELS else 'comparison_of_the_others'
  r = request.getfixturevalue(fixture)[f'{model}/{parallel}']
  assert r['step'] == r['ref_step'] == 3
  # float32 round-off (BatchNorm's E[x^2] - E[x]^2 on 2-example shards) grows
  # over the steps (~4e-5 seen); BatchNorm without the sync differs by ~7e-2.
  assert r['max_abs_diff'] < 1e-3, r['max_abs_diff']
  # A model with BatchNorm had its statistics compared too.
  assert (r['num_stats'] > 0) == r['has_batchnorm'], r
  for a, b in zip(r['ref_metrics'], r['metrics']):
    assert a['count'] == b['count'] == 8 and a['correct'] == b['correct']
    np.testing.assert_allclose(a['loss_sum'], b['loss_sum'], rtol=1e-5)
  assert r['eval']['count'] == r['ref_eval']['count'] == 5  # Padding never counts.
  np.testing.assert_allclose(r['eval']['loss_sum'], r['ref_eval']['loss_sum'], rtol=1e-5)
  assert r['probs_diff'] < 1e-4


def test_trainer_runs_on_four_devices_with_pmap(comparison):
  from bcjax import data
  from configs import cnn
  m = comparison['train_pmap']
  assert m['num_examples'] == data.prepare(cnn.get_config('tiny')).split_sizes['test']
  assert 0.0 <= m['accuracy'] <= 1.0


def test_indivisible_global_batch_fails_in_one_line(comparison):
  message = comparison['indivisible_error']
  assert '\n' not in message and 'batch_size=6' in message and '4 devices' in message


def test_batch_not_divisible_is_one_line_error():
  from bcjax import parallel
  from bcjax.errors import UserError
  assert parallel.per_device_batch(8, 4) == 2
  with pytest.raises(UserError) as e:
    parallel.per_device_batch(10, 4)
  assert '\n' not in str(e.value) and '10' in str(e.value) and '4' in str(e.value)


def test_unknown_parallel_lists_known():
  from bcjax import models, parallel
  from bcjax.errors import UserError
  config = _config('cnn_lstm')
  config.parallel = 'xmap'
  with pytest.raises(UserError, match='known: pmap, shard_map'):
    parallel.make_runner(config, models.build_model(config))


if __name__ == '__main__':
  _compare_main([a for a in sys.argv[1:] if a != '--trainer'], '--trainer' in sys.argv[1:])
