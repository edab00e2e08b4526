"""The tf.data sources' readers, by ``config.data.source`` name: ``READERS``.

``bcjax.data.spec.SOURCES`` names every source (``packed`` too) and says
which streamer batches it, so a misspelt source is a one-line error listing
the known names; ``bcjax.data`` picks the streamer from it, and this table
gives the tf.data streamer its reader. Adding a tf.data source never touches
the pipeline: its module provides ``prepare(config) -> spec.DatasetInfo``
and ``raw_split(config, split) -> spec.RawSplit``, and gets a row here and
in ``spec.SOURCES``.

The split ``'all'`` is not a source's split: it is every image of the
labelled PBC-layout folder (or zip) at ``config.data.path``, read directly,
to test a model on another lab's images whatever it was trained on.
"""

from types import ModuleType

from bcjax import errors
from bcjax.data import bloodmnist
from bcjax.data import folder
from bcjax.data import pbc_builder
from bcjax.data import spec
from bcjax.data import synthetic

READERS: dict[str, ModuleType] = {
    'pbc': pbc_builder,
    'bloodmnist': bloodmnist,
    'synthetic': synthetic,
}


def reader(config) -> ModuleType:
  """The reader of ``config.data.source`` (a tf.data source)."""
  if not spec.source(config).tf_data:
    raise ValueError(f'{config.data.source!r} is not a tf.data source')
  return READERS[config.data.source]


def fingerprint(config) -> dict:
  """What the reader knows of its data's content (nothing for a source drawn from the config)."""
  module = reader(config)
  return module.fingerprint(config) if hasattr(module, 'fingerprint') else {}


def prepare(config, *, print_summary: bool | None = None) -> spec.DatasetInfo:
  module = reader(config)
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
  return reader(config).raw_split(config, split)
