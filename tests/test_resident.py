"""The device path (bcjax/data/resident.py, bcjax/augment.py): same data, augmented in the step.

* in-step augmentation equals a NumPy flip / rot90 of the same draws;
* a step on a uint8 batch equals a step on the float batch of those reference flips;
* an epoch gathered on the device is the packed backend's epoch, batch for
  batch (uint8, unaugmented, whatever the flags), and the tf.data epoch's
  examples; a resumed epoch replays the rest;
* pmap and shard_map gather and train alike on 4 devices (a subprocess, as
  in tests/test_parallel.py; ``python tests/test_resident.py`` runs it).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def cnn_default_placement():
  from configs import cnn
  return cnn.get_config().data.placement


def tiny_config(**overrides):
  from conftest import override
  from configs import cnn
  config = cnn.get_config('tiny')
  config.image_size = 16
  return override(config, **overrides)


@pytest.fixture(scope='module')
def packed_file(tmp_path_factory):
  from bcjax.data import packed
  path = str(tmp_path_factory.mktemp('resident') / 'tiny16.npz')
  packed.pack(tiny_config(), path, quality=0)
  return path


def _runner(config):
  from bcjax import models, parallel, steps
  return parallel.make_runner(config, models.build_model(config, axis_name=steps.AXIS))


def test_in_step_augmentation_is_the_reference_flip_and_rot90_of_the_same_draws():
  import jax
  from bcjax import augment
  from conftest import reference_flips
  images = np.random.default_rng(0).integers(0, 256, (64, 5, 5, 3), dtype=np.uint8)
  d = augment.draws(jax.random.key(3), 64)
  assert set(np.asarray(d[:, 2]).tolist()) == {0, 1, 2, 3}  # Every rotation drawn.
  for flips, rot90 in ((True, True), (True, False), (False, True), (False, False)):
    got = np.asarray(augment.apply(images, d, flips=flips, rot90=rot90))
    want = reference_flips(images, d, flips, rot90)
    np.testing.assert_array_equal(got, want)
    assert np.array_equal(want, images) == (not flips and not rot90)
  # XLA multiplies by the reciprocal: within one float32 ulp of the host's division.
  np.testing.assert_allclose(np.asarray(augment.to_float(images)),
                             images.astype(np.float32) / np.float32(255), rtol=2**-23, atol=0)


@pytest.mark.slow
def test_step_on_a_uint8_batch_is_the_step_on_its_reference_flips():
  """The step's draws come from its own key: fold_in(step, device 0, augment.STREAM)."""
  from conftest import assert_the_step_flips
  rng = np.random.default_rng(1)
  assert_the_step_flips(rng.integers(0, 256, (1, 8, 16, 16, 3), dtype=np.uint8),
                        rng.integers(0, 8, (1, 8)).astype(np.int32))


def _device_epoch(config, epoch, start=0):
  import jax
  from bcjax import data
  from bcjax.data import resident
  info = data.prepare(config)
  feed = resident.ResidentTrain(config, _runner(config), *data.train_pixels(config),
                                total=info.split_sizes['train'], process_count=1)
  return [{k: np.asarray(jax.device_get(v)) for k, v in b.items()}
          for b in feed.batches(epoch, start)]


def test_device_epoch_is_the_packed_epoch_and_resumes_mid_epoch(packed_file):
  """Both deliver the same uint8 batches, unaugmented: the step augments either alike."""
  from bcjax import data
  config = tiny_config(**{'data.source': 'packed', 'data.path': packed_file,
                          'data.augment.flips': True, 'data.augment.rot90': True})
  for epoch in (0, 1):
    device = _device_epoch(config, epoch)
    streamed = list(data.make_train_dataset(config, epoch=epoch, local_device_count=1)
                    .as_numpy_iterator())
    assert len(device) == len(streamed) == data.steps_per_epoch(config, data.prepare(config))
    for got, want in zip(device, streamed):
      assert got['image'].dtype == want['image'].dtype == np.uint8
      np.testing.assert_array_equal(got['image'].reshape(want['image'].shape), want['image'])
      np.testing.assert_array_equal(got['label'].reshape(want['label'].shape), want['label'])
  resumed = _device_epoch(config, 1, start=2)
  for got, want in zip(resumed, device[2:]):
    np.testing.assert_array_equal(got['image'], want['image'])
  assert len(resumed) == len(device) - 2


def test_device_epoch_holds_the_tf_data_epochs_examples():
  """From the tf.data cache (synthetic source): one epoch is every train example once, on both paths."""
  from bcjax import data
  config = tiny_config(batch_size=5)  # 45 train examples: no remainder dropped.
  device = _device_epoch(config, 0)
  streamed = list(data.make_train_dataset(config, epoch=0, local_device_count=1)
                  .as_numpy_iterator())
  pixels, labels = data.train_pixels(config, process_index=0, process_count=1)
  assert len(labels) == 45
  want = sorted(zip((im.tobytes() for im in pixels), labels.tolist()))
  for batches in (device, streamed):
    images = np.concatenate([b['image'].reshape(-1, 16, 16, 3) for b in batches])
    assert images.dtype == np.uint8
    got = np.concatenate([b['label'].reshape(-1) for b in batches]).tolist()
    assert sorted(zip((im.tobytes() for im in images), got)) == want


def test_placement_choice_budget_and_errors():
  from bcjax.data import resident
  from bcjax.errors import UserError
  assert cnn_default_placement() == 'stream'  # Recorded runs replay unchanged.
  config = tiny_config(**{'data.placement': 'auto'})
  assert resident.choose(config, 7195, 1).kind == 'device'
  config.image_size = 224
  config.data.device_memory_mb = 1000
  small = resident.choose(config, 7195, 1)
  assert small.kind == 'stream' and '1033 MB > data.device_memory_mb=1000' in small.reason
  assert resident.choose(config, 7195, 2).kind == 'device'  # Each process half.
  assert 'resident on the devices as uint8 (517 MB' in resident.choose(config, 7195, 2).describe(
      'packed')
  assert 'by NumPy (packed file)' in small.describe('packed')
  assert resident.choose(tiny_config(**{'data.placement': 'stream'}), 10, 1).kind == 'stream'
  config.data.placement = 'gpu'
  with pytest.raises(UserError, match="placement='gpu' is not known; allowed: auto, device"):
    resident.choose(config, 10, 1)


@pytest.mark.slow
def test_trainer_says_which_input_path_runs(tmp_path, capsys):
  from bcjax import train
  for placement, said in (('device', 'resident on the devices'), ('stream', 'streamed')):
    config = tiny_config(**{'data.placement': placement})
    train.train_and_evaluate(config, str(tmp_path / placement))
    assert said in capsys.readouterr().out


# --------------------------------------------------------------------------
# Four devices: pmap and shard_map gather and train alike.


def _four_devices_main():
  import jax
  from bcjax import data, optim, train_state
  from bcjax.data import resident
  config = tiny_config(**{'data.augment.flips': True, 'data.augment.rot90': True,
                          'model.dropout_conv': 0.0, 'model.dropout_dense': 0.0,
                          'optimizer.name': 'sgd', 'optimizer.learning_rate': 0.1})
  info = data.prepare(config)
  pixels, labels = data.train_pixels(config)
  out = {}
  for wrapper in ('pmap', 'shard_map'):
    config.parallel = wrapper
    runner = _runner(config)
    feed = resident.ResidentTrain(config, runner, pixels, labels,
                                  total=info.split_sizes['train'], process_count=1)
    tx, _ = optim.make(config, steps_per_epoch=feed.steps)
    state = runner.put_state(train_state.create(config, jax.random.key(0), tx))
    gathered, losses = [], []
    for batch in feed.batches(0):
      gathered.append(np.asarray(runner.get_rows(batch['label'])).tolist())
      state, m = runner.train_step(state, batch, jax.random.key(1))
      losses.append(runner.get_metrics(m)['loss_sum'])
    want = [labels[feed.indices(0, s).reshape(-1)].tolist() for s in range(feed.steps)]
    params = jax.tree.leaves(runner.get_state(state).params)
    out[wrapper] = {'labels_ok': gathered == want, 'losses': losses,
                    'params': [float(np.asarray(p).sum()) for p in params]}
  print('RESULT ' + json.dumps(out))


@pytest.mark.slow
def test_pmap_and_shard_map_gather_and_train_alike_on_four_devices():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             PYTHONPATH=ROOT, JAX_PLATFORMS='cpu')
  p = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT, env=env,
                     capture_output=True, text=True, timeout=600)
  lines = [l for l in p.stdout.splitlines() if l.startswith('RESULT ')]
  assert p.returncode == 0 and lines, p.stderr[-3000:]
  out = json.loads(lines[0][len('RESULT '):])
  assert out['pmap']['labels_ok'] and out['shard_map']['labels_ok']
  np.testing.assert_allclose(out['pmap']['losses'], out['shard_map']['losses'], rtol=1e-5)
  np.testing.assert_allclose(out['pmap']['params'], out['shard_map']['params'], rtol=1e-4,
                             atol=1e-5)


if __name__ == '__main__':
  _four_devices_main()
