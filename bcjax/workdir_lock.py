"""One training process per workdir: a lock held while it trains, released on any exit.

Two trainings in one workdir (seeds 0 and 1 started by the same script, or a
rerun "to resume" while the first still runs) would save over each other's
checkpoints, report and ``config.json``, and both would exit 0. So training
takes ``<workdir>/train.lock`` before it reads or writes anything there, and
a second one is refused in one line naming the process that holds it::

    with workdir_lock.hold(workdir):
      ...   # train

Reading a workdir (eval, predict, explain, export) takes no lock: those only
read complete checkpoints, which orbax renames into place whole.

The lock is an exclusive ``flock`` on the file, which the kernel releases
when the process ends however it ends (SIGKILL, a crash), so a dead run
never blocks the next one. The file also records the holder's pid, host and
start time, for the error line. Where the file system cannot ``flock`` (some
network mounts), the file itself is the lock, created exclusively: a file
left by a process that is gone is taken over when its pid is dead on this
host; one from another host is refused with its path, since only the user can
tell whether that process still runs.
"""

import contextlib
import datetime
import errno
import json
import os
import socket
from typing import Iterator

from bcjax.errors import UserError

LOCK_FILE = 'train.lock'

try:
  import fcntl  # pylint: disable=g-import-not-at-top  (POSIX only)
except ImportError:  # pragma: no cover
  fcntl = None

# flock failing with these means the file system does not lock, not that it is held.
_NO_LOCKING = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS)


class WorkdirBusyError(UserError):
  """Another training process holds the workdir."""


def _holder_text() -> str:
  return json.dumps({'pid': os.getpid(), 'host': socket.gethostname(),
                     'started': datetime.datetime.now().isoformat(timespec='seconds')})


def _read_holder(path: str) -> dict:
  try:
    with open(path) as f:
      value = json.loads(f.read() or '{}')
  except (OSError, ValueError):
    return {}
  return value if isinstance(value, dict) else {}


def _describe(holder: dict) -> str:
  if not holder.get('pid'):
    return 'another process'
  where = f" on {holder['host']}" if holder.get('host') else ''
  since = f" since {holder['started']}" if holder.get('started') else ''
  return f"process {holder['pid']}{where}{since}"


def _busy(workdir: str, holder: dict, extra: str = '') -> WorkdirBusyError:
  return WorkdirBusyError(
      f'{workdir} is in use by another training ({_describe(holder)}); wait for it to end '
      f'(then rerun the same command to resume), or use another --workdir{extra}')


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, another user's.
    return True
  return True


class _Lock:
  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_FILE)
    self.fd: int | None = None
    self.exclusive_file = False  # The fallback: the file's existence is the lock.

  def acquire(self) -> None:
    if fcntl is not None:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          raise _busy(self.workdir, _read_holder(self.path)) from None
        if e.errno not in _NO_LOCKING:
          raise
      else:
        self.fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text().encode(), 0)
        return
    self._acquire_exclusive_file()

  def _acquire_exclusive_file(self) -> None:
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        holder = _read_holder(self.path)
        pid, host = holder.get('pid'), holder.get('host')
        if isinstance(pid, int) and host == socket.gethostname() and not _pid_alive(pid):
          with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # Left by a process that is gone.
          continue
        raise _busy(self.workdir, holder, f' (if it is gone, delete {self.path})') from None
      os.write(fd, _holder_text().encode())
      os.close(fd)
      self.exclusive_file = True
      return
    raise _busy(self.workdir, _read_holder(self.path))

  def release(self) -> None:
    if self.fd is not None:
      with contextlib.suppress(OSError):
        os.ftruncate(self.fd, 0)  # No stale holder text for the next reader.
      os.close(self.fd)  # Closing the last descriptor drops the flock.
      self.fd = None
    if self.exclusive_file:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(self.path)
      self.exclusive_file = False


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds ``workdir``'s training lock for the block; WorkdirBusyError if another has it.

  ``workdir`` must exist. Process 0 of a multi-process run locks for all of
  them (they share the workdir): callers lock only there.
  """
  lock = _Lock(os.path.abspath(workdir))
  lock.acquire()
  try:
    yield
  finally:
    lock.release()
