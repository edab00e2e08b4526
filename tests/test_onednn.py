"""The oneDNN convolution kernels: build, cache, fallback, and the custom VJP's HLO.

Their numbers are checked against XLA's native convolution in test_models.py
(every lowering, forward and all three gradients) and, under pmap / shard_map
on four devices, in test_parallel.py.
"""

import pathlib
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax.errors import UserError
from bcjax.models import layers
from bcjax.onednn import build
from bcjax.onednn import conv as onednn_conv

needs_kernels = pytest.mark.skipif(not build.available(), reason=build.status().reason)


def test_kernels_build_wherever_their_inputs_exist():
  """Where oneDNN 3 and a compiler are present (as after `pip install .` on Linux x86-64), they build."""
  if sys.platform != 'linux' or platform.machine() != 'x86_64':
    pytest.skip('kernels are built for Linux x86-64')
  if build.find_onednn() is None or build._compiler() is None:  # pylint: disable=protected-access
    pytest.skip(build.status().reason)
  assert build.available(), build.status().reason


@needs_kernels
@pytest.mark.slow
def test_build_is_cached_by_the_hash_of_its_inputs(tmp_path, monkeypatch):
  onednn, compiler = build.find_onednn(), build._compiler()  # pylint: disable=protected-access
  monkeypatch.setenv('BCJAX_CACHE_DIR', str(tmp_path))
  first = build.build(onednn, compiler)
  assert first.parent == tmp_path / 'onednn' and first.exists()
  stamp = first.stat().st_mtime_ns
  assert build.build(onednn, compiler) == first and first.stat().st_mtime_ns == stamp
  edited = tmp_path / 'conv.cc'
  edited.write_text(build.SOURCE.read_text() + '\n// an edit\n')
  monkeypatch.setattr(build, 'SOURCE', edited)
  second = build.build(onednn, compiler)
  assert second != first and second.exists()
  assert not list(tmp_path.glob('onednn/*.tmp'))


def test_a_failed_build_says_why(tmp_path, monkeypatch):
  monkeypatch.setenv('BCJAX_CACHE_DIR', str(tmp_path))
  broken = tmp_path / 'conv.cc'
  broken.write_text('this is not C++\n')
  monkeypatch.setattr(build, 'SOURCE', broken)
  fake = build.OneDnnInstall(tmp_path, tmp_path, '3.0.0')
  compiler = build._compiler() or pytest.skip('no compiler')  # pylint: disable=protected-access
  with pytest.raises(RuntimeError, match='failed'):
    build.build(fake, compiler)
  # Only the remembered failure is left (no library, no temporary file) ...
  assert [p.suffix for p in tmp_path.glob('onednn/*')] == ['.failed']
  # ... and the same inputs do not compile again.
  monkeypatch.setattr(build, '_compile', lambda *a: pytest.fail('compiled again'))
  with pytest.raises(RuntimeError, match='earlier build with the same inputs failed'):
    build.build(fake, compiler)


def test_turned_off_falls_back_to_matmul_and_an_explicit_request_is_one_error(monkeypatch):
  monkeypatch.setenv('BCJAX_ONEDNN', '0')
  build.status.cache_clear()
  try:
    assert not build.available() and 'BCJAX_ONEDNN=0' in build.status().reason
    assert layers.resolve_impl('auto') == 'matmul'
    with pytest.raises(UserError, match="conv_impl='onednn': turned off") as e:
      layers.resolve_impl('onednn')
    assert '\n' not in str(e.value)
  finally:
    monkeypatch.delenv('BCJAX_ONEDNN')
    build.status.cache_clear()
  build.status()  # Registers the kernels again (a no-op for XLA) for the tests after this.


def _fake_install(root: pathlib.Path, major: int, lib: str = 'lib') -> pathlib.Path:
  (root / 'include' / 'oneapi' / 'dnnl').mkdir(parents=True)
  (root / 'include' / 'oneapi' / 'dnnl' / 'dnnl_version.h').write_text(
      f'#define DNNL_VERSION_MAJOR {major}\n#define DNNL_VERSION_MINOR 2\n'
      '#define DNNL_VERSION_PATCH 1\n')
  (root / lib).mkdir(parents=True)
  (root / lib / f'libdnnl.so.{major}').write_bytes(b'')
  return root


def test_find_onednn_wants_version_3_headers_and_library(tmp_path):
  old = _fake_install(tmp_path / 'old', 2)  # Debian bookworm's libdnnl-dev is 2.x.
  new = _fake_install(tmp_path / 'new', 3, lib='lib64')
  assert build.find_onednn([tmp_path / 'nothing', old]) is None
  found = build.find_onednn([old, new])
  assert found == build.OneDnnInstall(new / 'include', new / 'lib64', '3.2.1')


@needs_kernels
def test_unused_input_gradient_is_never_computed():
  """The first layer's input gradient (the image's) is dead code XLA removes."""
  x, b = jnp.ones((2, 8, 8, 3)), jnp.ones(4)
  grad = jax.jit(jax.grad(lambda k: onednn_conv.conv(x, k, b, ((1, 1), (1, 1))).sum()))
  hlo = grad.lower(jnp.ones((3, 3, 3, 4))).compile().as_text()
  assert build.TARGETS['BcjaxConvBackwardWeights'] in hlo
  assert build.TARGETS['BcjaxConvBackwardData'] not in hlo


@needs_kernels
def test_asymmetric_padding_and_a_scan_body():
  """Padding pairs are passed through as given, and the op runs inside lax.scan (microbatches)."""
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.standard_normal((3, 2, 6, 5, 2)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 3, 2, 4)), jnp.float32)
  b = jnp.asarray(rng.standard_normal(4), jnp.float32)
  pads = ((0, 1), (2, 0))

  def body(carry, x):
    return carry, onednn_conv.conv(x, k, b, pads)

  _, ys = jax.lax.scan(body, 0, xs)
  ref = jax.vmap(lambda x: jax.lax.conv_general_dilated(
      x, k, (1, 1), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      precision='highest') + b)(xs)
  np.testing.assert_allclose(ys, ref, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_float32_only_other_dtypes_take_the_matmul_path():
  x = jnp.ones((1, 5, 5, 2), jnp.bfloat16)
  conv = layers.Conv(3, (3, 3), impl='onednn', dtype=jnp.bfloat16)
  variables = conv.init(jax.random.key(0), x)
  hlo = jax.jit(conv.apply).lower(variables, x).as_text()
  assert 'bcjax_onednn' not in hlo
  assert conv.apply(variables, x).dtype == jnp.bfloat16


def test_source_ships_with_the_package():
  assert build.SOURCE.is_file() and build.SOURCE.parent == pathlib.Path(build.__file__).parent


def test_missing_kernels_are_said_once_on_stderr(monkeypatch, capsys):
  monkeypatch.setattr(build, 'find_onednn', lambda roots=None: None)
  build.status.cache_clear()
  try:
    if sys.platform != 'linux' or platform.machine() != 'x86_64':
      pytest.skip('no warning where the kernels are not meant to build')
    assert not build.available() and not build.available()  # Cached: said once.
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'oneDNN convolutions unavailable (oneDNN 3 not found' in err
    assert layers.resolve_impl('auto') == 'matmul'
  finally:
    monkeypatch.undo()
    build.status.cache_clear()
  build.status()
