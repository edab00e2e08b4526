"""Builds, caches and registers the oneDNN convolution kernels (``conv.cc``).

Why build at run time: the kernels link two things only the user's machine
has, JAX's XLA FFI headers (``jax.ffi.include_dir()``, which must match the
installed jaxlib) and oneDNN 3.x (the ``onednn-devel-cpu-gomp`` wheel, a
dependency on Linux x86-64). A C++ compiler turns ``conv.cc`` into a shared
library once, in ``$BCJAX_CACHE_DIR`` (default ``~/.cache/bcjax``), named by a
hash of everything that went into it, so a new jaxlib, oneDNN or source builds
anew and old builds are never reused by mistake. It takes a few seconds.

Where any piece is missing (no compiler, no oneDNN, another OS or CPU) the
kernels are simply unavailable: :func:`status` says why, and
``conv_impl='auto'`` falls back to the XLA lowering (``bcjax.models.layers``).
``BCJAX_ONEDNN=0`` turns them off on purpose (A/B measurements, debugging).

Loading a shared library runs its code, so the cache is a security boundary.
A library is loaded from the cache only if its folder (and the cache root
above it) belongs to this user and is not writable by group or others, and
the file itself is a regular file with the same two properties; the folders
are created 0700. Where the cache fails that test (a shared or world-writable
``$BCJAX_CACHE_DIR``, another user's folder) the kernels are compiled into a
fresh private temporary folder for this process instead, with one note on
stderr; nothing found in the unsafe cache is loaded.

Faults cost one attempt, not one per start: a compile that fails (or runs
past :data:`COMPILE_TIMEOUT_S`) leaves ``<library>.failed`` with the reason,
and later processes with the same inputs fall back at once (a new source,
jaxlib, oneDNN or compiler is a new hash and tries again); a cached library
that fails to load (truncated by a full disk) is rebuilt once.
"""

from __future__ import annotations

import atexit
import ctypes
import dataclasses
import functools
import hashlib
import os
import pathlib
import platform
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading

import jax

SOURCE = pathlib.Path(__file__).with_name('conv.cc')
# Handler symbol in conv.cc -> XLA FFI target name.
TARGETS = {
    'BcjaxConvForward': 'bcjax_onednn_conv_forward',
    'BcjaxConvBackwardData': 'bcjax_onednn_conv_backward_data',
    'BcjaxConvBackwardWeights': 'bcjax_onednn_conv_backward_weights',
}
_CXXFLAGS = ('-O2', '-std=c++17', '-shared', '-fPIC', '-w')
COMPILE_TIMEOUT_S = 600  # A compile of conv.cc takes seconds; a hung compiler must not hang a run.


@dataclasses.dataclass(frozen=True)
class Status:
  available: bool
  reason: str  # Why not, or where the library was loaded from.


@dataclasses.dataclass(frozen=True)
class OneDnnInstall:
  include_dir: pathlib.Path
  lib_dir: pathlib.Path
  version: str


def cache_dir() -> pathlib.Path:
  root = os.environ.get('BCJAX_CACHE_DIR')
  if root:
    return pathlib.Path(root)
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return pathlib.Path(base) / 'bcjax'


def find_onednn(roots=None) -> OneDnnInstall | None:
  """oneDNN >= 3 headers and library: ``$BCJAX_ONEDNN_ROOT``, this Python's prefix, /usr."""
  if roots is None:
    roots = [os.environ.get('BCJAX_ONEDNN_ROOT'), sys.prefix, sys.base_prefix, '/usr/local', '/usr']
  for root in filter(None, roots):
    root = pathlib.Path(root)
    version_h = root / 'include' / 'oneapi' / 'dnnl' / 'dnnl_version.h'
    if not version_h.is_file():
      continue
    fields = dict(re.findall(r'#define DNNL_VERSION_(MAJOR|MINOR|PATCH) (\d+)', version_h.read_text()))
    if int(fields.get('MAJOR', 0)) < 3:
      continue  # The kernels use oneDNN 3's API (Debian's libdnnl-dev is 2.x).
    for lib in ('lib', 'lib64', f'lib/{platform.machine()}-linux-gnu'):
      if (root / lib / 'libdnnl.so.3').exists():
        version = '.'.join(fields.get(k, '0') for k in ('MAJOR', 'MINOR', 'PATCH'))
        return OneDnnInstall(root / 'include', root / lib, version)
  return None


def _compiler() -> str | None:
  return shutil.which(os.environ.get('CXX', 'g++')) or shutil.which('c++')


def _inputs(onednn: OneDnnInstall, compiler: str) -> tuple[list[str], str]:
  """The compile command's tail and the hash of everything that goes into the library."""
  cmd_tail = [f'-I{jax.ffi.include_dir()}', f'-I{onednn.include_dir}', str(SOURCE),
              f'-L{onednn.lib_dir}', '-l:libdnnl.so.3', f'-Wl,-rpath,{onednn.lib_dir}']
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), jax.__version__.encode(), jax.lib.__version__.encode(),
               onednn.version.encode(), ' '.join((compiler, *_CXXFLAGS, *cmd_tail)).encode()):
    key.update(part)
  return cmd_tail, key.hexdigest()[:16]


def library_path(onednn: OneDnnInstall, compiler: str, folder: pathlib.Path | None = None
                 ) -> pathlib.Path:
  """Where the library for these inputs lives in ``folder`` (default: the cache)."""
  folder = cache_dir() / 'onednn' if folder is None else folder
  return folder / f'libbcjax_onednn_{_inputs(onednn, compiler)[1]}.so'


def unsafe_reason(path: pathlib.Path, *, folder: bool) -> str | None:
  """Why ``path`` must not be trusted to load code from, or None if it may.

  Trusted: owned by this user, not writable by group or others, a real folder
  (or regular file), not a symbolic link. Anyone who can write it could swap
  the library for their own.
  """
  try:
    st = os.lstat(path)
  except OSError as e:
    return f'cannot be checked ({e.strerror or e})'
  if stat.S_ISLNK(st.st_mode):
    return 'is a symbolic link'
  if folder and not stat.S_ISDIR(st.st_mode):
    return 'is not a folder'
  if not folder and not stat.S_ISREG(st.st_mode):
    return 'is not a regular file'
  if st.st_uid != os.getuid():
    return f'belongs to uid {st.st_uid}, not to this user ({os.getuid()})'
  if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
    return f'is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})'
  return None


def _private_cache(root: pathlib.Path) -> tuple[pathlib.Path, str | None]:
  """The cache's ``onednn`` folder, made 0700 if new, and why it is unsafe (or None)."""
  folder = root / 'onednn'
  try:
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.mkdir(mode=0o700, exist_ok=True)
  except OSError as e:
    return folder, f'cannot be created ({e.strerror or e})'
  for path in (root, folder):
    reason = unsafe_reason(path, folder=True)
    if reason:
      return folder, f'{path} {reason}'
  return folder, None


def _compile(compiler: str, cmd_tail: list[str], out: pathlib.Path) -> None:
  """Runs the compiler into ``out`` (via a temporary name); RuntimeError on failure."""
  tmp = out.with_suffix(f'.{os.getpid()}.tmp')  # Concurrent builders each write their own.
  print(f'bcjax: compiling the oneDNN convolution kernels into {out.parent} (once)',
        file=sys.stderr, flush=True)
  try:
    proc = subprocess.run([compiler, *_CXXFLAGS, '-o', str(tmp), *cmd_tail],
                          capture_output=True, text=True, check=False,
                          timeout=COMPILE_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    tmp.unlink(missing_ok=True)
    raise RuntimeError(f'{compiler} ran past {COMPILE_TIMEOUT_S} s and was stopped') from None
  except OSError as e:
    raise RuntimeError(f'{compiler} could not run: {e}') from None
  if proc.returncode != 0:
    tmp.unlink(missing_ok=True)
    raise RuntimeError(f'{compiler} failed: {proc.stderr.strip()[-600:]}')
  os.chmod(tmp, 0o755)
  os.replace(tmp, out)


def _failure_marker(library: pathlib.Path) -> pathlib.Path:
  return library.with_name(library.name + '.failed')


def build(onednn: OneDnnInstall, compiler: str, folder: pathlib.Path | None = None
          ) -> pathlib.Path:
  """Compiles conv.cc into ``folder`` (default: the cache) unless it is there; its path.

  A failed compile is remembered beside the library (``.failed``, the
  reason): the same inputs then raise at once instead of compiling again.
  """
  cmd_tail, _ = _inputs(onednn, compiler)
  out = library_path(onednn, compiler, folder)
  if out.exists():
    return out
  marker = _failure_marker(out)
  if marker.is_file() and not unsafe_reason(marker, folder=False):
    raise RuntimeError(f'an earlier build with the same inputs failed (reason in {marker}; '
                       'delete it to try again)')
  out.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
  try:
    _compile(compiler, cmd_tail, out)
  except RuntimeError as e:
    try:
      with tempfile.NamedTemporaryFile('w', dir=out.parent, delete=False) as f:
        f.write(f'{e}\n')
      os.replace(f.name, marker)
    except OSError:
      pass  # Not remembered: the next start tries again.
    raise
  return out


_lock = threading.Lock()


@functools.cache
def status() -> Status:
  """Loads the kernels once per process (building them if needed); never raises.

  Where they should work (Linux x86-64, not turned off) but do not, says so
  once on stderr: CPU steps then run several times slower.
  """
  if os.environ.get('BCJAX_ONEDNN', '1') == '0':
    return Status(False, 'turned off by BCJAX_ONEDNN=0')
  if sys.platform != 'linux' or platform.machine() not in ('x86_64', 'AMD64'):
    return Status(False, f'built for Linux x86-64 only, not {sys.platform} {platform.machine()}')
  result = _load()
  if not result.available:
    print(f'bcjax: oneDNN convolutions unavailable ({result.reason}); CPU convolutions '
          "fall back to XLA's, several times slower", file=sys.stderr, flush=True)
  return result


def _register(path: pathlib.Path) -> None:
  """Loads the library (running its code) and registers its handlers with XLA."""
  lib = ctypes.CDLL(str(path))
  for symbol, target in TARGETS.items():
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                platform='cpu')


def _trusted_library(onednn: OneDnnInstall, compiler: str) -> pathlib.Path:
  """A library built here, from a safe cache, or into a private folder; never an unsafe one."""
  folder, unsafe = _private_cache(cache_dir())
  if unsafe:
    private = pathlib.Path(tempfile.mkdtemp(prefix='bcjax-onednn-'))  # 0700, this user's.
    atexit.register(shutil.rmtree, private, True)  # A loaded library needs no file.
    print(f'bcjax: not using the kernel cache ({unsafe}); building into {private} for this '
          f'process (make the cache this user\'s and chmod 700 it, or set BCJAX_CACHE_DIR)',
          file=sys.stderr, flush=True)
    return build(onednn, compiler, private)
  path = build(onednn, compiler, folder)
  reason = unsafe_reason(path, folder=False)
  if reason:
    raise RuntimeError(f'not loading {path}: it {reason}')
  return path


def _load() -> Status:
  onednn = find_onednn()
  if onednn is None:
    return Status(False, 'oneDNN 3 not found (pip install onednn-devel-cpu-gomp==2023.2.0)')
  compiler = _compiler()
  if compiler is None:
    return Status(False, 'no C++ compiler (g++) to build the kernels with')
  with _lock:
    try:
      path = _trusted_library(onednn, compiler)
      try:
        _register(path)
      except OSError as e:  # Truncated or corrupt (a full disk, a killed copy): rebuild once.
        print(f'bcjax: the cached kernels {path} do not load ({e}); rebuilding them once',
              file=sys.stderr, flush=True)
        path.unlink(missing_ok=True)
        path = build(onednn, compiler, path.parent)
        _register(path)
    except (OSError, RuntimeError, AttributeError) as e:
      return Status(False, f'could not build or load the kernels: {e}')
  return Status(True, f'oneDNN {onednn.version} kernels from {path}')


def available() -> bool:
  return status().available
