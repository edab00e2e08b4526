"""Images per second the input pipeline delivers: first epoch and cached.

The first epoch reads the prepared PBC dataset and decodes every JPEG; later
epochs read decoded, resized uint8 images from the in-memory cache, and
the pipeline only shuffles and batches them (flips and rotations are the
train step's, bcjax/augment.py). Both numbers matter: the first bounds how
long epoch one takes, the cached one must stay well above what the
accelerator consumes. Run from the repo root::

    python benchmarks/input_pipeline.py \
        --path=../shared/data/PBC_dataset_normal_DIB --sizes=64,224

Prints one JSON object (machine-readable) and a table. The dataset is
prepared into ``--tfds_dir`` first if it is not there yet (not timed).
"""

import json
import os
import sys
import time

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bcjax import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position

_PATH = flags.DEFINE_string(
    'path', '../shared/data/PBC_dataset_normal_DIB', 'PBC folder or zip.')
_TFDS_DIR = flags.DEFINE_string(
    'tfds_dir', '~/tensorflow_datasets', 'Where the prepared dataset lives.')
_SIZES = flags.DEFINE_list('sizes', ['64', '224'], 'Image sizes to measure.')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'Global training batch.')
_EPOCHS = flags.DEFINE_integer('cached_epochs', 2, 'Cached epochs to time.')


def _time_epoch(config, epoch: int) -> tuple[float, int]:
  start = time.perf_counter()
  images = 0
  for batch in data.make_train_dataset(config, epoch=epoch, process_index=0,
                                       process_count=1, local_device_count=1):
    images += int(batch['label'].shape[0] * batch['label'].shape[1])
  return time.perf_counter() - start, images


def measure(image_size: int) -> dict:
  config = default.get_config()
  config.data.source = 'pbc'
  config.data.path = _PATH.value
  config.data.tfds_dir = _TFDS_DIR.value
  config.image_size = image_size
  config.batch_size = _BATCH.value
  data.prepare(config)
  data.clear_cache()
  first_s, n = _time_epoch(config, 0)
  cached = [_time_epoch(config, 1 + e) for e in range(_EPOCHS.value)]
  cached_s = sum(s for s, _ in cached)
  cached_n = sum(k for _, k in cached)
  data.clear_cache()
  return {'image_size': image_size, 'batch_size': config.batch_size,
          'images_per_epoch': n,
          'first_epoch_images_per_s': round(n / first_s, 1),
          'cached_images_per_s': round(cached_n / cached_s, 1),
          'first_epoch_s': round(first_s, 2)}


def main(argv):
  del argv
  results = [measure(int(size)) for size in _SIZES.value]
  print(json.dumps({'cpu_count': os.cpu_count(), 'results': results}))
  print(f'{"size":>5} {"first epoch img/s":>18} {"cached img/s":>13} '
        f'{"first epoch s":>14}')
  for r in results:
    print(f'{r["image_size"]:>5} {r["first_epoch_images_per_s"]:>18.0f} '
          f'{r["cached_images_per_s"]:>13.0f} {r["first_epoch_s"]:>14.1f}')


if __name__ == '__main__':
  app.run(main)
