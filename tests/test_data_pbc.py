"""The PBC builder, its layouts and messy files, splits, BloodMNIST, 'all'.

Fixtures are generated (tests/data_fixtures.py): a PBC-layout folder of small
JPEGs with junk mixed in, the same as a zip with __MACOSX/ entries, and a
BloodMNIST npz. The download test serves a zip from 127.0.0.1; nothing here
touches the network.
"""

import functools
import http.server
import os
import threading

import numpy as np
import pytest
import tensorflow as tf

from bcjax import data
from bcjax import errors
from bcjax.data import images
from bcjax.data import layout
from bcjax.data import pbc_builder
from bcjax.data import splits
from configs import default
import data_fixtures


@pytest.fixture(autouse=True)
def _fresh_cache():
  data.clear_cache()
  yield
  data.clear_cache()


@pytest.fixture(scope='module')
def pbc_folder(tmp_path_factory):
  return data_fixtures.make_pbc_folder(str(tmp_path_factory.mktemp('pbc')))


@pytest.fixture(scope='module')
def pbc_zip(pbc_folder, tmp_path_factory):
  path = str(tmp_path_factory.mktemp('zip') / 'PBC_dataset_normal_DIB.zip')
  return data_fixtures.make_pbc_zip(pbc_folder, path)


def pbc_config(path, tfds_dir, **overrides):
  config = default.get_config()
  config.data.source = 'pbc'
  config.data.path = str(path)
  config.data.tfds_dir = str(tfds_dir)
  config.image_size = 24
  config.batch_size = 8
  config.eval_batch_size = 8
  for name, value in overrides.items():
    setattr(config.data, name, value)
  return config


@pytest.fixture(scope='module')
def prepared(pbc_folder, tmp_path_factory):
  """The fixture folder, built once for the module; returns (config, info)."""
  config = pbc_config(pbc_folder, tmp_path_factory.mktemp('tfds'))
  return config, data.prepare(config)


NUM_GOOD = 8 * 6 + 1 + len(data_fixtures.ODD_IMAGES)  # + dup.jpg


def all_eval_examples(config, split):
  out = {}
  for batch in data.make_eval_dataset(config, split, local_device_count=1).as_numpy_iterator():
    for name, label, image, keep in zip(batch['file_name'][0], batch['label'][0],
                                        batch['image'][0], batch['mask'][0]):
      if keep:
        out[name.decode()] = (int(label), image)
  return out


def test_prepare_builds_splits_and_prints_the_summary(pbc_folder, tmp_path, capsys):
  config = pbc_config(pbc_folder, tmp_path)
  info = data.prepare(config)
  captured = capsys.readouterr()
  assert info.class_names == data.CLASS_NAMES
  assert sum(info.split_sizes[s] for s in ('train', 'validation', 'test')) == NUM_GOOD
  assert info.split_sizes['all'] == NUM_GOOD
  for name, reason in data_fixtures.JUNK.items():
    assert f'{name}: {reason}' in captured.out  # In the summary ...
    assert f'{name}: {reason}' in captured.err  # ... and one warning line.
  assert 'ignored 1 macOS metadata' in captured.out
  assert 'basophil/BA_0.jpg, basophil/dup.jpg' in captured.out
  assert data.prepare(config) == info  # Built once: the second call reads.
  assert capsys.readouterr().out == ''


def test_prepared_dataset_keeps_file_names_and_labels(prepared):
  config, info = prepared
  seen = {}
  for split in ('train', 'validation', 'test'):
    examples = all_eval_examples(config, split)
    assert len(examples) == info.split_sizes[split]
    assert not set(examples) & set(seen)
    seen.update(examples)
  assert len(seen) == NUM_GOOD
  for name, (label, image) in seen.items():
    assert data.CLASS_NAMES[label] == name.split('/')[0]
    assert image.shape == (24, 24, 3) and image.dtype == np.float32
  # What the pipeline yields is what predict.py computes from the file.
  name = 'lymphocyte/rgba.png'
  expected = data.preprocess(
      data.read_image(os.path.join(config.data.path, name)), 24)
  np.testing.assert_array_equal(seen[name][1], expected)


def test_train_reads_the_cache_not_the_jpegs(prepared, monkeypatch):
  config, info = prepared
  original = images.decode
  counter = tf.Variable(0)

  def decode(data_):
    counter.assign_add(1)
    return original(data_)

  monkeypatch.setattr(images, 'decode', decode)
  for epoch in range(3):
    for _ in data.make_train_dataset(config, epoch=epoch, local_device_count=1):
      pass
  assert int(counter.numpy()) == info.split_sizes['train']


def test_zip_gives_the_same_dataset_as_the_folder(prepared, pbc_zip, tmp_path,
                                                  capsys):
  config, info = prepared
  zip_config = pbc_config(pbc_zip, tmp_path)
  zip_info = data.prepare(zip_config)
  out = capsys.readouterr().out
  assert zip_info == info
  assert 'ignored' in out and 'macOS metadata' in out
  for split in ('train', 'test'):
    a = all_eval_examples(config, split)
    b = all_eval_examples(zip_config, split)
    assert a.keys() == b.keys()
    for name in a:
      np.testing.assert_array_equal(a[name][1], b[name][1])


def test_manual_dir_is_found(pbc_zip, tmp_path):
  manual = tmp_path / 'downloads' / 'manual'
  manual.mkdir(parents=True)
  os.symlink(pbc_zip, manual / 'PBC_dataset_normal_DIB.zip')
  info = data.prepare(pbc_config('', tmp_path))
  assert info.split_sizes['all'] == NUM_GOOD


def test_download_from_a_local_server(pbc_zip, tmp_path, monkeypatch):
  handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                              directory=os.path.dirname(pbc_zip))
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    for var in ('http_proxy', 'HTTP_PROXY', 'https_proxy', 'HTTPS_PROXY'):
      monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv('NO_PROXY', '127.0.0.1')
    url = f'http://127.0.0.1:{server.server_address[1]}/{os.path.basename(pbc_zip)}'
    monkeypatch.setattr(pbc_builder, 'DOWNLOAD_URL', url)
    info = data.prepare(pbc_config('', tmp_path))
    assert info.split_sizes['all'] == NUM_GOOD
  finally:
    server.shutdown()


def test_nothing_available_is_one_line_saying_where_to_put_it(tmp_path, monkeypatch):
  monkeypatch.setattr(pbc_builder, 'DOWNLOAD_URL', 'http://127.0.0.1:1/pbc.zip')
  with pytest.raises(errors.UserError) as e:
    data.prepare(pbc_config('', tmp_path))
  message = str(e.value)
  assert '\n' not in message
  assert '--config.data.path' in message
  assert str(tmp_path / 'downloads' / 'manual') in message


def test_layout_errors_name_the_folder(tmp_path):
  folder = data_fixtures.make_pbc_folder(str(tmp_path), per_class=1, junk=False)
  os.rename(os.path.join(folder, 'platelet'), os.path.join(tmp_path, 'platelet'))
  with pytest.raises(errors.UserError, match=r'class folder .*/platelet is missing'):
    data.prepare(pbc_config(folder, tmp_path / 'tfds'))
  os.mkdir(os.path.join(folder, 'platelet'))
  with pytest.raises(errors.UserError, match=r'class folder .*/platelet is empty'):
    data.prepare(pbc_config(folder, tmp_path / 'tfds'))
  with open(os.path.join(folder, 'platelet', 'x.jpg'), 'wb') as f:
    f.write(b'not a jpeg')
  with pytest.raises(errors.UserError, match=r'platelet has no readable image'):
    data.prepare(pbc_config(folder, tmp_path / 'tfds'))
  other = tmp_path / 'holiday_photos'
  other.mkdir()
  with pytest.raises(errors.UserError, match=r'holiday_photos is not in PBC layout'):
    data.prepare(pbc_config(other, tmp_path / 'tfds'))
  with pytest.raises(errors.UserError, match=r'does not exist'):
    data.prepare(pbc_config(tmp_path / 'nowhere', tmp_path / 'tfds'))


def test_parent_folder_is_accepted(pbc_folder):
  location = layout.locate(os.path.dirname(pbc_folder))
  assert location.path == pbc_folder


def test_odd_modes_become_rgb8(pbc_folder):
  for name in data_fixtures.ODD_IMAGES:
    image = data.read_image(os.path.join(pbc_folder, name))
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3
  sixteen = data.read_image(os.path.join(pbc_folder, 'platelet/sixteen_bit.png'))
  gray = data.read_image(os.path.join(pbc_folder, 'lymphocyte/gray.png'))
  assert sixteen.max() > 200  # Scaled by bit depth, not clipped at 255.
  np.testing.assert_array_equal(sixteen, gray)  # Same pixels, *257.


@pytest.mark.parametrize('name, reason', sorted(data_fixtures.JUNK.items()))
def test_read_image_errors_are_user_errors(pbc_folder, name, reason):
  with pytest.raises(errors.UserError, match=f'cannot read image .*{name}: {reason}'):
    data.read_image(os.path.join(pbc_folder, name))


def test_truncated_jpeg_with_a_valid_header_is_rejected():
  whole = data_fixtures.jpeg_bytes(1, 1, (64, 64))
  with pytest.raises(images.UnreadableImageError, match='truncated'):
    images.normalize(whole[:len(whole) * 2 // 3])


def test_split_is_stratified_deterministic_and_keeps_duplicates_together():
  rng = np.random.default_rng(0)
  labels = [k for k in range(8) for _ in range(100 + 10 * k)]
  digests = [f'{rng.integers(1 << 60):x}' for _ in labels]
  digests[5] = digests[7] = digests[450]  # Duplicates, one across classes.
  names = [f'{labels[i]}/{i:05d}' for i in range(len(labels))]
  kwargs = dict(seed=3, train_fraction=0.7, val_fraction=0.15)
  first = splits.assign(names, labels, digests, **kwargs)
  # Listing order does not matter.
  order = rng.permutation(len(names))
  shuffled = splits.assign([names[i] for i in order], [labels[i] for i in order],
                           [digests[i] for i in order], **kwargs)
  assert [shuffled[list(order).index(i)] for i in range(len(names))] == first
  assert first[5] == first[7] == first[450]
  for k in range(8):
    members = [s for s, l in zip(first, labels) if l == k]
    n = len(members)
    assert abs(members.count('train') - 0.7 * n) <= 2
    assert abs(members.count('validation') - 0.15 * n) <= 2
  assert splits.assign(names, labels, digests, seed=4, train_fraction=0.7,
                       val_fraction=0.15) != first
  with pytest.raises(errors.UserError, match='leave a test split'):
    splits.assign(names, labels, digests, seed=0, train_fraction=0.9,
                  val_fraction=0.1)


def test_all_split_reads_a_labelled_folder(pbc_folder, tmp_path, capsys):
  config = pbc_config(pbc_folder, tmp_path)
  examples = all_eval_examples(config, 'all')
  assert len(examples) == NUM_GOOD
  assert 'neutrophil/notes.txt: not an image' in capsys.readouterr().err
  assert not os.listdir(tmp_path)  # Nothing prepared or written.
  # Another lab's folder may lack classes.
  other = data_fixtures.make_pbc_folder(str(tmp_path / 'lab'), per_class=2, junk=False)
  for name in ('basophil', 'ig'):
    for f in os.listdir(os.path.join(other, name)):
      os.remove(os.path.join(other, name, f))
    os.rmdir(os.path.join(other, name))
  assert len(all_eval_examples(pbc_config(other, tmp_path), 'all')) == 12


def test_bloodmnist_official_splits_and_resize(tmp_path):
  data_fixtures.make_bloodmnist_npz(str(tmp_path / 'bloodmnist.npz'), 28)
  data_fixtures.make_bloodmnist_npz(str(tmp_path / 'bloodmnist_64.npz'), 64,
                                    sizes=(16, 8, 8))
  config = default.get_config()
  config.data.source = 'bloodmnist'
  config.data.path = str(tmp_path)
  config.batch_size = 8
  config.eval_batch_size = 8
  config.image_size = 28
  assert data.prepare(config).split_sizes == {'train': 24, 'validation': 8, 'test': 8}
  config.image_size = 32  # Read from the 64 px file, downscaled.
  assert data.prepare(config).split_sizes == {'train': 16, 'validation': 8, 'test': 8}
  batch = next(data.make_eval_dataset(config, 'test', local_device_count=1).as_numpy_iterator())
  assert batch['image'].shape == (1, 8, 32, 32, 3)
  assert batch['file_name'][0, 0] == b'bloodmnist_64/test/00000'
  assert batch['label'][0].tolist() == list(range(8))
  train = list(data.make_train_dataset(config, epoch=0, local_device_count=2))
  assert len(train) == 2 and train[0]['image'].shape == (2, 4, 32, 32, 3)
  config.data.path = str(tmp_path / 'none')
  with pytest.raises(errors.UserError, match='does not exist'):
    data.prepare(config)
