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
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
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


def build(onednn: OneDnnInstall, compiler: str) -> pathlib.Path:
  """Compiles conv.cc (or finds it compiled) and returns the library's path."""
  cmd_tail = [f'-I{jax.ffi.include_dir()}', f'-I{onednn.include_dir}', str(SOURCE),
              f'-L{onednn.lib_dir}', '-l:libdnnl.so.3', f'-Wl,-rpath,{onednn.lib_dir}']
  key = hashlib.sha256()
  for part in (SOURCE.read_bytes(), jax.__version__.encode(), jax.lib.__version__.encode(),
               onednn.version.encode(), ' '.join((compiler, *_CXXFLAGS, *cmd_tail)).encode()):
    key.update(part)
  out = cache_dir() / 'onednn' / f'libbcjax_onednn_{key.hexdigest()[:16]}.so'
  if out.exists():
    return out
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = out.with_suffix(f'.{os.getpid()}.tmp')  # Concurrent builders each write their own.
  print(f'bcjax: compiling the oneDNN convolution kernels into {out.parent} (once)',
        file=sys.stderr, flush=True)
  proc = subprocess.run([compiler, *_CXXFLAGS, '-o', str(tmp), *cmd_tail],
                        capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    tmp.unlink(missing_ok=True)
    raise RuntimeError(f'{compiler} failed: {proc.stderr.strip()[-600:]}')
  os.replace(tmp, out)
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


def _load() -> Status:
  onednn = find_onednn()
  if onednn is None:
    return Status(False, 'oneDNN 3 not found (pip install onednn-devel-cpu-gomp==2023.2.0)')
  compiler = _compiler()
  if compiler is None:
    return Status(False, 'no C++ compiler (g++) to build the kernels with')
  with _lock:
    try:
      path = build(onednn, compiler)
      lib = ctypes.CDLL(str(path))
      for symbol, target in TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform='cpu')
    except (OSError, RuntimeError, AttributeError) as e:
      return Status(False, f'could not build or load the kernels: {e}')
  return Status(True, f'oneDNN {onednn.version} kernels from {path}')


def available() -> bool:
  return status().available
