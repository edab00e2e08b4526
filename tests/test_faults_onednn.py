"""The compiled kernels' cache under faults: planted libraries, failed builds, bad files.

Loading a shared library runs its constructor, so each security test plants a
library whose constructor writes a marker file exactly where bcjax would look
for the kernels, then asks bcjax to load them. The positive control (a safe
cache) proves the marker would appear if the planted file were loaded.

Nothing here registers XLA FFI targets in the test process: ``_register`` is
replaced by a plain ``ctypes.CDLL`` (which still runs constructors), and the
compiler by a stub that writes a harmless library, so no test compiles
conv.cc or disturbs the real kernels other tests use.
"""

import ctypes
import os
import pathlib
import shutil
import subprocess

import pytest

from bcjax.onednn import build

CC = shutil.which('gcc') or shutil.which('cc')
pytestmark = pytest.mark.skipif(CC is None, reason='no C compiler to build test libraries')

PLANTED = r'''
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
  FILE *f = fopen("%s", "w");
  if (f) { fputs("planted library ran\n", f); fclose(f); }
}
'''


def _cc(source: str, out: pathlib.Path) -> pathlib.Path:
  src = out.with_suffix('.c')
  src.write_text(source)
  subprocess.run([CC, '-shared', '-fPIC', '-o', str(out), str(src)], check=True)
  return out


@pytest.fixture
def setup(tmp_path, monkeypatch):
  """(cache root, planted library path, marker path) with the compile and register stubbed."""
  onednn = build.OneDnnInstall(tmp_path, tmp_path, '3.0.0')
  compiler = '/usr/bin/true-cxx'
  root = tmp_path / 'cache'
  monkeypatch.setenv('BCJAX_CACHE_DIR', str(root))
  monkeypatch.setattr(build, 'find_onednn', lambda roots=None: onednn)
  monkeypatch.setattr(build, '_compiler', lambda: compiler)
  clean = _cc('int bcjax_clean_library = 1;\n', tmp_path / 'clean.so')
  compiled = []

  def fake_compile(compiler, cmd_tail, out):
    compiled.append(out)
    shutil.copyfile(clean, out)
    os.chmod(out, 0o755)

  monkeypatch.setattr(build, '_compile', fake_compile)
  monkeypatch.setattr(build, '_register', lambda path: ctypes.CDLL(str(path)))
  marker = tmp_path / 'marker'
  planted_path = build.library_path(onednn, compiler, root / 'onednn')
  return root, planted_path, marker, compiled, tmp_path


def _plant(planted_path: pathlib.Path, marker: pathlib.Path, scratch: pathlib.Path):
  planted_path.parent.mkdir(parents=True, exist_ok=True)
  lib = _cc(PLANTED % marker, scratch / 'planted.so')
  shutil.copyfile(lib, planted_path)


def test_a_safe_cache_is_used_control(setup):
  root, planted_path, marker, compiled, scratch = setup
  _plant(planted_path, marker, scratch)
  os.chmod(root, 0o700)
  os.chmod(planted_path.parent, 0o700)
  os.chmod(planted_path, 0o755)
  status = build._load()  # pylint: disable=protected-access
  assert status.available and str(planted_path) in status.reason
  assert marker.exists() and not compiled  # The control: a loaded library runs its code.


@pytest.mark.parametrize('fault', ['folder_world_writable', 'root_group_writable',
                                   'file_world_writable', 'folder_other_owner',
                                   'file_other_owner', 'file_is_symlink'])
def test_a_planted_library_in_an_unsafe_cache_never_runs(setup, fault, capfd):
  root, planted_path, marker, compiled, scratch = setup
  _plant(planted_path, marker, scratch)
  os.chmod(root, 0o700)
  os.chmod(planted_path.parent, 0o700)
  os.chmod(planted_path, 0o755)
  if fault == 'folder_world_writable':
    os.chmod(planted_path.parent, 0o777)
  elif fault == 'root_group_writable':
    os.chmod(root, 0o770)
  elif fault == 'file_world_writable':
    os.chmod(planted_path, 0o777)
  elif fault == 'folder_other_owner':
    os.chown(planted_path.parent, 12345, 12345) if os.getuid() == 0 else pytest.skip('needs root')
  elif fault == 'file_other_owner':
    os.chown(planted_path, 12345, 12345) if os.getuid() == 0 else pytest.skip('needs root')
  elif fault == 'file_is_symlink':
    elsewhere = scratch / 'elsewhere.so'
    planted_path.rename(elsewhere)
    planted_path.symlink_to(elsewhere)
  status = build._load()  # pylint: disable=protected-access
  assert not marker.exists(), 'the planted library was loaded'
  err = capfd.readouterr().err
  if fault.startswith('file'):  # A safe folder, an unsafe file in it: not loaded, fall back.
    assert not status.available and 'not loading' in status.reason
  else:  # An unsafe folder: built privately for this process, with one note.
    assert status.available and str(planted_path) not in status.reason
    assert len(compiled) == 1 and compiled[0].parent != planted_path.parent
    assert err.count('not using the kernel cache') == 1


def test_new_cache_folders_are_private(setup):
  root, planted_path, marker, compiled, _ = setup
  status = build._load()  # pylint: disable=protected-access
  assert status.available and compiled == [planted_path]
  assert (root.stat().st_mode & 0o777) == 0o700
  assert (planted_path.parent.stat().st_mode & 0o777) == 0o700


def test_a_cached_library_that_does_not_load_is_rebuilt_once(setup, capfd):
  root, planted_path, marker, compiled, _ = setup
  planted_path.parent.mkdir(parents=True, mode=0o700)
  os.chmod(root, 0o700)
  planted_path.write_bytes(b'\x7fELF truncated by a full disk')
  os.chmod(planted_path, 0o755)
  status = build._load()  # pylint: disable=protected-access
  assert status.available and compiled == [planted_path]
  assert capfd.readouterr().err.count('rebuilding them once') == 1


def test_a_failed_build_is_remembered_and_a_hung_compiler_stopped(setup, monkeypatch):
  root, planted_path, marker, compiled, _ = setup
  calls = []

  def hung(*args, **kwargs):
    calls.append(kwargs.get('timeout'))
    raise subprocess.TimeoutExpired(args[0], kwargs.get('timeout'))

  monkeypatch.undo()  # Back to the real _compile, with a compiler that "hangs".
  monkeypatch.setenv('BCJAX_CACHE_DIR', str(root))
  onednn = build.OneDnnInstall(root.parent, root.parent, '3.0.0')
  monkeypatch.setattr(build, 'find_onednn', lambda roots=None: onednn)
  monkeypatch.setattr(build, '_compiler', lambda: '/usr/bin/true-cxx')
  monkeypatch.setattr(build.subprocess, 'run', hung)
  first = build._load()  # pylint: disable=protected-access
  assert not first.available and 'ran past' in first.reason
  assert calls == [build.COMPILE_TIMEOUT_S]
  second = build._load()  # pylint: disable=protected-access
  assert not second.available and 'earlier build with the same inputs failed' in second.reason
  assert len(calls) == 1  # Not retried on the next start.
