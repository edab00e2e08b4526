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
"""

import contextlib
import errno
import json
import os
import tempfile
from typing import Any, Iterator

from bcjax.errors import UserError


@contextlib.contextmanager
def atomic_write(path: str, mode: str = 'w', **open_kwargs) -> Iterator[Any]:
  """Opens a temporary file beside ``path``; renames it to ``path`` on success.

  The temporary name is unique per call (``.<name>.<random>.tmp``), so two
  processes writing the same file never share one; on an exception it is
  removed and ``path`` is left as it was.
  """
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=folder)
  try:
    with os.fdopen(fd, mode, **open_kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a result file is the user's usual.
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """A temporary path with ``path``'s suffix to write to; renamed to ``path`` on success.

  For writers that take a path, not a file (matplotlib's ``savefig`` reads
  the format from the suffix).
  """
  path = os.fspath(path)
  folder, name = os.path.split(os.path.abspath(path))
  suffix = os.path.splitext(name)[1]
  fd, tmp = tempfile.mkstemp(prefix=f'.{name}.', suffix=f'.tmp{suffix}', dir=folder)
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
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
