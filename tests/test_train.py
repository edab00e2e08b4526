"""End-to-end training on the tiny config and synthetic data.

One run of ``train_and_evaluate`` checks most of the integration (data,
steps, checkpoints, report); the others check determinism, learning and the
NaN stop. Everything uses ``configs/cnn.py:tiny`` (32 px, 64 examples).
"""

import json
import os

import numpy as np
import pytest

from bcjax import checkpointing, train
from bcjax.errors import UserError
from conftest import override


def tiny_config(**overrides):
  from configs import cnn
  c = cnn.get_config('tiny')
  return override(c, **overrides)


def _strip(history):
  return [{k: v for k, v in h.items() if k != 'seconds'} for h in history]


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('tiny'))
  config = tiny_config(num_epochs=2)
  return config, workdir, train.train_and_evaluate(config, workdir)


def test_train_and_evaluate_writes_everything(tiny_run):
  from bcjax import data
  config, workdir, metrics = tiny_run
  info = data.prepare(config)
  report = os.path.join(workdir, 'report')
  for name in ('test_metrics.json', 'confusion_matrix.png', 'learning_curves.png',
               'classification_report.txt'):
    assert os.path.getsize(os.path.join(report, name)) > 0, name
  with open(os.path.join(report, 'test_metrics.json')) as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(metrics))  # The returned dict is the file.
  assert saved['num_examples'] == info.split_sizes['test']
  for key in ('accuracy', 'precision_macro', 'recall_macro', 'f1_macro', 'precision_weighted',
              'recall_weighted', 'f1_weighted', 'ece'):
    assert 0.0 <= saved[key] <= 1.0, key
  assert saved['config_name'] == config.name and saved['seed'] == config.seed
  assert saved['confusion_matrix']['class_names'] == list(info.class_names)
  assert np.sum(saved['confusion_matrix']['counts']) == saved['num_examples']
  assert sum(c['support'] for c in saved['per_class'].values()) == saved['num_examples']
  ckpts = checkpointing.Checkpoints(workdir, read_only=True)
  steps = 2 * data.steps_per_epoch(config, info)
  assert ckpts.step('latest') == steps
  assert saved['checkpoint_step'] == ckpts.step('best')
  ckpts.close()
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(workdir))
  with open(os.path.join(workdir, 'history.json')) as f:
    assert [h['epoch'] for h in json.load(f)] == [1, 2]


def test_rerun_of_finished_run_only_tests_again(tiny_run):
  config, workdir, metrics = tiny_run
  again = train.train_and_evaluate(config, workdir)
  assert again == metrics


def test_same_config_and_seed_give_identical_metrics(tiny_run, tmp_path):
  config, workdir, metrics = tiny_run
  again = train.train_and_evaluate(config, str(tmp_path))
  assert {k: v for k, v in again.items() if k != 'workdir'} == \
      {k: v for k, v in metrics.items() if k != 'workdir'}
  with open(os.path.join(workdir, 'history.json')) as f1, \
       open(tmp_path / 'history.json') as f2:
    assert _strip(json.load(f1)) == _strip(json.load(f2))


def test_tiny_cnn_learns_synthetic_cells(tmp_path):
  # 512 synthetic examples (358 train), 8 epochs of 22 steps: chance is 1/8;
  # runs of this setup reach about 0.6 test accuracy.
  config = tiny_config(num_epochs=8, batch_size=16, **{
      'data.synthetic_examples': 512, 'data.shuffle_buffer': 512})
  metrics = train.train_and_evaluate(config, str(tmp_path))
  assert metrics['accuracy'] > 0.3, metrics['accuracy']
  with open(tmp_path / 'history.json') as f:
    history = json.load(f)
  assert history[-1]['train_loss'] < history[0]['train_loss']


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_run, tmp_path):
  import shutil
  config, workdir, _ = tiny_run
  shutil.copytree(os.path.join(workdir, 'checkpoints'), tmp_path / 'checkpoints')
  ckpts = checkpointing.Checkpoints(str(tmp_path), read_only=True)
  good = ckpts.step('latest')
  ckpts.close()
  shutil.copy(os.path.join(workdir, 'config.json'), tmp_path / 'config.json')
  # One more epoch at an absurd learning rate (a change the resume must be allowed):
  # parameters overflow to inf.
  bad = tiny_config(num_epochs=3, **{'optimizer.learning_rate': 1e30})
  with pytest.raises(train.NonFiniteLossError) as e:
    train.train_and_evaluate(bad, str(tmp_path), allow_changed_config=True)
  message = str(e.value)
  assert '\n' not in message and 'at step' in message and f'latest/{good}' in message
  assert isinstance(e.value, UserError)  # launch.py prints it as one line.
  ckpts = checkpointing.Checkpoints(str(tmp_path), read_only=True)
  assert ckpts.step('latest') == good
  ckpts.close()


def test_unknown_optimizer_is_user_error(tmp_path):
  with pytest.raises(UserError, match='known: adam, adamw, sgd'):
    train.train_and_evaluate(tiny_config(**{'optimizer.name': 'foo'}), str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_wall_time_is_tallied_by_phase_per_process_run(tiny_run):
  config, workdir, _ = tiny_run
  with open(os.path.join(workdir, 'wall_time.json')) as f:
    entries = json.load(f)
  first = entries[0]  # The training run; the module's rerun test may have appended another.
  from bcjax import data
  assert first['from_step'] == 0
  assert first['to_step'] == 2 * data.steps_per_epoch(config, data.prepare(config))
  assert first['placement'] == 'stream' and first['devices'] >= 1
  seconds = first['seconds']
  for phase in ('setup', 'compile', 'train', 'validation', 'checkpoints', 'test'):
    assert seconds[phase] > 0, phase
  parts = sum(v for k, v in seconds.items() if k != 'total')
  assert parts == pytest.approx(seconds['total'], abs=0.01)
