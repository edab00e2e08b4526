"""Resuming: a run killed mid-epoch and rerun ends exactly like an uninterrupted one.

Each run is a separate ``python`` process (as a user's would be). The killed
runs deliver the signal to themselves from inside the training loop, at a
chosen step in the middle of epoch 2, so the interruption always lands
mid-epoch however fast or slow the machine is:

* SIGKILL: nothing runs after it; the rerun resumes from the epoch-1 checkpoint.
* SIGTERM: the trainer saves ``latest`` at that very step and exits; the
  rerun resumes mid-epoch, skipping the batches it had already trained on.

These runs set ``data.placement='auto'``, which trains the tiny config on the device path (the
split resident on the device, bcjax/data/resident.py); one slow test repeats
the mid-epoch resume on the host-streamed path.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

from bcjax import checkpointing
from bcjax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCHS = 3
STEPS_PER_EPOCH = 11  # 128 synthetic examples -> 89 train // batch 8.
INTERRUPT_AT = STEPS_PER_EPOCH + 4  # Mid-epoch 2.

SCRIPT = r'''
import json, os, signal, sys
from configs import cnn
from bcjax import data, parallel, train
workdir, signame, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
config = cnn.get_config('tiny')
config.data.placement = sys.argv[4]
config.num_epochs = %(epochs)d
config.data.synthetic_examples = 128
config.data.shuffle_buffer = 128
assert data.steps_per_epoch(config, data.prepare(config)) == %(spe)d
if signame:
  make_runner = parallel.make_runner
  def interrupting_runner(*args, **kwargs):
    runner = make_runner(*args, **kwargs)
    step, calls = runner.train_step, [0]
    def train_step(*a):
      out = step(*a)
      calls[0] += 1
      if calls[0] == at:
        os.kill(os.getpid(), getattr(signal, signame))
      return out
    runner.train_step = train_step
    return runner
  parallel.make_runner = interrupting_runner
metrics = train.train_and_evaluate(config, workdir)
print('METRICS ' + json.dumps(metrics))
''' % {'epochs': EPOCHS, 'spe': STEPS_PER_EPOCH}


def _run(workdir, cache_dir, signame='', at=0, placement='auto'):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu',
             # The five runs compile the same programs: compile them once.
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-c', SCRIPT, str(workdir), signame, str(at), placement],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _metrics(p):
  lines = [l for l in p.stdout.splitlines() if l.startswith('METRICS ')]
  assert p.returncode == 0 and lines, p.stdout[-2000:] + p.stderr[-3000:]
  m = json.loads(lines[0][len('METRICS '):])
  m.pop('workdir')
  return m


def _history(workdir):
  with open(os.path.join(workdir, 'history.json')) as f:
    return [{k: v for k, v in h.items() if k != 'seconds'} for h in json.load(f)]


def _latest(workdir):
  ckpts = checkpointing.Checkpoints(str(workdir), read_only=True)
  try:
    return ckpts.step('latest')
  finally:
    ckpts.close()


@pytest.fixture(scope='module')
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('jax_cache')


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory, cache_dir):
  workdir = tmp_path_factory.mktemp('uninterrupted')
  p = _run(workdir, cache_dir)
  return _metrics(p), _history(workdir), p.stdout


# Each kill-and-resume test trains the tiny config three times in subprocesses
# (a minute or more on 2 cores): they are in the slow tier, which CI runs.
@pytest.mark.slow
@pytest.mark.parametrize('signame,resumes_from', [
    ('SIGKILL', STEPS_PER_EPOCH),  # The epoch-1 checkpoint.
    ('SIGTERM', INTERRUPT_AT),     # Saved on the signal, mid-epoch.
])
def test_interrupted_run_resumes_to_identical_metrics(
    tmp_path, cache_dir, uninterrupted, signame, resumes_from):
  killed = _run(tmp_path, cache_dir, signame, INTERRUPT_AT)
  assert killed.returncode == -getattr(signal, signame), killed.stderr[-3000:]
  assert not os.path.exists(tmp_path / 'report')
  assert _latest(tmp_path) == resumes_from
  resumed = _run(tmp_path, cache_dir)
  assert f'resuming from' in resumed.stdout
  metrics, history, _ = uninterrupted
  assert _metrics(resumed) == metrics
  assert _history(tmp_path) == history
  assert _latest(tmp_path) == EPOCHS * STEPS_PER_EPOCH


@pytest.mark.slow
def test_streamed_run_resumes_mid_epoch_to_identical_metrics(tmp_path, cache_dir):
  whole = _run(tmp_path / 'whole', cache_dir, placement='stream')
  killed = _run(tmp_path / 'cut', cache_dir, 'SIGTERM', INTERRUPT_AT, placement='stream')
  assert killed.returncode == -signal.SIGTERM, killed.stderr[-3000:]
  assert _latest(tmp_path / 'cut') == INTERRUPT_AT
  resumed = _run(tmp_path / 'cut', cache_dir, placement='stream')
  assert 'streamed from the host' in resumed.stdout
  assert _metrics(resumed) == _metrics(whole)
  assert _history(tmp_path / 'cut') == _history(tmp_path / 'whole')


@pytest.mark.slow
def test_device_path_is_what_the_resume_tests_run(uninterrupted):
  assert 'input: train split resident on the devices' in uninterrupted[2]


def test_missing_checkpoint_is_user_error(tmp_path):
  with pytest.raises(UserError, match='no checkpoints in'):
    checkpointing.Checkpoints(str(tmp_path), read_only=True)


def test_find_resolves_names_and_steps(tmp_path):
  import numpy as np
  ckpts = checkpointing.Checkpoints(str(tmp_path), keep=2)
  state = {'w': np.arange(3.0)}
  ckpts.save('latest', 5, state, {'epoch': 1})
  ckpts.save('latest', 10, state, {'epoch': 2})
  ckpts.save('best', 5, state, {'epoch': 1})
  ckpts.save('latest', 10, {'w': np.zeros(3)}, {})  # A replayed step is kept as saved.
  assert ckpts.find('latest') == ('latest', 10)
  assert ckpts.find('best') == ('best', 5)
  assert ckpts.find('10') == ('latest', 10)
  restored, meta = ckpts.restore('10', state)
  np.testing.assert_array_equal(restored['w'], np.arange(3.0))
  assert meta == {'epoch': 2}
  with pytest.raises(UserError, match='saved steps: 5, 10'):
    ckpts.find('7')
  with pytest.raises(UserError, match="'best', 'latest' or a step"):
    ckpts.find('newest')
  ckpts.close()
