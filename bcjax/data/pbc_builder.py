"""PBC (Acevedo et al., Data in Brief 2020) as a TensorFlow Datasets builder.

Dataset: 17,092 JPEGs of normal peripheral blood cells in eight class
folders, doi:10.17632/snkd93bnjr.1, CC BY 4.0. The builder reads whichever
it is given: ``config.data.path`` (the extracted ``PBC_dataset_normal_DIB``
folder, its parent, or the zip as downloaded), else the same in TFDS's manual
dir (``<tfds_dir>/downloads/manual``), else it downloads the zip with TFDS's
download manager::

    info = pbc_builder.prepare(config)   # builds once, prints the summary
    raw = pbc_builder.raw_split(config, 'train')

What is stored: each image's bytes (the original JPEG when it is a valid RGB
JPEG, otherwise a lossless 8-bit RGB PNG), its label and its file name
(``<class>/<file>``, so every prediction traces back to a file), plus the
SHA-256 of the original bytes. Pixels are not stored: the prepared dataset
depends only on the source files, the split seed and the fractions, so a new
``image_size`` reuses it. Its TFDS config name encodes exactly those
(``<fingerprint>-seed42-train0.7-val0.15``), so a different folder or seed
gets its own dataset instead of silently reusing a stale one. The build's
account (images per class and split, skipped files with reasons, duplicates)
is kept in the dataset's metadata and printed after the first build.
"""

import contextlib
import dataclasses
import os
import socket
import urllib.parse
import urllib.request

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import tensorflow_datasets as tfds

from bcjax import errors
from bcjax.data import layout
from bcjax.data import spec
from bcjax.data import splits

DOWNLOAD_URL = ('https://data.mendeley.com/public-files/datasets/snkd93bnjr/'
                'files/2fc38728-2ae7-4a62-a857-032af82334c3/file_downloaded')
ZIP_NAME = layout.ROOT_NAME + '.zip'
_CITATION = """@article{acevedo2020dataset,
  title={A dataset of microscopic peripheral blood cell images for development
         of automatic recognition systems},
  author={Acevedo, Andrea and Merino, Anna and Alf{\\'e}rez, Santiago and
          Molina, {\\'A}ngel and Bold{\\'u}, Laura and Rodellar, Jos{\\'e}},
  journal={Data in Brief}, volume={30}, pages={105474}, year={2020},
  doi={10.1016/j.dib.2020.105474}}"""


@dataclasses.dataclass
class PbcConfig(tfds.core.BuilderConfig):
  """Where the files come from and how they are split.

  Attributes:
    source: Folder or zip to read; '' downloads the zip.
    split_seed: ``config.data.seed``.
    train_fraction: ``config.data.train_fraction``.
    val_fraction: ``config.data.val_fraction``.
  """
  source: str = ''
  split_seed: int = 42
  train_fraction: float = 0.70
  val_fraction: float = 0.15


class Pbc(tfds.core.GeneratorBasedBuilder):
  """The PBC dataset, split 70/15/15 by class with duplicates kept together."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  Download {ZIP_NAME} from https://data.mendeley.com/datasets/snkd93bnjr/1
  and put it (or the extracted {layout.ROOT_NAME} folder) in the manual dir,
  or pass --config.data.path=<folder or zip>.
  """

  # TFDS 4.9.10 finds a builder's file through the `importlib_resources`
  # backport, which it only installs on Python < 3.9; naming the file here
  # sidesteps that lookup (and keeps TFDS from searching for checksums).
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description='Normal peripheral blood cells, 8 classes (CellaVision '
                    'DM96, Hospital Clinic of Barcelona).',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3)),
            'label': tfds.features.ClassLabel(names=spec.CLASS_NAMES),
            'file_name': tfds.features.Text(),
            'sha256': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://data.mendeley.com/datasets/snkd93bnjr/1',
        citation=_CITATION,
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    source = cfg.source
    if not source:
      print(f'downloading {DOWNLOAD_URL}', flush=True)
      try:
        source = os.fspath(dl_manager.download(DOWNLOAD_URL))
      except Exception as e:  # pylint: disable=broad-except
        raise errors.UserError(_not_found_message(
            getattr(dl_manager, '_manual_dir', None), e)) from None
    scan = layout.read(layout.list_files(layout.locate(source)))
    records = scan.records
    names = [r.file_name for r in records]
    digests = [r.sha256 for r in records]
    assignment = splits.assign(
        names, [r.label for r in records], digests, seed=cfg.split_seed,
        train_fraction=cfg.train_fraction, val_fraction=cfg.val_fraction)
    counts = {s: [0] * len(spec.CLASS_NAMES) for s in spec.SPLITS}
    for record, split in zip(records, assignment):
      counts[split][record.label] += 1
    self.info.metadata.update({
        'source': scan.location.describe(),
        'class_counts': counts,
        'skipped': [list(item) for item in scan.skipped],
        'macos_metadata_ignored': scan.metadata_ignored,
        'duplicate_groups': splits.duplicate_groups(names, digests),
    })
    return {
        split: self._generate_examples(
            [r for r, s in zip(records, assignment) if s == split])
        for split in spec.SPLITS
    }

  def _generate_examples(self, records):
    for r in records:
      yield r.file_name, {'image': r.data, 'label': r.label,
                          'file_name': r.file_name, 'sha256': r.sha256}


def manual_dir(config) -> str:
  return os.path.join(os.path.expanduser(config.data.tfds_dir), 'downloads',
                      'manual')


def _unreachable(url: str, timeout: float = 10.0) -> str | None:
  """Why ``url``'s server (or proxy) cannot be reached, or None if it can.

  TFDS retries a failed download ten times with back-off (minutes); without
  a network one connection attempt settles it in seconds.
  """
  parts = urllib.parse.urlsplit(url)
  host, port = parts.hostname, parts.port or (443 if parts.scheme == 'https' else 80)
  proxy = urllib.request.getproxies().get(parts.scheme)
  if proxy and not urllib.request.proxy_bypass(host):
    proxy_parts = urllib.parse.urlsplit(proxy if '://' in proxy else f'//{proxy}')
    host, port = proxy_parts.hostname, proxy_parts.port or 80
  try:
    socket.create_connection((host, port), timeout=timeout).close()
  except OSError as e:
    return f'cannot connect to {host}:{port}: {e.strerror or e}'
  return None


def _not_found_message(where, error) -> str:
  reason = str(error).strip().splitlines()[0] if str(error).strip() else type(
      error).__name__
  where = where or '<tfds_dir>/downloads/manual'
  return (f'PBC data not found: pass --config.data.path=<{layout.ROOT_NAME} '
          f'folder or {ZIP_NAME}>, or put either in {where} (download of '
          f'{DOWNLOAD_URL} failed: {reason[:200]})')


def _find_source(config) -> str:
  """``config.data.path``, else PBC in the manual dir, else '' (download)."""
  if config.data.path:
    return os.path.abspath(os.path.expanduser(config.data.path))
  manual = manual_dir(config)
  for candidate in (os.path.join(manual, layout.ROOT_NAME),
                    os.path.join(manual, ZIP_NAME)):
    if os.path.exists(candidate):
      return candidate
  return ''


def _fraction_name(x: float) -> str:
  return f'{x:g}'.replace('.', 'p')


_builders: dict[tuple, Pbc] = {}


@contextlib.contextmanager
def _quiet_tfds():
  """Hides TFDS's INFO/WARNING logs and progress bars; bcjax says what matters."""
  verbosity = logging.get_verbosity()
  bars = getattr(tfds.core.utils.tqdm_utils, '_active', True)
  logging.set_verbosity(logging.ERROR)
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    logging.set_verbosity(verbosity)
    tfds.display_progress_bar(bars)


def builder(config) -> Pbc:
  """The builder for ``config`` (memoised; listing the files is cheap)."""
  splits.check_fractions(config.data.train_fraction, config.data.val_fraction)
  source = _find_source(config)
  fingerprint = (layout.list_files(layout.locate(source)).fingerprint()[:12]
                 if source else 'download')
  name = (f'{fingerprint}-seed{config.data.seed}-train'
          f'{_fraction_name(config.data.train_fraction)}-val'
          f'{_fraction_name(config.data.val_fraction)}')
  data_dir = os.path.expanduser(config.data.tfds_dir)
  key = (name, data_dir, source)
  if key not in _builders:
    with _quiet_tfds():
      _builders[key] = Pbc(
          config=PbcConfig(
              name=name, source=source, split_seed=config.data.seed,
              train_fraction=config.data.train_fraction,
              val_fraction=config.data.val_fraction,
              description=f'PBC from {source or DOWNLOAD_URL}'),
          data_dir=data_dir)
  return _builders[key]


def fingerprint(config) -> dict:
  """What the prepared dataset is made of, from the listing alone (nothing is read or built).

  The number of files and the hash of their names and sizes (the one in the
  dataset's name): an image added, removed or replaced changes it, and with
  it the splits, so a resume can refuse before building anything.
  """
  source = _find_source(config)
  if not source:
    return {'path': DOWNLOAD_URL}
  listing = layout.list_files(layout.locate(source))
  return {'path': source, 'files': len(listing.entries),
          'content': listing.fingerprint()[:16]}


def summary(pbc: Pbc) -> str:
  """The prepared dataset's account: counts per class and split, skips."""
  meta = pbc.info.metadata
  counts = meta['class_counts']
  cfg = pbc.builder_config
  lines = [f'PBC prepared in {pbc.data_dir}',
           f'  from {meta["source"]}; split seed {cfg.split_seed}, fractions '
           f'{cfg.train_fraction:g}/{cfg.val_fraction:g}/'
           f'{1 - cfg.train_fraction - cfg.val_fraction:g}',
           f'  {"class":<14}' + ''.join(f'{s:>12}' for s in spec.SPLITS)
           + f'{"total":>8}']
  for i, name in enumerate(spec.CLASS_NAMES):
    row = [counts[s][i] for s in spec.SPLITS]
    lines.append(f'  {name:<14}' + ''.join(f'{n:>12}' for n in row)
                 + f'{sum(row):>8}')
  totals = [sum(counts[s]) for s in spec.SPLITS]
  lines.append(f'  {"total":<14}' + ''.join(f'{n:>12}' for n in totals)
               + f'{sum(totals):>8}')
  skipped = meta['skipped']
  lines.append(f'  skipped {len(skipped)} file(s)' + (':' if skipped else ''))
  lines += [f'    {name}: {reason}' for name, reason in skipped]
  if meta['macos_metadata_ignored']:
    lines.append(f'  ignored {meta["macos_metadata_ignored"]} macOS metadata '
                 'entries (__MACOSX/, ._*, .DS_Store)')
  groups = meta['duplicate_groups']
  if groups:
    lines.append(f'  {len(groups)} group(s) of identical files, each kept in '
                 'one split:')
    lines += [f'    {", ".join(g)}' + (
        ' (different labels)' if len({n.split('/')[0] for n in g}) > 1 else '')
              for g in groups]
  return '\n'.join(lines)


@contextlib.contextmanager
def _build_lock(pbc: Pbc, root: str):
  """One builder per dataset at a time: two processes preparing the same folder at once.

  The second waits on an exclusive ``flock`` beside the dataset (released by
  the kernel if the holder dies, so a killed build never blocks the next),
  then finds the first's result and reuses it. TFDS itself writes into a
  temporary folder and renames it, so what it finds is complete.
  """
  try:
    import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only)
  except ImportError:
    yield
    return
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, f'.bcjax-pbc-{pbc.builder_config.name}.lock'), 'a') as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      print(f'waiting for another process preparing {pbc.builder_config.name} in {root}',
            flush=True)
      fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _fresh(pbc: Pbc, root: str) -> Pbc:
  """A new builder for ``pbc``'s dataset: it reads the metadata another process wrote."""
  for key, value in list(_builders.items()):
    if value is pbc:
      del _builders[key]
  with _quiet_tfds():
    return Pbc(config=pbc.builder_config, data_dir=root)


def _build(config, pbc: Pbc) -> bool:
  """Builds ``pbc`` unless it is already there; returns whether it built.

  A memoised builder made before another process finished the same dataset
  read an empty folder, so its info has no splits: it is dropped here, and
  ``builder(config)`` then reads the finished dataset's metadata.
  """
  root = os.path.expanduser(config.data.tfds_dir)
  with _quiet_tfds():
    if pbc.is_prepared():
      if not pbc.info.splits:  # Prepared by another process after this builder was made.
        _fresh(pbc, root)
      return False
  with _build_lock(pbc, root):
    with _quiet_tfds():
      if _fresh(pbc, root).is_prepared():  # Another process built it while this one waited.
        return False
    return _build_unlocked(config, pbc)


def _build_unlocked(config, pbc: Pbc) -> bool:
  if not pbc.builder_config.source:
    unreachable = _unreachable(DOWNLOAD_URL)
    if unreachable:
      raise errors.UserError(_not_found_message(manual_dir(config), unreachable))
  print(f'preparing PBC from {pbc.builder_config.source or DOWNLOAD_URL} '
        f'into {pbc.data_dir} (every image is decoded once to check it)',
        flush=True)
  with _quiet_tfds():
    pbc.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir(config)))
  return True


_RECORD_FRAMING = 16  # Bytes TFRecord adds around each example: length, two CRCs.


def check_files(pbc: Pbc) -> None:
  """A UserError naming the prepared dataset's folder when a shard file is missing or cut.

  TFDS records each split's serialised bytes and examples, so every shard
  file's expected size is known: a truncated file (a full disk while
  copying, an interrupted rsync) is told from a stat before any epoch, not
  as a ``DataLossError`` in the middle of one.
  """
  for name, split in pbc.info.splits.items():
    expected = int(split.num_bytes) + _RECORD_FRAMING * int(split.num_examples)
    found = 0
    for path in split.filepaths:
      try:
        found += os.path.getsize(os.fspath(path))
      except OSError:
        raise errors.UserError(damaged_message(
            pbc, f'{os.path.basename(os.fspath(path))} is missing')) from None
    if found != expected:
      raise errors.UserError(damaged_message(
          pbc, f'the {name} split\'s files hold {found:,} bytes, {expected:,} expected'))


def damaged_message(pbc: Pbc, reason: str) -> str:
  """The one line for a damaged prepared dataset: which folder to delete."""
  return (f'the prepared dataset {pbc.data_dir} is damaged ({reason}); delete that folder '
          f'and rerun: it is prepared again from {pbc.builder_config.source or DOWNLOAD_URL}')


def prepare(config, *, print_summary: bool | None = None) -> spec.DatasetInfo:
  """Builds PBC into ``config.data.tfds_dir`` unless already there.

  Args:
    config: The experiment config.
    print_summary: Print the split summary; by default only after a build.
  """
  pbc = builder(config)
  if jax.process_count() > 1:
    # Process 0 builds first; the others then find it on a shared tfds_dir,
    # or build their own copy when tfds_dir is a local disk.
    built = jax.process_index() == 0 and _build(config, pbc)
    multihost_utils.sync_global_devices('bcjax.data.pbc_builder.prepare')
    built = _build(config, pbc) or built
  else:
    built = _build(config, pbc)
  pbc = builder(config)  # Anew if another process built it meanwhile.
  check_files(pbc)
  if print_summary or (print_summary is None and built):
    print(summary(pbc), flush=True)
  sizes = {s: pbc.info.splits[s].num_examples for s in spec.SPLITS}
  sizes['all'] = sum(sizes.values())
  return spec.DatasetInfo(spec.CLASS_NAMES, sizes, config.image_size)


def raw_split(config, split: str) -> spec.RawSplit:
  """One prepared split, in its stored order, images still encoded."""
  pbc = builder(config)
  if not pbc.is_prepared():
    prepare(config)
  with _quiet_tfds():
    dataset = pbc.as_dataset(
        split=split, shuffle_files=False,
        decoders={'image': tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(try_autocache=False))
  dataset = dataset.map(lambda ex: {'image': ex['image'], 'label': ex['label'],
                                    'file_name': ex['file_name']})
  return spec.RawSplit(dataset, pbc.info.splits[split].num_examples,
                       encoded=True)
