"""Unusual, hostile and broken image input: read what is valid, skip the rest with one warning.

Every case is a small PBC-layout folder or zip built here from synthetic
JPEGs (tests/data_fixtures.py), plus the one odd entry under test. Listing and
reading are called directly (``layout.list_files`` + ``layout.read``), as the
TFDS builder calls them; the last tests build the dataset itself.
"""

import os
import struct
import threading
import zipfile
import zlib

import pytest

from bcjax import errors
from bcjax.data import images, layout
from conftest import override
from data_fixtures import jpeg_bytes, make_pbc_folder

GOOD = jpeg_bytes(0, 0)


@pytest.fixture
def folder(tmp_path):
  return make_pbc_folder(str(tmp_path), per_class=2, junk=False)


def _scan(path):
  warnings = []
  scan = layout.read(layout.list_files(layout.locate(path)), warn=warnings.append, threads=2)
  return scan, warnings


def _names(scan):
  return {r.file_name for r in scan.records}


def _bomb_png(width=100_000, height=100_000) -> bytes:
  """A valid 1x1 PNG whose header then declares ``width`` x ``height``."""
  import io
  from PIL import Image
  buffer = io.BytesIO()
  Image.new('RGB', (1, 1)).save(buffer, format='PNG')
  data = bytearray(buffer.getvalue())
  ihdr = data.index(b'IHDR')
  data[ihdr + 4:ihdr + 12] = struct.pack('>II', width, height)
  crc = zlib.crc32(bytes(data[ihdr:ihdr + 17]))
  data[ihdr + 17:ihdr + 21] = struct.pack('>I', crc)
  return bytes(data)


# -- Unusual but valid ----------------------------------------------------------


def test_non_utf8_names_case_variants_and_subfolders_are_read(folder):
  os.rename(os.path.join(folder, 'neutrophil'), os.path.join(folder, 'NeutroPhil'))
  with open(os.fsencode(os.path.join(folder, 'basophil')) + b'/caf\xe9.jpg', 'wb') as f:
    f.write(jpeg_bytes(0, 5))
  os.makedirs(os.path.join(folder, 'monocyte', 'patient3', 'day2'))
  with open(os.path.join(folder, 'monocyte', 'patient3', 'day2', 'm.jpg'), 'wb') as f:
    f.write(jpeg_bytes(5, 7))
  scan, warnings = _scan(folder)
  names = _names(scan)
  assert 'basophil/caf\\xe9.jpg' in names  # The byte escaped, not lost.
  assert 'neutrophil/NE_0.jpg' in names  # Labelled by the lower-cased folder.
  assert 'monocyte/patient3/day2/m.jpg' in names
  assert not warnings
  assert layout.list_files(layout.locate(folder)).fingerprint()  # Hashable text.


def test_two_folders_of_one_class_are_one_error(folder):
  os.makedirs(os.path.join(folder, 'Basophil'))
  with open(os.path.join(folder, 'Basophil', 'x.jpg'), 'wb') as f:
    f.write(GOOD)
  with pytest.raises(errors.UserError, match="Basophil and .*basophil are both the 'basophil'"):
    layout.list_files(layout.locate(folder))


# -- Hostile or broken: folders --------------------------------------------------


def test_hostile_files_are_skipped_with_one_warning_each_unread(folder, tmp_path, monkeypatch):
  cls = os.path.join(folder, 'eosinophil')
  huge = os.path.join(cls, 'huge.jpg')
  with open(huge, 'wb') as f:
    f.truncate(images.MAX_FILE_BYTES + 1)  # Sparse: costs no disk, must cost no memory.
  with open(os.path.join(cls, 'bomb.png'), 'wb') as f:
    f.write(_bomb_png())
  os.mkfifo(os.path.join(cls, 'pipe.jpg'))  # Opening it would block forever.
  os.symlink('loop_b.jpg', os.path.join(cls, 'loop_a.jpg'))
  os.symlink('loop_a.jpg', os.path.join(cls, 'loop_b.jpg'))
  outside = tmp_path / 'outside.jpg'
  outside.write_bytes(GOOD)
  os.symlink(outside, os.path.join(cls, 'escape.jpg'))
  os.symlink(os.path.join(cls, 'EO_0.jpg'), os.path.join(cls, 'inside.jpg'))  # Fine.
  opened = []
  real_open = open

  def spy(path, *a, **k):
    opened.append(os.fspath(path))
    return real_open(path, *a, **k)

  monkeypatch.setattr('builtins.open', spy)
  scan, warnings = _scan(folder)
  monkeypatch.undo()
  assert 'eosinophil/inside.jpg' in _names(scan)
  reasons = {w.split(': ', 1)[0].rsplit('/', 1)[-1]: w for w in warnings}
  assert sorted(reasons) == ['bomb.png', 'escape.jpg', 'huge.jpg', 'loop_a.jpg', 'loop_b.jpg',
                             'pipe.jpg']
  assert 'more than any cell image' in reasons['huge.jpg']
  assert 'decompression bomb' in reasons['bomb.png']
  assert 'a FIFO' in reasons['pipe.jpg']
  assert 'symbolic link loop' in reasons['loop_a.jpg']
  assert 'leading out of' in reasons['escape.jpg']
  assert huge not in opened and not any(p.endswith('pipe.jpg') for p in opened)


def test_predict_refuses_fifo_huge_and_bomb_without_reading(tmp_path):
  os.mkfifo(tmp_path / 'pipe.jpg')
  with open(tmp_path / 'huge.jpg', 'wb') as f:
    f.truncate(images.MAX_FILE_BYTES + 1)
  (tmp_path / 'bomb.png').write_bytes(_bomb_png())
  for name, words in (('pipe.jpg', 'not a regular file'), ('huge.jpg', 'more than any'),
                      ('bomb.png', 'decompression bomb')):
    with pytest.raises(errors.UserError, match=words):
      images.read_image(str(tmp_path / name))


# -- Hostile or broken: zips ----------------------------------------------------


def _zip_with(tmp_path, folder, extra):
  """The folder zipped, plus ``extra(archive)`` entries; returns the zip's path."""
  path = str(tmp_path / 'pbc.zip')
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as archive:
    for dirpath, _, names in sorted(os.walk(folder)):
      for name in sorted(names):
        rel = os.path.relpath(os.path.join(dirpath, name), os.path.dirname(folder))
        archive.write(os.path.join(dirpath, name), rel)
    extra(archive)
  return path


def _patch_entry(path, name, *, method=None, flags=None, declared_size=None):
  """Rewrites fields of ``name``'s local and central headers in place."""
  with open(path, 'rb') as f:
    data = bytearray(f.read())
  encoded = name.encode()
  for signature, method_at, flags_at, size_at, name_len_at, name_at in (
      (b'PK\x03\x04', 8, 6, 22, 26, 30), (b'PK\x01\x02', 10, 8, 24, 28, 46)):
    start = 0
    while True:
      i = data.find(signature, start)
      if i < 0:
        break
      start = i + 4
      n = struct.unpack_from('<H', data, i + name_len_at)[0]
      if bytes(data[i + name_at:i + name_at + n]) != encoded:
        continue
      if method is not None:
        struct.pack_into('<H', data, i + method_at, method)
      if flags is not None:
        struct.pack_into('<H', data, i + flags_at, flags)
      if declared_size is not None:
        struct.pack_into('<I', data, i + size_at, declared_size)
  with open(path, 'wb') as f:
    f.write(data)


def test_hostile_zip_entries_are_skipped_with_one_warning_each(folder, tmp_path):
  root = os.path.basename(folder)

  def extra(archive):
    for name in ('huge.jpg', 'method.jpg', 'secret.jpg', 'dup.jpg', 'dup.jpg'):
      archive.writestr(f'{root}/lymphocyte/{name}', GOOD)
    archive.writestr(f'{root}/lymphocyte/bomb.png', _bomb_png())
    link = zipfile.ZipInfo(f'{root}/lymphocyte/link.jpg')
    link.external_attr = (0o120777 << 16)
    archive.writestr(link, '/etc/passwd')

  import warnings as python_warnings
  with python_warnings.catch_warnings():
    python_warnings.simplefilter('ignore')  # zipfile's own "Duplicate name" warning.
    path = _zip_with(tmp_path, folder, extra)
  _patch_entry(path, f'{root}/lymphocyte/huge.jpg', declared_size=2**32 - 1)
  _patch_entry(path, f'{root}/lymphocyte/method.jpg', method=99)
  _patch_entry(path, f'{root}/lymphocyte/secret.jpg', flags=0x1)
  scan, warnings = _scan(path)
  reasons = {w.split(': ', 1)[0].rsplit('/', 1)[-1]: w for w in warnings}
  assert sorted(reasons) == ['bomb.png', 'dup.jpg', 'huge.jpg', 'link.jpg', 'method.jpg',
                             'secret.jpg']
  assert len(warnings) == 6  # One line per entry, the duplicate name included.
  assert 'more than any cell image' in reasons['huge.jpg']
  assert 'compression method 99' in reasons['method.jpg']
  assert 'encrypted' in reasons['secret.jpg']
  assert '2 entries have this name' in reasons['dup.jpg']
  assert 'symbolic link' in reasons['link.jpg']
  assert 'decompression bomb' in reasons['bomb.png']
  assert len(scan.records) == 16  # Every good image read.


# -- Splits and concurrent preparation ------------------------------------------


def _pbc_config(path, tmp_path, **fields):
  from configs import cnn
  config = cnn.get_config('tiny')
  config.data.source = 'pbc'
  config.data.path = str(path)
  config.data.tfds_dir = str(tmp_path / 'tfds')
  return override(config, **fields)


def test_a_split_that_would_be_empty_is_one_line_before_building(folder, tmp_path):
  from bcjax import data
  with pytest.raises(errors.UserError, match='the test split would be empty: 16 images'):
    data.prepare(_pbc_config(folder, tmp_path))
  assert not list((tmp_path / 'tfds').glob('pbc/*/1.0.0*'))  # Nothing written to reuse.


def test_a_builder_made_before_another_process_finished_reads_the_finished_splits(tmp_path):
  """The race of two processes, in one: this process's memoised builder read the
  folder while it was empty, then another process (here: a second builder)
  finished the dataset; prepare must read the finished splits, not KeyError."""
  from bcjax import data
  from bcjax.data import pbc_builder
  config = _pbc_config(make_pbc_folder(str(tmp_path), per_class=7, junk=False), tmp_path)
  stale = pbc_builder.builder(config)
  assert not stale.is_prepared() and not stale.info.splits
  other = pbc_builder.Pbc(config=stale.builder_config, data_dir=str(tmp_path / 'tfds'))
  assert pbc_builder._build_unlocked(config, other)  # pylint: disable=protected-access
  info = data.prepare(config)
  assert info.split_sizes['all'] == 56
  assert sum(info.split_sizes[s] for s in ('train', 'validation', 'test')) == 56


def test_two_processes_preparing_one_folder_build_once(tmp_path):
  import subprocess
  import sys
  from conftest import ROOT
  folder = make_pbc_folder(str(tmp_path), per_class=7, junk=False)
  code = ('import sys; from configs import cnn; from bcjax import data\n'
          'c = cnn.get_config("tiny"); c.data.source = "pbc"\n'
          f'c.data.path = {folder!r}; c.data.tfds_dir = {str(tmp_path / "tfds")!r}\n'
          'print("SIZES", data.prepare(c).split_sizes)\n')
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  procs = [subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    assert 'Traceback' not in err
  sizes = {line for out, _ in outs for line in out.splitlines() if line.startswith('SIZES')}
  assert len(sizes) == 1  # Both see the same dataset.
  assert sum('preparing PBC from' in out for out, _ in outs) == 1  # Built once.


# -- Damaged prepared data --------------------------------------------------------


def test_a_cut_or_overwritten_prepared_tfds_shard_names_the_folder_to_delete(tmp_path):
  import glob
  import shutil
  from bcjax import data, train
  from bcjax.data import pbc_builder
  config = _pbc_config(make_pbc_folder(str(tmp_path), per_class=6, junk=False), tmp_path)
  config.num_epochs = 1
  data.prepare(config)
  prepared = pbc_builder.builder(config).data_dir
  shard = glob.glob(os.path.join(prepared, 'pbc-train.tfrecord-*'))[0]
  whole = open(shard, 'rb').read()
  os.truncate(shard, len(whole) - 100)  # Cut: told from its size, before any step.
  with pytest.raises(errors.UserError) as e:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(e.value)
  assert message.startswith(f'the prepared dataset {prepared} is damaged (the train split')
  assert 'delete that folder and rerun' in message and '\n' not in message
  with open(shard, 'wb') as f:  # Overwritten in the middle, same size: told when read.
    f.write(whole[:len(whole) // 2] + bytes(200) + whole[len(whole) // 2 + 200:])
  data.clear_cache()
  with pytest.raises(errors.UserError) as e:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert str(e.value).startswith(f'the prepared dataset {prepared} is damaged (')
  assert 'delete that folder and rerun' in str(e.value)
  shutil.rmtree(prepared)  # What the line says: the next run prepares it again.
  data.clear_cache()
  assert data.prepare(config).split_sizes['all'] == 48


def test_a_cut_or_overwritten_packed_file_is_one_line(tmp_path):
  from bcjax import data
  from bcjax.data import packed, synthetic
  path = str(tmp_path / 'cells.npz')
  packed.write_arrays(path, {s: synthetic.make_split(seed=1, split=s, num=16, image_size=32)
                             for s in ('train', 'validation', 'test')},
                      synthetic.CLASS_NAMES, provenance={})
  whole = open(path, 'rb').read()
  from configs import cnn
  config = override(cnn.get_config('tiny'), **{'data.source': 'packed', 'data.path': path})
  with open(path, 'wb') as f:
    f.write(whole[:len(whole) * 2 // 3])
  with pytest.raises(errors.UserError, match=f'{path} is damaged .*; pack it again'):
    data.prepare(config)
  middle = whole.index(b'train.bytes') + 200  # Inside the train images' member.
  with open(path, 'wb') as f:
    f.write(whole[:middle] + bytes(64) + whole[middle + 64:])
  data.clear_cache()
  data.prepare(config)  # The header reads; the images do not.
  with pytest.raises(errors.UserError, match=f'{path} is damaged .*; pack it again'):
    data.train_pixels(config)


@pytest.mark.parametrize('kind', ['sixteen_bit', 'sixteen_bit_dark', 'palette_transparent',
                                  'gray'])
def test_the_export_loader_reads_odd_images_as_predict_does(kind, tmp_path):
  import numpy as np
  from PIL import Image
  from bcjax import data
  from bcjax import export_loader_example as loader
  rng = np.random.default_rng(3)
  rgb = rng.integers(0, 256, (30, 32, 3), dtype=np.uint8)
  if kind == 'sixteen_bit':
    image = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)
  elif kind == 'sixteen_bit_dark':  # 16-bit values all below 256: still 16-bit data.
    image = Image.fromarray((rgb[..., 0] // 2).astype(np.uint16))
  elif kind == 'palette_transparent':
    image = Image.fromarray(rgb).quantize(16)
    image.info['transparency'] = 0
  else:
    image = Image.fromarray(rgb[..., 1])
  path = str(tmp_path / f'{kind}.png')
  image.save(path)
  expected = data.preprocess(data.read_image(path), 32)
  got = loader.read_image(path, 32)
  assert np.abs(got - expected).max() <= 2 / 255  # The two resizes, not the decoding.
  assert got.mean() < 0.9  # Not clipped to white.
