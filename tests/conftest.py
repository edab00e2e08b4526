"""Shared test set-up: repo root on sys.path, the real-data location, markers.

The real PBC folder is found at ``$BCJAX_PBC_DIR`` or beside the checkout at
``../shared/data/PBC_dataset_normal_DIB``; tests marked ``real_data`` skip
cleanly when it is absent. Multi-device tests run JAX in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (see ``run_with_devices``),
so the device count of this process never depends on test order.
"""

import os
import pathlib
import subprocess
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


@pytest.fixture(scope='session')
def pbc_dir() -> pathlib.Path:
  path = real_pbc_dir()
  if path is None:
    pytest.skip('real PBC data not found (set BCJAX_PBC_DIR)')
  return path


def run_with_devices(code: str, num_devices: int = 4, timeout: int = 600,
                     env: dict | None = None) -> subprocess.CompletedProcess:
  """Runs Python ``code`` in a fresh interpreter with ``num_devices`` CPU devices."""
  full_env = dict(os.environ)
  full_env['XLA_FLAGS'] = (full_env.get('XLA_FLAGS', '') +
                           f' --xla_force_host_platform_device_count={num_devices}').strip()
  full_env['PYTHONPATH'] = str(ROOT) + os.pathsep + full_env.get('PYTHONPATH', '')
  full_env.update(env or {})
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
  if result.returncode != 0:
    raise AssertionError(f'subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr}')
  return result


def override(config, **dotted):
  """Sets config fields by dotted name: override(c, **{'optimizer.name': 'sgd'})."""
  for name, value in dotted.items():
    node = config
    *path, last = name.split('.')
    for part in path:
      node = node[part]
    node[last] = value
  return config
