"""Against the real PBC folder (../shared/data or $BCJAX_PBC_DIR); skipped without it.

The full dataset is prepared once per session into a temporary TFDS dir
(about 20 s on two cores); the checks then read file names and hashes, not
pixels.
"""

import collections
import hashlib

import pytest
import tensorflow_datasets as tfds

from bcjax import data
from bcjax.data import layout
from bcjax.data import pbc_builder
from bcjax.data import splits
from configs import default

pytestmark = pytest.mark.real_data


@pytest.fixture(scope='session')
def real(pbc_dir, tmp_path_factory):
  config = default.get_config()
  config.data.source = 'pbc'
  config.data.path = str(pbc_dir)
  config.data.tfds_dir = str(tmp_path_factory.mktemp('tfds_real'))
  config.image_size = 32
  info = data.prepare(config)
  builder = pbc_builder.builder(config)
  rows = {}
  for split in ('train', 'validation', 'test'):
    ds = builder.as_dataset(split=split, decoders={'image': tfds.decode.SkipDecoding()})
    rows[split] = [(ex['file_name'].decode(), int(ex['label']), ex['sha256'].decode())
                   for ex in tfds.as_numpy(ds.map(
                       lambda ex: {k: ex[k] for k in ('file_name', 'label', 'sha256')}))]
  return config, info, rows


def test_split_sizes_are_70_15_15_per_class(real):
  _, info, rows = real
  assert info.split_sizes['all'] == 10279  # 10,280 files, one is not an image.
  for split in rows:
    assert len(rows[split]) == info.split_sizes[split]
  per_class = {s: collections.Counter(l for _, l, _ in rows[s]) for s in rows}
  for label in range(8):
    n = sum(per_class[s][label] for s in rows)
    assert abs(per_class['train'][label] - 0.70 * n) <= 1
    assert abs(per_class['validation'][label] - 0.15 * n) <= 1


def test_split_is_the_hash_split_of_the_files(real):
  """Recomputed from the raw bytes alone: the same on every machine and run."""
  config, _, rows = real
  listing = layout.list_files(layout.locate(config.data.path))
  stored = {name: (label, digest, split)
            for split in rows for name, label, digest in rows[split]}
  names, labels, digests = [], [], []
  for entry in listing.entries:
    if entry.file_name not in stored:
      continue  # The file that is not an image.
    with open(entry.member, 'rb') as f:
      digests.append(hashlib.sha256(f.read()).hexdigest())
    names.append(entry.file_name)
    labels.append(entry.label)
  assert len(names) == len(stored)
  assignment = splits.assign(names, labels, digests, seed=config.data.seed,
                             train_fraction=0.7, val_fraction=0.15)
  for name, digest, split in zip(names, digests, assignment):
    assert stored[name][1] == digest
    assert stored[name][2] == split


def test_duplicates_fall_in_one_split(real):
  _, _, rows = real
  where = collections.defaultdict(set)
  for split in rows:
    for _, _, digest in rows[split]:
      where[digest].add(split)
  counts = collections.Counter(d for split in rows for _, _, d in rows[split])
  duplicated = [d for d, c in counts.items() if c > 1]
  assert duplicated  # The real folder has some.
  assert all(len(where[d]) == 1 for d in duplicated)


def test_training_batches_from_the_real_data(real):
  config, info, _ = real
  config = config.copy_and_resolve_references()
  config.batch_size = 64
  batch = next(data.make_eval_dataset(config, 'test', local_device_count=1,
                                      batch_size=64).as_numpy_iterator())
  assert batch['image'].shape == (1, 64, 32, 32, 3)
  assert batch['mask'].all()
  assert all(name.decode().split('/')[0] == data.CLASS_NAMES[label]
             for name, label in zip(batch['file_name'][0], batch['label'][0]))
