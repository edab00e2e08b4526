"""Process-level performance settings, applied once before JAX runs anything.

Call :func:`configure` first thing in an entry point (``launch.py``, the
benchmarks), before the first JAX computation::

    from bcjax import process_setup
    process_setup.configure()    # reads $BCJAX_MALLOC
    import jax ...

What it sets, and why (numbers in docs/benchmarks.md):

* ``BCJAX_MALLOC=tuned`` (the default) on Linux/glibc: keep freed memory in
  the process instead of handing it back to the kernel. glibc serves every
  allocation above 32 MiB with a fresh ``mmap`` and unmaps it on ``free``, and
  XLA:CPU allocates a step's large activations anew on every call, so each
  training step page-faults in (and the kernel zero-fills) its activations
  again, a large fraction of the step time on a small VM. ``mallopt`` with
  one arena, no ``mmap`` for large blocks and no trimming makes the steady
  state fault-free. The cost: the
  process keeps its peak heap until it exits, which a training run does
  anyway. ``BCJAX_MALLOC=system`` leaves glibc's defaults.

No XLA flag or thread setting is set here: none measured faster on CPU (see
docs/benchmarks.md), and GPU runs need none.
"""

import ctypes
import ctypes.util
import os
import sys

from bcjax.errors import UserError

MALLOC_MODES = ('tuned', 'system')

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_applied: dict[str, str] = {}


def _tune_glibc_malloc() -> bool:
  """One arena, no mmap'd blocks, no trimming; False where glibc is absent."""
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl and other libcs: nothing to do.
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  ok = mallopt(_M_ARENA_MAX, 1) == 1
  ok &= mallopt(_M_MMAP_MAX, 0) == 1
  ok &= mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
  return bool(ok)


def configure(environ=None) -> dict[str, str]:
  """Applies the settings once per process; returns what was applied.

  Must run before the first JAX computation: the allocator setting only
  reaches threads that have not allocated yet (XLA starts its thread pool
  with the backend).
  """
  if _applied:
    return dict(_applied)
  environ = os.environ if environ is None else environ
  mode = environ.get('BCJAX_MALLOC', 'tuned')
  if mode not in MALLOC_MODES:
    raise UserError(f'BCJAX_MALLOC={mode!r}; known: {", ".join(MALLOC_MODES)}')
  if mode == 'tuned':
    mode = 'tuned' if _tune_glibc_malloc() else 'system (no glibc)'
  _applied['malloc'] = mode
  return dict(_applied)


def applied() -> dict[str, str]:
  """What :func:`configure` set in this process (empty if it did not run)."""
  return dict(_applied)
