"""The tf.data sources' modules, as ``config.data.source`` names them in ``spec.SOURCES``.

The registry is ``bcjax.data.spec.SOURCES`` (every source, ``packed`` too), so
a misspelt source is a one-line error listing the known names, and adding a
tf.data source never touches the pipeline: its module provides
``prepare(config) -> spec.DatasetInfo`` and
``raw_split(config, split) -> spec.RawSplit``.

The split ``'all'`` is not a source's split: it is every image of the
labelled PBC-layout folder (or zip) at ``config.data.path``, read directly,
to test a model on another lab's images whatever it was trained on.
"""

import importlib
from types import ModuleType

from bcjax import errors
from bcjax.data import folder
from bcjax.data import pbc_builder
from bcjax.data import spec


def source(config) -> ModuleType:
  """The module of ``config.data.source`` (a tf.data source)."""
  found = spec.source(config)
  if found.backend != 'pipeline':
    raise ValueError(f'{config.data.source!r} is not a tf.data source')
  return importlib.import_module(f'bcjax.data.{found.module}')


def prepare(config, *, print_summary: bool | None = None) -> spec.DatasetInfo:
  module = source(config)
  if module is pbc_builder:
    return pbc_builder.prepare(config, print_summary=print_summary)
  info = module.prepare(config)
  empty = [s for s in spec.SPLITS if info.split_sizes.get(s, 1) == 0]
  if empty:
    raise errors.UserError(
        f'{config.data.source}: the {empty[0]} split would be empty ({info.split_sizes}); '
        'raise config.data.synthetic_examples or change the fractions'
        if config.data.source == 'synthetic' else
        f'{config.data.source} at {config.data.path}: the {empty[0]} split is empty')
  if print_summary:
    sizes = ', '.join(f'{k} {v}' for k, v in info.split_sizes.items())
    print(f'{config.data.source}: {sizes} ({info.image_size} px)', flush=True)
  return info


def raw_split(config, split: str) -> spec.RawSplit:
  if split == 'all':
    return folder.raw_all(config)
  if split not in spec.SPLITS:
    raise errors.UserError(
        f"unknown split {split!r}; known: {', '.join(spec.SPLITS)}, all")
  return source(config).raw_split(config, split)
