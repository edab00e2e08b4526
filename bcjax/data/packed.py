"""Packed splits: the pipeline's images in one file, and the NumPy streamer that reads it.

The reference input streamer is tf.data (bcjax/data/pipeline.py); this is the
other one behind ``bcjax.data`` (``config.data.source='packed'``). Some accelerator hosts
cannot install TensorFlow: a prebuilt CUDA image without it and no network,
or a disk quota that a 600 MB wheel breaks. For those, pack the splits where
TensorFlow runs and train on the packed file where it does not::

    # here (TensorFlow): decode + resize with the pipeline's own ops, then pack
    python launch.py --config configs/cnn_lstm.py --mode=pack --out pbc224.npz \
        --config.data.path=../shared/data/PBC_dataset_normal_DIB --pack_splits=train,validation
    # there (NumPy + Pillow only)
    python launch.py --config configs/cnn_lstm.py --workdir runs/cnn_lstm \
        --config.data.source=packed --config.data.path=pbc224.npz

What the file holds: each split's images after the pipeline's decode and
antialiased resize to ``config.image_size`` (uint8), each re-encoded as WebP
(``--pack_quality``, 0 = lossless) so the file stays small (its size and mean
absolute pixel error are printed by the packing; PBC's are in
docs/data.md), with labels, file names and class names. No pickles.

Reading it (this module, through ``bcjax.data``) follows the pipeline's contract
and its geometry (bcjax/data/spec.py): the training order is a pure function
of ``(config.seed, epoch)``, and training batches are the uint8 pixels, which
the train step flips, rotates and scales (bcjax/augment.py) as on every input
path; evaluation pads with masked examples; every process reads a disjoint
shard. The order is a NumPy permutation, not tf.data's shuffle: a run on
packed data matches a tf.data run in distribution, not bit for bit. A split
left out of the file is skipped (a run packed without ``test`` ends after
training; evaluate the workdir with ``--mode=eval`` on the original images).
"""

import collections
import concurrent.futures
import hashlib
import io
import json
import os
import sys
import zipfile
import zlib

import numpy as np
import tqdm
from PIL import Image

from bcjax import files
from bcjax.data import resident, spec
from bcjax.data.spec import Batches
from bcjax.errors import UserError

FORMAT_VERSION = 1
_decoded: collections.OrderedDict = collections.OrderedDict()


# --------------------------------------------------------------------------
# Writing (where TensorFlow runs)


def _encode(image: np.ndarray, quality: int) -> bytes:
  out = io.BytesIO()
  if quality:
    Image.fromarray(image).save(out, 'WEBP', quality=quality, method=4)
  else:
    Image.fromarray(image).save(out, 'WEBP', lossless=True)
  return out.getvalue()


def pack(config, out_path: str, *, splits=('train', 'validation', 'test'),
         quality: int = 80) -> tuple[dict[str, int], float]:
  """Packs ``splits`` of ``config.data`` at ``config.image_size`` into ``out_path``.

  Returns examples per split and the coding's mean absolute pixel error (in
  0-255 units, every image decoded back; 0.0 when lossless). Pixels come from
  the tf.data pipeline's cached split (decode, RGB, antialiased resize), so
  packed and unpacked runs see the same images up to the WebP coding.
  """
  if not out_path.endswith('.npz'):
    raise UserError(f'--out={out_path} must end in .npz')
  if not 0 <= quality <= 100:
    raise UserError(f'--pack_quality={quality} must be 0 (lossless) to 100')
  files.check_output_file(out_path, '--out', kind='.npz file',
                          inputs=[os.path.expanduser(config.data.path)] if config.data.path else [])
  files.check_writable(os.path.dirname(os.path.abspath(out_path)), '--out')
  from bcjax.data import pipeline  # pylint: disable=g-import-not-at-top  (TensorFlow: import late)
  info = pipeline.prepare(config)
  unknown = set(splits) - set(info.split_sizes)
  if unknown:
    raise UserError(f'cannot pack {sorted(unknown)}; {config.data.source} has splits '
                    f'{", ".join(info.split_sizes)}')
  arrays = {'format_version': np.array(FORMAT_VERSION),
            'class_names': np.array(info.class_names),
            'image_size': np.array(config.image_size),
            'provenance': np.array(json.dumps({
                'source': config.data.source, 'path': config.data.path,
                'split_seed': config.data.seed, 'webp_quality': quality or 'lossless'}))}
  sizes = {}
  error_sum, pixels = 0.0, 0
  for split in splits:
    cached, total = pipeline.cached_split(config, split, process_index=0, process_count=1)
    blobs, labels, names = [], [], []
    for example in tqdm.tqdm(cached.as_numpy_iterator(), total=total, desc=f'pack {split}',
                             unit='img', leave=False, mininterval=1.0, file=sys.stderr):
      blobs.append(_encode(example['image'], quality))
      error_sum += np.abs(_decode_one(blobs[-1]).astype(np.int16) - example['image']).sum()
      pixels += example['image'].size
      labels.append(example['label'])
      names.append(example['file_name'].decode('utf-8'))
    if len(blobs) != total:
      raise RuntimeError(f'{split}: read {len(blobs)} examples, expected {total}')
    _add_split(arrays, split, blobs, labels, names)
    sizes[split] = total
  mean_abs_error = error_sum / max(pixels, 1)
  provenance = json.loads(str(arrays['provenance']))
  arrays['provenance'] = np.array(json.dumps(dict(provenance, mean_abs_error=mean_abs_error)))
  with files.atomic_write(out_path, 'wb') as f:  # A killed pack leaves no half .npz.
    np.savez(f, **arrays)
  return sizes, mean_abs_error


def _add_split(arrays: dict, split: str, blobs, labels, names) -> None:
  arrays[f'{split}.bytes'] = np.frombuffer(b''.join(blobs), np.uint8)
  arrays[f'{split}.offsets'] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
  arrays[f'{split}.labels'] = np.asarray(labels, np.int32)
  arrays[f'{split}.file_names'] = np.asarray(names, dtype=str)


def write_arrays(out_path: str, splits: dict[str, tuple[np.ndarray, np.ndarray]],
                 class_names, *, provenance: dict) -> None:
  """Packs uint8 ``(images [n, S, S, 3], labels [n])`` per split, losslessly, without TensorFlow.

  For pixels that exist only as arrays (benchmarks/gpu_check.py's tiny
  synthetic file); ``pack`` is the way from a real source.
  """
  image_size = next(iter(splits.values()))[0].shape[1]
  arrays = {'format_version': np.array(FORMAT_VERSION),
            'class_names': np.array(list(class_names)),
            'image_size': np.array(image_size),
            'provenance': np.array(json.dumps(dict(provenance, webp_quality='lossless')))}
  for split, (images, labels) in splits.items():
    _add_split(arrays, split, [_encode(im, 0) for im in images], labels,
               [f'{split}_{i}.png' for i in range(len(labels))])
  with files.atomic_write(out_path, 'wb') as f:
    np.savez(f, **arrays)


# --------------------------------------------------------------------------
# Reading (NumPy and Pillow only)


def _open(path: str):
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise UserError(f'packed data file not found: {path} (config.data.path; make one with '
                    '--mode=pack)')
  try:
    f = np.load(path, allow_pickle=False)
  except zipfile.BadZipFile as e:  # A cut file: the zip's directory at its end is gone.
    raise UserError(_damaged(path, e)) from None
  except (OSError, ValueError) as e:
    raise UserError(f'{path} is not a packed data file: {e}') from None
  if 'format_version' not in f or int(_array(f, 'format_version', path)) != FORMAT_VERSION:
    raise UserError(f'{path} is not a bcjax packed file of format {FORMAT_VERSION}')
  return f


_DAMAGE = (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError)


def _damaged(path: str, error: BaseException) -> str:
  reason = str(error).strip().splitlines()[0][:100] if str(error).strip() else type(
      error).__name__
  return (f'{path} is damaged ({reason}); pack it again with --mode=pack, or restore it '
          'from a copy')


def _array(f, key: str, path: str) -> np.ndarray:
  """``f[key]``, or a UserError naming the file when its bytes do not read back."""
  try:
    return f[key]
  except _DAMAGE as e:
    raise UserError(_damaged(path, e)) from None


def prepare(config, *, print_summary: bool | None = None) -> spec.DatasetInfo:
  """Reads the packed file's header and checks it fits ``config``."""
  f = _open(config.data.path)
  size = int(_array(f, 'image_size', config.data.path))
  if size != config.image_size:
    raise UserError(f'{config.data.path} was packed at {size} px but config.image_size='
                    f'{config.image_size}; pack again or set --config.image_size={size}')
  sizes = {k[:-len('.labels')]: len(_array(f, k, config.data.path))
           for k in f.files if k.endswith('.labels')}
  info = spec.DatasetInfo(tuple(str(c) for c in _array(f, 'class_names', config.data.path)),
                          sizes, size)
  if print_summary:
    provenance = json.loads(str(_array(f, 'provenance', config.data.path)))
    print(f"{config.data.path}: {sizes} at {size} px; {provenance}")
  return info


def fingerprint(config) -> dict:
  """The file and a hash of what it holds: class names, and per split its labels,
  file names and each image's encoded length (cheap: no image is decoded)."""
  f = _open(config.data.path)
  digest = hashlib.sha256()
  for key in sorted(k for k in f.files if k == 'class_names' or k.endswith(
      ('.labels', '.file_names', '.offsets'))):
    digest.update(key.encode())
    digest.update(np.ascontiguousarray(_array(f, key, config.data.path)).tobytes())
  return {'path': os.path.abspath(os.path.expanduser(config.data.path)),
          'content': digest.hexdigest()[:16]}


def clear_cache() -> None:
  """Forgets the decoded splits."""
  _decoded.clear()


def _decode_one(blob: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(blob)) as image:
    return np.asarray(image.convert('RGB'))


def _split(config, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Decoded ``(images uint8 [N, S, S, 3], labels, file_names)``, memoised per file."""
  path = os.path.abspath(os.path.expanduser(config.data.path))
  key = (path, os.path.getmtime(path) if os.path.exists(path) else None, split)
  if key not in _decoded:
    f = _open(config.data.path)
    if f'{split}.labels' not in f:
      raise UserError(f'{config.data.path} holds no {split!r} split')
    data = _array(f, f'{split}.bytes', config.data.path)
    offsets = _array(f, f'{split}.offsets', config.data.path)
    blobs = [data[a:b].tobytes() for a, b in zip(offsets[:-1], offsets[1:])]
    try:
      with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        images = np.stack(list(pool.map(_decode_one, blobs, chunksize=64)))
    except (OSError, ValueError) as e:
      raise UserError(f'{config.data.path}: an image of {split!r} does not decode ({e}); '
                      'pack the file again') from None
    _decoded[key] = (images, _array(f, f'{split}.labels', config.data.path),
                     _array(f, f'{split}.file_names', config.data.path))
    while len(_decoded) > 3:
      _decoded.popitem(last=False)
  return _decoded[key]


def split_size(config, split: str, *, process_index: int, process_count: int) -> int:
  del process_index, process_count  # The file holds whole splits.
  return len(_split(config, split)[1])


def train_pixels(config, *, process_index: int,
                 process_count: int) -> tuple[np.ndarray, np.ndarray]:
  """This process's shard of the train split: decoded uint8 images and labels."""
  images, labels, _ = _split(config, 'train')
  if process_count == 1:
    return images, labels
  return images[process_index::process_count], labels[process_index::process_count]


def make_train_dataset(config, *, epoch: int, process_index: int, process_count: int,
                       local_device_count: int) -> Batches:
  """One epoch of shuffled ``{'image': uint8, 'label'}`` batches for this process.

  Same shapes and guarantees as the tf.data streamer: every process yields
  ``spec.train_steps`` batches from its own shard, unaugmented (the step augments).
  """
  pi, pc, devices = process_index, process_count, local_device_count
  per_process, per_device = spec.batch_geometry(config.batch_size, pc, devices,
                                                'config.batch_size')

  def batches(start):
    images, labels, _ = _split(config, 'train')
    steps = spec.train_steps(len(labels), config.batch_size)
    mine = np.arange(pi, len(labels), pc)
    order = mine[resident.epoch_order(config, len(mine), epoch)]  # The device path's too.
    for s in range(start, steps):
      index = order[s * per_process:(s + 1) * per_process]
      yield {'image': images[index].reshape(devices, per_device, *images.shape[1:]),
             'label': labels[index].reshape(devices, per_device)}

  return Batches(batches)


def make_eval_dataset(config, split: str, *, batch_size: int, process_index: int,
                      process_count: int, local_device_count: int) -> Batches:
  """Every example of ``split`` once across processes, padded with ``mask`` False."""
  pi, pc, devices = process_index, process_count, local_device_count
  per_process, per_device = spec.batch_geometry(batch_size, pc, devices, 'eval batch size')

  def batches(start):
    images, labels, names = _split(config, split)
    mine = np.arange(pi, len(labels), pc)
    num_batches, _ = spec.eval_padding(len(labels), per_process, pi, pc)

    def chunks():
      for b in range(start, num_batches):
        index = mine[b * per_process:(b + 1) * per_process]
        yield {'image': images[index], 'label': labels[index],
               'file_name': [n.encode('utf-8') for n in names[index]]}

    return spec.eval_batches(chunks(), num_batches - start, per_process=per_process,
                             local_device_count=devices, per_device=per_device,
                             image_shape=images.shape[1:])

  return Batches(batches)
