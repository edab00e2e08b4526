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

from bcjax import errors

SPLITS = ('train', 'validation', 'test')


def check_fractions(train_fraction: float, val_fraction: float) -> None:
  """Raises a UserError unless 0 < train, 0 <= val and train + val < 1."""
  if not (0 < train_fraction < 1 and 0 <= val_fraction
          and train_fraction + val_fraction < 1):
    raise errors.UserError(
        f'config.data.train_fraction={train_fraction} and val_fraction='
        f'{val_fraction} must be positive and leave a test split '
        '(train + val < 1)')


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
  return result


def duplicate_groups(file_names: Sequence[str],
                     digests: Sequence[str]) -> list[list[str]]:
  """File names sharing identical bytes, each group sorted, groups sorted."""
  groups = collections.defaultdict(list)
  for name, digest in zip(file_names, digests):
    groups[digest].append(name)
  return sorted(sorted(g) for g in groups.values() if len(g) > 1)
