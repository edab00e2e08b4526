"""Small PBC-layout folders, zips and BloodMNIST npz files made on the fly.

Tests never need the real data to exercise the messy cases the real download
has: files that are not images, truncated and empty files, macOS metadata in
the zip, duplicates, and grayscale / RGBA / palette / 16-bit images added by
users.
"""

import io
import os
import zipfile

import numpy as np
from PIL import Image

from bcjax.data import synthetic
from bcjax.data.spec import CLASS_NAMES


def jpeg_bytes(label: int, index: int, size=(42, 40)) -> bytes:
  rng = np.random.default_rng([7, label, index])
  image = synthetic.draw(rng, label, max(size))[:size[1], :size[0]]
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format='JPEG', quality=90)
  return buffer.getvalue()


def png_bytes(image: Image.Image) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format='PNG')
  return buffer.getvalue()


# File name -> (reason it is skipped) for the junk make_pbc_folder adds.
JUNK = {
    'neutrophil/notes.txt': 'not an image',
    'neutrophil/empty.jpg': 'empty file',
    'eosinophil/.DS_123.jpg': 'not an image',
    'monocyte/truncated.jpg': 'corrupt or truncated',
}
# Odd but readable images make_pbc_folder adds, all converted to RGB8.
ODD_IMAGES = ('lymphocyte/gray.png', 'lymphocyte/rgba.png',
              'platelet/palette.png', 'platelet/sixteen_bit.png',
              'basophil/gray.jpg')


def make_pbc_folder(root: str, per_class: int = 6, *, junk: bool = True,
                    sizes=((42, 40), (46, 44))) -> str:
  """Writes ``root/PBC_dataset_normal_DIB/<class>/*.jpg``; returns that folder.

  With ``junk``: the files of JUNK and ODD_IMAGES, a .DS_Store, and
  ``basophil/dup.jpg`` identical to ``basophil/BA_0.jpg``.
  """
  folder = os.path.join(root, 'PBC_dataset_normal_DIB')
  for label, name in enumerate(CLASS_NAMES):
    os.makedirs(os.path.join(folder, name), exist_ok=True)
    for i in range(per_class):
      path = os.path.join(folder, name, f'{name[:2].upper()}_{i}.jpg')
      with open(path, 'wb') as f:
        f.write(jpeg_bytes(label, i, sizes[i % len(sizes)]))
  if not junk:
    return folder

  def write(name, data):
    with open(os.path.join(folder, name), 'wb') as f:
      f.write(data)

  write('neutrophil/notes.txt', b'counted on 2019-03-01\n')
  write('neutrophil/empty.jpg', b'')
  write('eosinophil/.DS_123.jpg', b'\x00\x00\x00\x01Bud1' + bytes(100))
  write('monocyte/truncated.jpg', jpeg_bytes(5, 99)[:300])
  write('basophil/.DS_Store', b'\x00\x00\x00\x01Bud1')
  write('basophil/dup.jpg', jpeg_bytes(0, 0))
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (30, 32, 3), dtype=np.uint8)
  write('lymphocyte/gray.png', png_bytes(Image.fromarray(rgb[..., 0])))
  write('lymphocyte/rgba.png', png_bytes(Image.fromarray(
      np.concatenate([rgb, np.full((30, 32, 1), 128, np.uint8)], -1))))
  write('platelet/palette.png', png_bytes(Image.fromarray(rgb).quantize(16)))
  sixteen = (rgb[..., 0].astype(np.uint16) * 257)
  write('platelet/sixteen_bit.png', png_bytes(Image.fromarray(sixteen)))
  buffer = io.BytesIO()
  Image.fromarray(rgb[..., 1]).save(buffer, format='JPEG')
  write('basophil/gray.jpg', buffer.getvalue())
  return folder


def make_lab_folder(root: str, folders, per_class: int = 2) -> str:
  """Another lab's folder: ``root/<name>/<i>.jpg`` for each (folder name, PBC label)."""
  for name, label in folders:
    os.makedirs(os.path.join(root, name))
    for i in range(per_class):
      with open(os.path.join(root, name, f'{i}.jpg'), 'wb') as f:
        f.write(jpeg_bytes(label, i))
  return str(root)


def make_pbc_zip(folder: str, zip_path: str) -> str:
  """Zips ``folder`` as the download is zipped, with macOS metadata entries."""
  with zipfile.ZipFile(zip_path, 'w', zipfile.ZIP_DEFLATED) as archive:
    for dirpath, _, files in sorted(os.walk(folder)):
      rel = os.path.relpath(dirpath, os.path.dirname(folder))
      archive.writestr(f'{rel}/', b'')
      for name in sorted(files):
        archive.write(os.path.join(dirpath, name), f'{rel}/{name}')
        archive.writestr(f'__MACOSX/{rel}/._{name}', b'\x00\x05\x16\x07')
  return zip_path


def make_bloodmnist_npz(path: str, image_size: int = 28,
                        sizes=(24, 8, 8)) -> str:
  """A BloodMNIST-format npz: {train,val,test}_{images,labels}, labels (N, 1)."""
  arrays = {}
  for split, n, split_id in zip(('train', 'val', 'test'), sizes, range(3)):
    labels = (np.arange(n) % len(CLASS_NAMES)).astype(np.uint8)
    arrays[f'{split}_images'] = np.stack([
        synthetic.draw(np.random.default_rng([3, split_id, i]), int(l), image_size)
        for i, l in enumerate(labels)])
    arrays[f'{split}_labels'] = labels[:, None]
  np.savez_compressed(path, **arrays)
  return path
