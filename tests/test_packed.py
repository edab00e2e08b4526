"""Packed splits (bcjax/data/packed.py): written with tf.data, read without TensorFlow.

The file is made from the synthetic source at 16 px and read through
``bcjax.data``, the one input entry; training on it runs in a subprocess where
importing TensorFlow fails, as on a host without it, and in one where
TensorFlow is installed but must stay unimported.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from bcjax import data
from bcjax import errors
from bcjax.data import packed
from configs import default
from conftest import ROOT, override


def tiny_config(**overrides):
  config = default.tiny(default.get_config())
  config.image_size = 16
  return override(config, **overrides)


@pytest.fixture(scope='module')
def lossless(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('packed') / 'tiny16.npz')
  sizes, error = packed.pack(tiny_config(), path, quality=0)
  assert error == 0.0
  return path, sizes


def reader(path, **overrides):
  return tiny_config(**{'data.source': 'packed', 'data.path': path, **overrides})


def pipeline_examples(split):
  """The tf.data pipeline's eval batches of ``split``, flattened, padding dropped."""
  out = list(data.make_eval_dataset(tiny_config(), split, local_device_count=1)
             .as_numpy_iterator())
  mask = np.concatenate([b['mask'][0] for b in out])
  return {k: np.concatenate([b[k][0] for b in out])[mask] for k in ('image', 'label', 'file_name')}


def test_lossless_pack_holds_the_pipelines_pixels(lossless):
  path, sizes = lossless
  assert sizes == {'train': 45, 'validation': 9, 'test': 10}
  info = data.prepare(reader(path))
  assert info.split_sizes == sizes and info.image_size == 16
  assert info.class_names == data.CLASS_NAMES
  for split in ('validation', 'test'):
    want = pipeline_examples(split)
    got = list(data.make_eval_dataset(reader(path), split, local_device_count=1)
               .as_numpy_iterator())
    mask = np.concatenate([b['mask'][0] for b in got])
    np.testing.assert_array_equal(np.concatenate([b['image'][0] for b in got])[mask],
                                  want['image'])
    np.testing.assert_array_equal(np.concatenate([b['label'][0] for b in got])[mask],
                                  want['label'])
    assert list(np.concatenate([b['file_name'][0] for b in got])[mask]) == list(want['file_name'])


def test_lossy_pack_is_close_and_smaller(lossless, tmp_path):
  path = str(tmp_path / 'q80.npz')
  _, error = packed.pack(tiny_config(), path, splits=('validation',), quality=80)
  assert os.path.getsize(path) < os.path.getsize(lossless[0])
  assert data.prepare(reader(path)).split_sizes == {'validation': 9}
  provenance = json.loads(str(np.load(path)['provenance']))
  assert provenance['webp_quality'] == 80 and provenance['source'] == 'synthetic'
  assert provenance['mean_abs_error'] == error
  lossy = next(data.make_eval_dataset(reader(path), 'validation', local_device_count=1)
               .as_numpy_iterator())
  exact = next(data.make_eval_dataset(reader(lossless[0]), 'validation', local_device_count=1)
               .as_numpy_iterator())
  mask = exact['mask'][0]  # The 9 images fill one batch of 16; the rest is padding.
  diff = np.abs(lossy['image'][0][mask] - exact['image'][0][mask]).mean()
  assert 0 < diff < 0.05
  assert diff * 255 == pytest.approx(error, rel=1e-4)


def test_train_batches_layout_order_and_augmentation(lossless):
  """Training batches are the stored pixels, unflipped, in order; the train step flips them."""
  from conftest import assert_the_step_flips
  path, _ = lossless
  config = reader(path, **{'data.augment.flips': True, 'data.augment.rot90': True})
  info = data.prepare(config)
  first = list(data.make_train_dataset(config, epoch=3, local_device_count=2)
               .as_numpy_iterator())
  again = list(data.make_train_dataset(config, epoch=3, local_device_count=2)
               .as_numpy_iterator())
  other = list(data.make_train_dataset(config, epoch=4, local_device_count=2)
               .as_numpy_iterator())
  assert len(first) == data.steps_per_epoch(config, info) == 45 // 8
  assert first[0]['image'].shape == (2, 4, 16, 16, 3) and first[0]['image'].dtype == np.uint8
  assert first[0]['label'].shape == (2, 4)
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a['image'], b['image'])
  assert not np.array_equal(first[0]['image'], other[0]['image'])
  # Each image is a stored one as it is (the flags do nothing here), with its label.
  stored = {}
  for b in data.make_eval_dataset(reader(path), 'train', local_device_count=1).as_numpy_iterator():
    for x, label, keep in zip(b['image'][0], b['label'][0], b['mask'][0]):
      if keep:
        stored[np.round(x * 255).astype(np.uint8).tobytes()] = label
  assert len(stored) == 45
  for b in first:
    for x, label in zip(b['image'].reshape(-1, 16, 16, 3), b['label'].reshape(-1)):
      assert stored[x.tobytes()] == label
      assert all(np.rot90(z, k).tobytes() not in stored
                 for z, turns in ((x, (1, 2, 3)), (x[:, ::-1], (0, 1, 2, 3))) for k in turns)
  plain = list(data.make_train_dataset(reader(path), epoch=3, local_device_count=2)
               .as_numpy_iterator())
  for a, b in zip(first, plain):
    np.testing.assert_array_equal(a['image'], b['image'])
  one_device = next(data.make_train_dataset(config, epoch=3, local_device_count=1)
                    .as_numpy_iterator())
  assert_the_step_flips(one_device['image'], one_device['label'])
  # skip() resumes mid-epoch on the same batches.
  resumed = list(data.make_train_dataset(config, epoch=3, local_device_count=2)
                 .skip(2).as_numpy_iterator())
  np.testing.assert_array_equal(resumed[0]['image'], first[2]['image'])


@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_every_example_once_across_processes(lossless, process_count):
  path, _ = lossless
  seen, lengths = [], set()
  for pi in range(process_count):
    out = list(data.make_eval_dataset(reader(path), 'validation', process_index=pi,
                                        process_count=process_count, local_device_count=2,
                                        batch_size=4 * process_count).as_numpy_iterator())
    lengths.add(len(out))
    for b in out:
      assert (b['file_name'][~b['mask']] == b'').all() and (b['image'][~b['mask']] == 0).all()
      seen += b['file_name'][b['mask']].tolist()
  assert len(lengths) == 1
  skipped = list(data.make_eval_dataset(reader(path), 'validation', local_device_count=2,
                                          batch_size=4).skip(1).as_numpy_iterator())
  whole = list(data.make_eval_dataset(reader(path), 'validation', local_device_count=2,
                                        batch_size=4).as_numpy_iterator())
  assert [b['file_name'].tolist() for b in skipped] == [b['file_name'].tolist() for b in whole[1:]]
  assert sorted(seen) == [f'synthetic/validation/{i:05d}'.encode() for i in range(9)]
  shards = [{x.tobytes() for b in data.make_train_dataset(
      reader(path), epoch=0, process_index=pi, process_count=2, local_device_count=1)
      .as_numpy_iterator() for x in b['image'][0]} for pi in range(2)]
  assert shards[0] and shards[1] and not shards[0] & shards[1]


def test_user_mistakes_are_user_errors(lossless, tmp_path):
  path, _ = lossless
  with pytest.raises(errors.UserError, match='packed at 16 px but config.image_size=32'):
    data.prepare(reader(path, image_size=32))
  with pytest.raises(errors.UserError, match='packed data file not found'):
    data.prepare(reader(str(tmp_path / 'nope.npz')))
  (tmp_path / 'junk.npz').write_bytes(b'not a zip')
  with pytest.raises(errors.UserError, match='not a packed data file'):
    data.prepare(reader(str(tmp_path / 'junk.npz')))
  with pytest.raises(errors.UserError, match='must end in .npz'):
    packed.pack(tiny_config(), str(tmp_path / 'x.zip'))
  with pytest.raises(errors.UserError, match="holds no 'nope' split"):
    next(data.make_eval_dataset(reader(path), 'nope', local_device_count=1)
         .as_numpy_iterator())
  with pytest.raises(errors.UserError, match='config.batch_size=8 must be'):
    data.make_train_dataset(reader(path), epoch=0, local_device_count=3)


@pytest.mark.slow
def test_training_runs_where_tensorflow_cannot_be_imported(lossless, tmp_path):
  """launch.py trains and tests on a packed file with TensorFlow unimportable."""
  blocker = tmp_path / 'site'
  blocker.mkdir()
  (blocker / 'sitecustomize.py').write_text(
      'import sys\nfor m in ("tensorflow", "tensorflow_datasets"):\n  sys.modules[m] = None\n')
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(ROOT)]))
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, 'launch.py', '--config', 'configs/cnn_lstm.py:tiny',
       f'--workdir={workdir}', '--config.image_size=16', '--config.model.extractor_features=(8,)',
       '--config.data.source=packed', f'--config.data.path={lossless[0]}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'no TensorBoard scalars' in result.stdout
  metrics = json.loads((workdir / 'report' / 'test_metrics.json').read_text())
  assert metrics['num_examples'] == 10
  assert json.loads((workdir / 'history.json').read_text())[0]['val_accuracy'] is not None


def test_the_trainer_and_packed_input_leave_tensorflow_unloaded(lossless):
  """TensorFlow installed: importing the trainer and reading packed batches never load it.

  (The trainer's own calls on packed data are these; the run above shows they
  suffice to train and test.)
  """
  code = f"""
import sys
import bcjax.train
assert 'tensorflow' not in sys.modules, 'import bcjax.train loaded TensorFlow'
from bcjax import data
from configs import default
c = default.tiny(default.get_config())
c.image_size, c.data.source, c.data.path = 16, 'packed', {lossless[0]!r}
info = data.prepare(c)
assert len(list(data.make_train_dataset(c, epoch=0).as_numpy_iterator())) == \
    data.steps_per_epoch(c, info)
for split in ('validation', 'test'):
  assert data.split_facts(c, split)[1] == sum(
      int(b['mask'].sum()) for b in data.make_eval_dataset(c, split).as_numpy_iterator())
print('LOADED', sorted(m for m in sys.modules if m.split('.')[0].startswith('tensorflow')))
"""
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'LOADED []' in result.stdout, result.stdout[-2000:]
