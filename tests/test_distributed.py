"""Two processes on one machine train like one process with all their devices.

Two ``python`` processes on CPU (two forced devices each, a coordinator on
127.0.0.1) start JAX's multi-process runtime (bcjax.distributed.initialize)
and run the tiny cnn_lstm config - BatchNorm statistics and gradients are
averaged across the processes - through ``train.train_and_evaluate``, once
per wrapper (shard_map, pmap). A third process trains the same config on four
forced devices, alone. Same global batch, same per-device rows:

* Each process of the pair reads its own shard of the data (bcjax/data), so
  the reference is fed, per step, process 0's batch and process 1's batch
  side by side (``data.make_train_dataset`` asked for both shards) - exactly
  the rows the four devices hold in the pair.
* Evaluation has nothing to emulate: every example once, whatever the
  process count, so the test report must match as it is.

The two wrappers run the two input paths: ``shard_map`` the device path
(each process's train shard resident on its devices, flips and rotations in
the step, bcjax/data/resident.py), emulated in the reference by feeding the
same uint8 rows from the host (the step augments any uint8 batch alike);
``pmap`` the host-streamed batches.

Then: final parameters (the ``latest`` checkpoints) within float round-off
(cross-process reductions add in another order), test metrics and example
counts equal, per-example predictions in the same order, and only process 0
wrote the report, the TensorBoard events and the progress lines.

``python tests/test_distributed.py worker OUT COORDINATOR PROCESS_ID`` and
``... reference OUT`` are the subprocess bodies.
"""

import glob
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # Three JAX processes, minutes on 2 cores: `pytest -m slow`.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
PARALLELS = ('shard_map', 'pmap')
PLACEMENT = {'shard_map': 'device', 'pmap': 'stream'}  # Each wrapper runs one input path.
TIMEOUT_S = 420  # Per subprocess; both of a pair are killed when either fails.


def _config(parallel: str):
  from configs import cnn_lstm
  config = cnn_lstm.get_config('tiny')  # Global batch 8: 2 per device.
  config.parallel = parallel
  # SGD, not Adam: on parameters whose true gradient is zero (a conv bias
  # before BatchNorm) Adam turns float round-off into full learning-rate steps
  # of either sign (see tests/test_parallel.py).
  config.optimizer.name = 'sgd'
  config.optimizer.learning_rate = 0.1
  config.data.placement = PLACEMENT[parallel]
  if config.data.placement == 'device':  # Augmented in the step, keyed by the global device.
    config.data.augment.flips = config.data.augment.rot90 = True
  return config


def _workdir(out: str, who: str, parallel: str) -> str:
  return os.path.join(out, f'{who}_{parallel}')


def _worker(out: str, coordinator: str, process_id: int) -> None:
  import jax
  from bcjax import distributed, predictions_csv, train
  from bcjax import metrics as metrics_lib
  distributed.initialize(coordinator, NUM_PROCESSES, process_id)
  assert jax.process_count() == NUM_PROCESSES
  assert jax.device_count() == NUM_PROCESSES * DEVICES_PER_PROCESS, jax.devices()
  # Record every report / predictions file write, to check only process 0 writes.
  writes = []
  for module, name in ((metrics_lib, 'write_report'), (predictions_csv, 'write')):
    original = getattr(module, name)

    def recording(path, *args, _original=original, _name=name, **kwargs):
      writes.append(_name)
      return _original(path, *args, **kwargs)
    setattr(module, name, recording)
  results = {}
  for parallel in PARALLELS:
    metrics = train.train_and_evaluate(_config(parallel), _workdir(out, 'pair', parallel))
    results[parallel] = {'metrics': metrics, 'writes': sorted(set(writes))}
    writes.clear()
  print('RESULT ' + json.dumps(results), flush=True)


def _resident_rows(config, epoch: int):
  """The device path's epoch as host batches: each process's rows side by side, uint8."""
  from bcjax import data
  from bcjax.data import packed, resident, spec
  shards = [data.train_pixels(config, process_index=p, process_count=NUM_PROCESSES)
            for p in range(NUM_PROCESSES)]
  steps = data.steps_per_epoch(config, data.prepare(config))
  per_process, per_device = spec.batch_geometry(config.batch_size, NUM_PROCESSES,
                                                DEVICES_PER_PROCESS, 'config.batch_size')
  orders = [resident.epoch_order(config, len(labels), epoch) for _, labels in shards]

  def batches(start):
    for s in range(start, steps):
      rows = [order[s * per_process:(s + 1) * per_process] for order in orders]
      yield {'image': np.concatenate([im[r] for (im, _), r in zip(shards, rows)]).reshape(
                 NUM_PROCESSES * DEVICES_PER_PROCESS, per_device, *shards[0][0].shape[1:]),
             'label': np.concatenate([lab[r] for (_, lab), r in zip(shards, rows)]).reshape(
                 NUM_PROCESSES * DEVICES_PER_PROCESS, per_device)}
  return packed.Batches(batches)


def _reference(out: str) -> None:
  import jax
  import tensorflow as tf
  from bcjax import data, train
  assert jax.process_count() == 1
  assert jax.device_count() == NUM_PROCESSES * DEVICES_PER_PROCESS, jax.devices()
  one_process = data.make_train_dataset
  emulate = {'device': False}

  def both_shards(config, *, epoch):
    if emulate['device']:
      return _resident_rows(config, epoch)
    shards = [one_process(config, epoch=epoch, process_index=p, process_count=NUM_PROCESSES,
                          local_device_count=DEVICES_PER_PROCESS)
              for p in range(NUM_PROCESSES)]
    return tf.data.Dataset.zip(tuple(shards)).map(
        lambda *b: {k: tf.concat([s[k] for s in b], axis=0) for k in b[0]})

  data.make_train_dataset = both_shards
  results = {}
  for p in PARALLELS:
    config = _config(p)
    # The device path's rows, fed from the host: the one-process trainer streams them.
    emulate['device'] = config.data.placement == 'device'
    config.data.placement = 'stream'
    results[p] = {'metrics': train.train_and_evaluate(config, _workdir(out, 'ref', p))}
  print('RESULT ' + json.dumps(results), flush=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start(args: list[str], num_devices: int, log: str) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices}')
  with open(log + '.out', 'w') as stdout, open(log + '.err', 'w') as stderr:
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), *args], cwd=ROOT,
                            env=env, stdout=stdout, stderr=stderr)


def _wait_all(procs: dict[str, subprocess.Popen], logs: dict[str, str]) -> dict[str, dict]:
  """Waits for every process; on a failure or the timeout kills them all and says why."""
  deadline = time.time() + TIMEOUT_S
  try:
    while any(p.poll() is None for p in procs.values()):
      failed = [n for n, p in procs.items() if p.poll() not in (None, 0)]
      if failed or time.time() > deadline:
        break
      time.sleep(0.5)
  finally:
    for p in procs.values():
      if p.poll() is None:
        p.kill()
        p.wait()
  results, problems = {}, []
  for name, p in procs.items():
    with open(logs[name] + '.out') as f:
      stdout = f.read()
    lines = [l for l in stdout.splitlines() if l.startswith('RESULT ')]
    if p.returncode != 0 or not lines:
      with open(logs[name] + '.err') as f:
        stderr = f.read()
      problems.append(f'--- {name}: exit {p.returncode}\n{stdout[-2000:]}\n{stderr[-4000:]}')
    else:
      results[name] = {'result': json.loads(lines[0][len('RESULT '):]), 'stdout': stdout}
  if problems:
    raise AssertionError('\n'.join(problems))
  return results


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('distributed'))
  coordinator = f'127.0.0.1:{_free_port()}'
  logs = {n: os.path.join(out, n) for n in ('process0', 'process1', 'reference')}
  procs = {f'process{i}': _start(['worker', out, coordinator, str(i)], DEVICES_PER_PROCESS,
                                 logs[f'process{i}'])
           for i in range(NUM_PROCESSES)}
  procs['reference'] = _start(['reference', out], NUM_PROCESSES * DEVICES_PER_PROCESS,
                              logs['reference'])
  return out, _wait_all(procs, logs)


def _final_params(workdir: str):
  import jax
  from bcjax import checkpointing
  ckpts = checkpointing.Checkpoints(workdir, read_only=True)
  try:
    return ckpts.step('latest'), jax.tree.leaves(ckpts.restore_variables('latest')[0])
  finally:
    ckpts.close()


@pytest.mark.parametrize('parallel', PARALLELS)
def test_two_processes_match_one_process_on_four_devices(runs, parallel):
  out, results = runs
  pair, ref = _workdir(out, 'pair', parallel), _workdir(out, 'ref', parallel)
  pair_step, pair_params = _final_params(pair)
  ref_step, ref_params = _final_params(ref)
  assert pair_step == ref_step > 0
  assert len(pair_params) == len(ref_params) > 0  # Parameters and BatchNorm statistics.
  for a, b in zip(pair_params, ref_params):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)

  m0 = results['process0']['result'][parallel]['metrics']
  m1 = results['process1']['result'][parallel]['metrics']
  mr = results['reference']['result'][parallel]['metrics']
  assert m0 == m1  # Every process returns the metrics of the whole split.
  with open(os.path.join(pair, 'report', 'test_metrics.json')) as f:
    reported = json.load(f)
  assert reported['num_examples'] == mr['num_examples'] == m0['num_examples'] > 0
  assert reported['confusion_matrix'] == mr['confusion_matrix']
  assert abs(reported['accuracy'] - mr['accuracy']) * mr['num_examples'] <= 1
  np.testing.assert_allclose(reported['loss'], mr['loss'], rtol=1e-4)

  # Per-example predictions: every test example once, in the split's order.
  with open(os.path.join(pair, 'report', 'test_predictions.csv')) as f:
    pair_rows = [l.split(',') for l in f.read().splitlines()[1:]]
  with open(os.path.join(ref, 'report', 'test_predictions.csv')) as f:
    ref_rows = [l.split(',') for l in f.read().splitlines()[1:]]
  assert [r[:3] for r in pair_rows] == [r[:3] for r in ref_rows]  # Path, true, predicted.
  assert len({r[0] for r in pair_rows}) == len(pair_rows) == m0['num_examples']


@pytest.mark.parametrize('parallel', PARALLELS)
def test_only_process_zero_writes(runs, parallel):
  out, results = runs
  assert results['process0']['result'][parallel]['writes'] == ['write', 'write_report']
  assert results['process1']['result'][parallel]['writes'] == []
  assert len(glob.glob(os.path.join(_workdir(out, 'pair', parallel), 'events.out.*'))) == 1
  assert 'report written to' in results['process0']['stdout']
  assert 'report written to' not in results['process1']['stdout']
  assert 'epoch 1/' not in results['process1']['stdout']


def test_explicit_flags_go_together():
  from bcjax import distributed
  from bcjax.errors import UserError
  assert distributed.initialize() is False  # Nothing asked: single-process, no-op.
  with pytest.raises(UserError, match='go together'):
    distributed.initialize('127.0.0.1:1234', num_processes=2)


if __name__ == '__main__':
  sys.path.insert(0, ROOT)
  if sys.argv[1] == 'worker':
    _worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
  else:
    _reference(sys.argv[2])
