"""Shared test set-up: repo root on sys.path, the real-data location, markers.

The real PBC folder is found at ``$BCJAX_PBC_DIR`` or beside the checkout at
``../shared/data/PBC_dataset_normal_DIB``, another lab's cells at
``$BCJAX_OTHER_LAB_DIR`` or in ``other_labs/chulalongkorn_wbc`` beside the PBC
folder; tests marked ``real_data`` skip cleanly when they are absent. Multi-device tests run JAX in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (tests/test_parallel.py),
so the device count of this process never depends on test order.
"""

import os
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def real_pbc_dir() -> pathlib.Path | None:
  env = os.environ.get('BCJAX_PBC_DIR')
  candidates = [pathlib.Path(env)] if env else []
  candidates.append(ROOT.parent / 'shared' / 'data' / 'PBC_dataset_normal_DIB')
  for c in candidates:
    if c.is_dir() and any(c.iterdir()):
      return c
  return None


def other_lab_dir() -> pathlib.Path | None:
  """Another lab's cells (Chulalongkorn) beside the PBC folder, or at ``$BCJAX_OTHER_LAB_DIR``."""
  env = os.environ.get('BCJAX_OTHER_LAB_DIR')
  candidates = [pathlib.Path(env)] if env else []
  pbc = real_pbc_dir()
  if pbc is not None:
    candidates.append(pbc.parent / 'other_labs' / 'chulalongkorn_wbc')
  candidates.append(ROOT.parent / 'shared' / 'data' / 'other_labs' / 'chulalongkorn_wbc')
  for c in candidates:
    if c.is_dir() and any(c.iterdir()):
      return c
  return None


@pytest.fixture(scope='session')
def pbc_dir() -> pathlib.Path:
  path = real_pbc_dir()
  if path is None:
    pytest.skip('real PBC data not found (set BCJAX_PBC_DIR)')
  return path


@pytest.fixture(scope='session')
def other_lab() -> pathlib.Path:
  path = other_lab_dir()
  if path is None:
    pytest.skip("another lab's folder not found (set BCJAX_OTHER_LAB_DIR)")
  return path


def override(config, **dotted):
  """Sets config fields by dotted name: override(c, **{'optimizer.name': 'sgd'})."""
  for name, value in dotted.items():
    node = config
    *path, last = name.split('.')
    for part in path:
      node = node[part]
    node[last] = value
  return config
