"""Files bcjax writes: whole or not at all, and only where it can write.

Every result file (config.json, history.json, reports, predictions CSV,
packed .npz) goes through :func:`atomic_write`: it is written under a
temporary name in the same folder, flushed to disk, then renamed over the
target. A crash, SIGKILL or full disk therefore leaves either the old file
or the new one, never half a file that breaks the next run (a truncated
``history.json`` would stop ``--mode=eval``; a truncated .npz a whole run on
another host)::

    with files.atomic_write('runs/a/report/test_predictions.csv', newline='') as f:
      csv.writer(f).writerow(...)
    files.write_json('runs/a/history.json', history)

:func:`check_writable` is asked before long work (training, evaluating,
packing): a read-only or missing output folder is one ``error:`` line
before the first epoch, not a traceback after the last one.
:func:`check_output_file` and :func:`check_output_dir` are asked as early:
an output never replaces an input (``--out cells/a.jpg cells/`` would put
the CSV where the image was), a file is never written where a folder is
(or the other way round), so a mistyped ``--out`` costs nothing.

A write that fails for lack of space or permission raises :class:`WriteError`
(a UserError: one line naming the file, nothing half-written left behind).
"""

import contextlib
import errno
import json
import os
import tempfile
from typing import Any, Iterator

from bcjax.errors import UserError

# Image files by name: an output that would carry such a name is a mistake.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp')
# Errors of the disk or its permissions, not of the code that writes.
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                           errno.EPERM, errno.EIO, errno.EISDIR, errno.ENOTDIR})


class WriteError(UserError):
  """A result file could not be written (disk full, read-only, no permission)."""


def _write_error(path: str, e: OSError) -> WriteError:
  return WriteError(f'cannot write {path} ({describe_os_error(e)}); nothing was written there '
                    '(an older version, if any, is left as it was): free space or fix the '
                    'folder, then rerun')


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'w', **open_kwargs) -> Iterator[Any]:
  """Opens a temporary file beside ``path``; renames it to ``path`` on success.

  The temporary name is unique per call (:func:`atomic_path`), so two
  processes writing the same file never share one; on an exception it is
  removed and ``path`` is left as it was.
  """
  with atomic_path(path) as tmp:
    with open(tmp, mode, **open_kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """A temporary path with ``path``'s suffix to write to; renamed to ``path`` on success.

  For writers that take a path, not a file (matplotlib's ``savefig`` reads
  the format from the suffix).
  """
  path = os.fspath(path)
  folder, name = os.path.split(os.path.abspath(path))
  suffix = os.path.splitext(name)[1]
  try:
    fd, tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix=f'.tmp{suffix}', dir=folder)
  except OSError as e:
    if e.errno in _WRITE_ERRNOS:
      raise _write_error(path, e) from None
    raise
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
      raise _write_error(path, e) from None
    raise


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def write_text(path: str, text: str) -> None:
  with atomic_write(path) as f:
    f.write(text)


def write_json(path: str, value: Any) -> None:
  with atomic_write(path) as f:
    json.dump(value, f, indent=2)


def check_writable(folder: str, what: str) -> str:
  """Creates ``folder`` if needed and proves a file can be written there.

  ``what`` names the setting (``--workdir``, ``--out``) for the error line.
  Permission bits are not consulted: root ignores them and network file
  systems lie, so a real file is created and removed.
  """
  folder = os.path.abspath(os.path.expanduser(folder))
  try:
    os.makedirs(folder, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix='.bcjax-write-check.', dir=folder)
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    raise UserError(f'{what} {folder} is not writable ({describe_os_error(e)}); '
                    'choose another folder or fix its permissions') from None
  return folder


def describe_os_error(e: OSError) -> str:
  """A short reason for an OSError: 'no space left on device', 'read-only file system'."""
  if e.errno == errno.ENOSPC:
    return 'no space left on device'
  if e.strerror:
    return e.strerror[0].lower() + e.strerror[1:]
  return str(e) or type(e).__name__


def _same_file(a: str, b: str) -> bool:
  try:
    return os.path.samefile(a, b)
  except OSError:
    return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: str, folder: str) -> bool:
  path, folder = os.path.realpath(path), os.path.realpath(folder)
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _looks_like_image(path: str) -> bool:
  if os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS:
    return True
  if not os.path.isfile(path):
    return False
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path):  # Reads the header only.
      return True
  except Exception:  # pylint: disable=broad-except  (anything Pillow cannot open is no image)
    return False


def _check_protected(path: str, what: str, protected) -> None:
  for folder in protected:
    if _inside(path, folder):
      raise UserError(f'{what} {path} is inside {folder}, which this command reads (a '
                      "run's checkpoints); name a place outside it")


def check_output_file(path: str, what: str, *, inputs=(), kind: str = 'file',
                      protected=()) -> None:
  """An output file that would replace an input, an image or a folder is a UserError.

  ``inputs`` are the paths (files or folders) the command reads; ``kind``
  names what is written ('CSV file', '.npz file') for the message;
  ``protected`` are folders nothing may be written into (checkpoints).
  """
  _check_protected(path, what, protected)
  if os.path.isdir(path):
    name = {'CSV file': 'predictions.csv'}.get(kind, f'out{os.path.splitext(path)[1]}')
    raise UserError(f'{what} {path} is a folder, but one {kind} is written there: name a '
                    f'file, e.g. {os.path.join(path, name)}')
  for p in inputs:
    if os.path.exists(path) and os.path.exists(p) and not os.path.isdir(p) and _same_file(
        path, p):
      raise UserError(f'{what} {path} is one of the inputs ({p}); it would be replaced by '
                      f'the {kind}: name another file')
  if _looks_like_image(path):
    raise UserError(f'{what} {path} names an image, but a {kind} is written there: name '
                    'another file')


def check_output_dir(path: str, what: str, *, inputs=(), protected=()) -> None:
  """An output folder that is a file, or lies in a folder the command reads, is a UserError.

  Figures written inside an input folder would be read as images the next
  time that folder is given; ``protected`` folders (checkpoints) take nothing.
  """
  _check_protected(path, what, protected)
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f'{what} {path} is a file, but a folder is written there: name a folder')
  for p in inputs:
    if os.path.isdir(p) and _inside(path, p):
      raise UserError(f'{what} {path} is inside the input folder {p}: what is written there '
                      'would be read as input next time; name a folder outside it')


def run_inputs(workdirs) -> tuple[list[str], list[str]]:
  """(files, folders) of trained workdirs that inference reads: config.json, checkpoints."""
  workdirs = [os.path.expanduser(w) for w in workdirs]
  return ([os.path.join(w, 'config.json') for w in workdirs],
          [os.path.join(w, 'checkpoints') for w in workdirs])
