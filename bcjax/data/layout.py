"""PBC's layout in a folder or a zip: find the class folders, read every file.

PBC ships as ``PBC_dataset_normal_DIB/<class>/*.jpg``, zipped, and real
copies are messy: the zip has macOS metadata (``__MACOSX/``, ``._*``), class
folders hold files that are not images, and users add their own. This module
turns either form into clean records and an account of what it left out::

    location = layout.locate('../shared/data/PBC_dataset_normal_DIB')  # or .zip
    listing = layout.list_files(location)   # cheap: names and sizes only
    scan = layout.read(listing)             # bytes, checked and normalised

A missing or empty class folder, or a path that is not PBC's layout, is a
one-line :class:`~bcjax.errors.UserError` naming the folder. Each file that
cannot be decoded is skipped with one warning line and recorded with its
reason; macOS metadata is ignored and only counted.

Unusual but valid input is read: class folders in any letter case, singular
or plural, or under a common other name (:func:`class_of_folder`:
``Neutrophil/``, ``NEUTROPHILS/``, ``Thrombocytes/``; two folders naming one
class are an error naming both),
images in sub-folders of a class folder (they belong to that class, and
their file name keeps the sub-folder: ``neutrophil/patient3/x.jpg``), file
names that are not valid UTF-8 (stored with the bad bytes escaped,
``caf\xe9.jpg``). Hostile or broken input is skipped with one warning, decided
from the listing, before any byte is read: a file or zip entry larger than
``images.MAX_FILE_BYTES`` (by its declared size), FIFOs, sockets and devices,
symbolic links that loop or lead out of the dataset folder, zip entries that
are encrypted, use a compression method Python cannot read, are symbolic
links, or share their name with another entry. Images whose header declares
a decompression bomb are refused by ``images``.
"""

import collections
import concurrent.futures
import dataclasses
import hashlib
import os
import stat
import sys
import threading
import zipfile

from bcjax import errors
from bcjax.data import images
from bcjax.data.spec import CLASS_NAMES

ROOT_NAME = 'PBC_dataset_normal_DIB'
_CLASS_INDEX = {name: i for i, name in enumerate(CLASS_NAMES)}
# Other names other labs give PBC's classes (singular; a final 's' is dropped first).
FOLDER_ALIASES = {
    'thrombocyte': 'platelet',
    'immature_granulocyte': 'ig',
    'normoblast': 'erythroblast',
}


@dataclasses.dataclass(frozen=True)
class Location:
  """A PBC-layout tree: a folder, or a zip and the prefix of its tree."""
  kind: str  # 'folder' | 'zip'
  path: str  # The folder holding the class folders, or the zip file.
  prefix: str = ''  # In a zip: the entry prefix up to the class folders.

  def describe(self, name: str = '') -> str:
    if self.kind == 'folder':
      return os.path.join(self.path, name) if name else self.path
    return f'{self.path}:{self.prefix}{name}'


@dataclasses.dataclass(frozen=True)
class Entry:
  file_name: str  # '<class>/<file>', what every example keeps.
  label: int
  size: int
  member: str  # Path of the file, or name of the zip entry.


@dataclasses.dataclass
class Listing:
  location: Location
  entries: list[Entry]
  skipped: list[tuple[str, str]]  # (name, reason), found without reading.
  metadata_ignored: int
  unknown_folders: list[str] = dataclasses.field(default_factory=list)  # Not a class name.

  def fingerprint(self) -> str:
    """Hash of (file name, size): the same for the folder and its zip."""
    text = '\n'.join(f'{e.file_name}\t{e.size}' for e in self.entries)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class Record:
  file_name: str
  label: int
  data: bytes  # images.normalize(): decodes to 8-bit RGB.
  sha256: str  # Of the file's original bytes.


@dataclasses.dataclass
class Scan:
  location: Location
  records: list[Record]
  skipped: list[tuple[str, str]]
  metadata_ignored: int


def is_macos_metadata(name: str) -> bool:
  parts = name.replace('\\', '/').split('/')
  base = parts[-1]
  return '__MACOSX' in parts or base.startswith('._') or base == '.DS_Store'


def class_of_folder(name: str) -> str | None:
  """PBC's class that a folder name means, or None.

  The rule: letter case is ignored, spaces and hyphens count as underscores,
  a final 's' is optional, and a few other names are known
  (``FOLDER_ALIASES``). So ``neutrophil``, ``Neutrophil``, ``NEUTROPHILS``,
  ``Lymphocytes``, ``IG``, ``IGs``, ``Immature granulocytes``, ``platelets``,
  ``Thrombocytes`` and ``normoblasts`` are all read; anything else (``lymph``,
  ``eosinophiles``, ``band_neutrophil``) is not a class.
  """
  key = name.strip().lower().replace(' ', '_').replace('-', '_')
  for candidate in (key, key[:-1] if key.endswith('s') else None):
    if candidate in _CLASS_INDEX:
      return candidate
    if candidate in FOLDER_ALIASES:
      return FOLDER_ALIASES[candidate]
  return None


def known_folder_names() -> str:
  """The folder names :func:`class_of_folder` reads, in words (for error messages)."""
  return (f'{", ".join(CLASS_NAMES)} (any letter case, with or without a final \'s\'; '
          f'also {", ".join(FOLDER_ALIASES)})')


def _layout_error(where: str) -> errors.UserError:
  return errors.UserError(
      f'{where} is not in PBC layout: expected the class folders '
      f'{", ".join(CLASS_NAMES)} in it (or in a {ROOT_NAME} folder inside it)')


def locate(path: str) -> Location:
  """The PBC tree at ``path``: a folder (or its parent) or a zip."""
  path = os.path.expanduser(path)
  if os.path.isdir(path):
    return Location('folder', _folder_root(path))
  if not os.path.exists(path):
    raise errors.UserError(f'{path} does not exist')
  if not zipfile.is_zipfile(path):
    raise errors.UserError(f'{path} is neither a folder nor a zip file')
  return Location('zip', path, _zip_prefix(path))


def _has_class_dirs(path: str) -> bool:
  try:
    return any(class_of_folder(e.name) and e.is_dir() for e in os.scandir(path))
  except OSError:
    return False


def _folder_root(path: str) -> str:
  if _has_class_dirs(path):
    return path
  inner = [e.path for e in os.scandir(path)
           if e.is_dir() and _has_class_dirs(e.path)]
  if len(inner) == 1:
    return inner[0]
  raise _layout_error(path)


def _zip_prefix(path: str) -> str:
  with zipfile.ZipFile(path) as archive:
    names = [n for n in archive.namelist()
             if not n.endswith('/') and not is_macos_metadata(n)]
  prefixes = collections.Counter()
  for name in names:
    parts = name.split('/')
    if len(parts) >= 2 and class_of_folder(parts[-2]):
      prefixes['/'.join(parts[:-2])] += 1
  if not prefixes:
    raise _layout_error(path)
  prefix = max(prefixes, key=lambda p: (prefixes[p], -len(p)))
  return prefix + '/' if prefix else ''


def list_files(location: Location, *, require_all_classes: bool = True) -> Listing:
  """Every candidate file of ``location``, by name and size (reads no bytes).

  With ``require_all_classes`` (PBC itself) every class folder must hold
  files, and a folder that names no class is skipped with a warning. Without
  (another lab's folder, which may hold some classes only) a folder that
  names no class is a UserError naming it and the names that are read: its
  images would otherwise drop out of the evaluation unseen.
  """
  lister = _list_folder if location.kind == 'folder' else _list_zip
  entries, skipped, metadata, seen_classes, unknown = lister(location)
  if unknown and not require_all_classes:
    names = ', '.join(repr(n) for n in sorted(unknown))
    what = (f'folder {names} is not a class; rename or move it' if len(unknown) == 1 else
            f'folders {names} are not classes; rename or move them')
    raise errors.UserError(
        f'{location.describe()}: {what} (class folders are named {known_folder_names()})')
  for name in CLASS_NAMES:
    count = sum(e.file_name.split('/')[0] == name for e in entries)
    where = location.describe(seen_classes.get(name, name))
    if name not in seen_classes and require_all_classes:
      raise errors.UserError(
          f'class folder {where} is missing; a PBC-layout folder has the '
          f'class folders {", ".join(CLASS_NAMES)}')
    if name in seen_classes and not count and require_all_classes:
      raise errors.UserError(f'class folder {where} is empty')
  if not entries:
    raise _layout_error(location.describe())
  entries.sort(key=lambda e: e.file_name)
  return Listing(location, entries, sorted(skipped), metadata, sorted(unknown))


_MAX_DEPTH = 8  # Sub-folders of a class folder read this deep; deeper ones are skipped.
_READABLE_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2,
                     zipfile.ZIP_LZMA}


def _display(name: str) -> str:
  """A file name as text: bytes that are not UTF-8 escaped (``caf\xe9.jpg``), never lost."""
  return os.fsencode(name).decode('utf-8', 'backslashreplace')


def _note_class(seen: dict[str, str], label_name: str, folder: str, where) -> None:
  """Records ``folder`` as ``label_name``'s folder; two folders for one class are an error."""
  if label_name in seen and seen[label_name] != folder:
    raise errors.UserError(
        f'{where(seen[label_name])} and {where(folder)} are both the {label_name!r} class '
        '(folder names are read in any letter case, singular or plural); '
        'merge them into one folder')
  seen[label_name] = folder


def _kind_of(st: os.stat_result) -> str:
  mode = st.st_mode
  return ('a FIFO' if stat.S_ISFIFO(mode) else 'a socket' if stat.S_ISSOCK(mode)
          else 'a device' if stat.S_ISBLK(mode) or stat.S_ISCHR(mode) else 'not a regular file')


_NOT_A_CLASS = 'not a class folder'


def _list_folder(location):
  entries, skipped, metadata, seen, unknown = [], [], 0, {}, set()
  root = os.path.realpath(location.path)
  for top in sorted(os.scandir(location.path), key=lambda e: e.name):
    label_name = class_of_folder(top.name) if top.is_dir() else None
    if is_macos_metadata(top.name):
      metadata += 1
      continue
    if label_name is None:
      if top.is_dir():
        skipped.append((_display(top.name),
                        f'{_NOT_A_CLASS}; class folders are named {known_folder_names()}'))
        if not top.name.startswith('.'):
          unknown.add(_display(top.name))
      else:
        skipped.append((_display(top.name), _NOT_A_CLASS))
      continue
    _note_class(seen, label_name, top.name, location.describe)
    metadata += _walk_class(location, root, top.path, label_name, label_name, 0,
                            entries, skipped)
  return entries, skipped, metadata, seen, unknown


def _walk_class(location, root, folder, label_name, prefix, depth, entries, skipped) -> int:
  """Adds the files under one class folder (recursively); returns the metadata count."""
  metadata = 0
  for item in sorted(os.scandir(folder), key=lambda e: e.name):
    file_name = f'{prefix}/{_display(item.name)}'
    if is_macos_metadata(item.name):
      metadata += 1
      continue
    try:
      if item.is_symlink():
        target = os.path.realpath(item.path)  # Resolves loops to a path that does not exist.
        if os.path.commonpath([root, target]) != root:
          skipped.append((file_name, f'a symbolic link leading out of {location.path}'))
          continue
      st = os.stat(item.path)  # Follows links (inside the folder); ELOOP on a loop.
    except OSError as e:
      reason = ('a symbolic link loop' if e.errno in (40, 62) else
                f'cannot be read ({e.strerror or e})')
      skipped.append((file_name, reason))
      continue
    if stat.S_ISDIR(st.st_mode):
      if depth + 1 >= _MAX_DEPTH or item.is_symlink():
        skipped.append((file_name, 'a folder linked or nested too deep; not read'))
      else:
        metadata += _walk_class(location, root, item.path, label_name, file_name, depth + 1,
                                entries, skipped)
    elif not stat.S_ISREG(st.st_mode):
      skipped.append((file_name, _kind_of(st)))
    elif images.too_large(st.st_size):
      skipped.append((file_name, images.too_large(st.st_size)))
    else:
      entries.append(Entry(file_name, _CLASS_INDEX[label_name], st.st_size, item.path))
  return metadata


def _zip_problem(info: zipfile.ZipInfo) -> str | None:
  """Why a zip entry is not read, judged from its header alone, or None."""
  if info.flag_bits & 0x1:
    return 'encrypted'
  if info.compress_type not in _READABLE_METHODS:
    return f'compression method {info.compress_type}, which Python cannot read'
  if stat.S_ISLNK(info.external_attr >> 16):
    return 'a symbolic link'
  return images.too_large(info.file_size)


def _list_zip(location):
  entries, skipped, metadata, seen, unknown = [], [], 0, {}, set()
  with zipfile.ZipFile(location.path) as archive:
    infos = archive.infolist()
  copies = collections.Counter(info.filename for info in infos)
  for info in infos:
    name = info.filename
    if is_macos_metadata(name):
      metadata += not info.is_dir()
      continue
    if not name.startswith(location.prefix):
      if not info.is_dir():
        skipped.append((name, 'outside the class folders'))
      continue
    parts = name[len(location.prefix):].rstrip('/').split('/')
    label_name = class_of_folder(parts[0])
    if label_name:
      _note_class(seen, label_name, parts[0], location.describe)
    if info.is_dir():
      continue
    rel = name[len(location.prefix):]
    if label_name is None or len(parts) < 2:
      skipped.append((rel, 'outside the class folders'))
      if len(parts) >= 2 and not parts[0].startswith('.'):
        unknown.add(parts[0])
      continue
    if copies[name] > 1:  # Which copy is "the" file is ambiguous: neither is used.
      skipped.append((rel, f'{copies[name]} entries have this name'))
      continue
    problem = _zip_problem(info)
    if problem:
      skipped.append((rel, problem))
      continue
    entries.append(Entry('/'.join([label_name, *parts[1:]]), _CLASS_INDEX[label_name],
                         info.file_size, name))
  return entries, sorted(set(skipped)), metadata, seen, unknown


def _warn(message: str) -> None:
  print(f'warning: {message}', file=sys.stderr, flush=True)


def read(listing: Listing, *, warn=_warn, require_all_classes: bool = True,
         threads: int | None = None) -> Scan:
  """Reads and checks every listed file, in parallel; skips undecodable ones.

  Every skipped file costs one ``warn`` line. A class left without a single
  readable image is a UserError (when ``require_all_classes``).
  """
  location = listing.location
  local = threading.local()

  def load(entry: Entry) -> Record | tuple[str, str]:
    try:
      # At most the limit + 1 bytes: a file that grew (or a zip entry that lies about
      # its size) since the listing is caught, not read whole.
      if location.kind == 'folder':
        with open(entry.member, 'rb') as f:
          raw = f.read(images.MAX_FILE_BYTES + 1)
      else:
        if not hasattr(local, 'archive'):
          local.archive = zipfile.ZipFile(location.path)
        with local.archive.open(entry.member) as f:
          raw = f.read(images.MAX_FILE_BYTES + 1)
      if len(raw) > images.MAX_FILE_BYTES:
        raise images.UnreadableImageError(images.too_large(len(raw)))
      data = images.normalize(raw)
    except (OSError, EOFError, zipfile.BadZipFile, NotImplementedError, RuntimeError,
            images.UnreadableImageError) as e:  # (zipfile's errors for a broken entry)
      return entry.file_name, str(e) or type(e).__name__
    return Record(entry.file_name, entry.label, data,
                  hashlib.sha256(raw).hexdigest())

  threads = threads or min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    results = list(pool.map(load, listing.entries))
  records = [r for r in results if isinstance(r, Record)]
  unreadable = [r for r in results if not isinstance(r, Record)]
  for name, reason in listing.skipped + unreadable:
    warn(f'skipping {location.describe(name)}: {reason}')
  if require_all_classes:
    for label, name in enumerate(CLASS_NAMES):
      if not any(r.label == label for r in records):
        raise errors.UserError(
            f'class folder {location.describe(name)} has no readable image')
  return Scan(location, records, sorted(listing.skipped + unreadable),
              listing.metadata_ignored)
