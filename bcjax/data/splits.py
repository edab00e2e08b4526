"""The paper's 70/15/15 split, stratified by class, with duplicates kept together.

The split must be the same on every machine and every run, survive a user
adding files, and never put two copies of one image (the full PBC has a few
byte-identical files, one of them in two class folders) on both sides of
the train/test line, which would leak test images into training::

    assignment = splits.assign(file_names, labels, digests, seed=42,
                               train_fraction=0.7, val_fraction=0.15)
    # ['train', 'test', 'train', 'validation', ...], one per file

Files are grouped by the SHA-256 of their bytes; a group belongs to the class
of its first file name. Within a class the groups are ordered by
``sha256(f'{seed}/{digest}')``, a pure function of the seed and the content
that needs no random-number generator (whose streams may change between
library versions) and does not depend on the order files were listed in.
Walking that order, a group goes to train while fewer than
``round(train_fraction * n)`` of the class's images are placed, then to
validation up to ``round((train_fraction + val_fraction) * n)``, then test.
"""

import collections
import hashlib
from collections.abc import Sequence

from bcjax import config_checks
from bcjax import errors
from bcjax.data.spec import CLASS_NAMES, SPLITS


def check_fractions(train_fraction: float, val_fraction: float) -> None:
  """Raises a UserError unless every split gets a share (bcjax/config_checks.py)."""
  config_checks.check_fractions(train_fraction, val_fraction)


def check_not_empty(assignment: Sequence[str], labels: Sequence[int], *,
                    train_fraction: float, val_fraction: float) -> None:
  """A UserError, before anything is built, when a split would get no image.

  Small folders do this: a class of two images cannot be split 70/15/15, and
  TFDS would stop on an empty split deep inside its writer.
  """
  for split in SPLITS:
    if split not in assignment:
      per_class = collections.Counter(labels)
      fewest = ', '.join(f'{CLASS_NAMES[l]} {n}' for l, n in sorted(
          per_class.items(), key=lambda item: item[1])[:3])
      raise errors.UserError(
          f'the {split} split would be empty: {len(labels)} images (fewest per class: '
          f'{fewest}) split {train_fraction:g}/{val_fraction:g}/'
          f'{1 - train_fraction - val_fraction:g}; add images or change '
          'config.data.train_fraction / val_fraction')


def _round_half_up(x: float) -> int:
  return int(x + 0.5)


def assign(file_names: Sequence[str], labels: Sequence[int],
           digests: Sequence[str], *, seed: int, train_fraction: float,
           val_fraction: float) -> list[str]:
  """The split of each file (see the module docstring).

  Args:
    file_names: Unique names, used to pick a duplicate group's class.
    labels: Class of each file.
    digests: Hex SHA-256 of each file's bytes.
    seed: ``config.data.seed``.
    train_fraction: Share of each class's images in train.
    val_fraction: Share in validation; test gets the rest.

  Returns:
    ``'train'``, ``'validation'`` or ``'test'`` for each file, in input order.
  """
  check_fractions(train_fraction, val_fraction)
  groups = collections.defaultdict(list)
  for i, digest in enumerate(digests):
    groups[digest].append(i)
  by_class = collections.defaultdict(list)
  for digest, members in groups.items():
    first = min(members, key=lambda i: file_names[i])
    by_class[labels[first]].append(digest)

  result = [''] * len(file_names)
  for label in sorted(by_class):
    order = sorted(by_class[label], key=lambda d: hashlib.sha256(
        f'{seed}/{d}'.encode()).hexdigest())
    total = sum(len(groups[d]) for d in order)
    cut_train = _round_half_up(train_fraction * total)
    cut_val = _round_half_up((train_fraction + val_fraction) * total)
    placed = 0
    for digest in order:
      split = ('train' if placed < cut_train else
               'validation' if placed < cut_val else 'test')
      for i in groups[digest]:
        result[i] = split
      placed += len(groups[digest])
  check_not_empty(result, labels, train_fraction=train_fraction, val_fraction=val_fraction)
  return result


def duplicate_groups(file_names: Sequence[str],
                     digests: Sequence[str]) -> list[list[str]]:
  """File names sharing identical bytes, each group sorted, groups sorted."""
  groups = collections.defaultdict(list)
  for name, digest in zip(file_names, digests):
    groups[digest].append(name)
  return sorted(sorted(g) for g in groups.values() if len(g) > 1)
