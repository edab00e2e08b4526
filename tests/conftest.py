"""Shared test set-up: repo root on sys.path, the real-data location, markers.

The real PBC folder is found at ``$BCJAX_PBC_DIR`` or beside the checkout at
``../shared/data/PBC_dataset_normal_DIB``, another lab's cells at
``$BCJAX_OTHER_LAB_DIR`` or in ``other_labs/chulalongkorn_wbc`` beside the PBC
folder; tests marked ``real_data`` skip cleanly when they are absent. Multi-device tests run JAX in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (tests/test_parallel.py),
so the device count of this process never depends on test order.

``reference_flips`` and ``assert_the_step_flips`` check training batches
against the one flip / rotation implementation, the train step's
(bcjax/augment.py), with NumPy as the reference.
"""

import os
import pathlib
import sys

import numpy as np
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


def reference_flips(images, draws, flips: bool, rot90: bool) -> np.ndarray:
  """NumPy reference of ``augment.apply``: per image flip left-right, flip up-down, turn."""
  out = []
  for image, (left_right, up_down, turns) in zip(np.asarray(images), np.asarray(draws)):
    if flips and left_right:
      image = image[:, ::-1]
    if flips and up_down:
      image = image[::-1]
    if rot90:
      image = np.rot90(image, turns)
    out.append(image)
  return np.stack(out)


def assert_the_step_flips(images, labels) -> None:
  """The train step, given uint8 ``images [1, b, S, S, 3]``, trains on their reference flips.

  One step of the tiny CNN (flips and rotations on, no dropout) on the uint8
  batch must match the step on the float batch of ``reference_flips`` of the
  step's own draws (a float batch is taken as it is), and must not match the
  step on the same pixels unflipped. SGD, not Adam: Adam's first step is
  about ``lr * sign(g)``, so a gradient near zero turns float round-off into
  a full step of either sign.
  """
  # pylint: disable=g-import-not-at-top  (JAX and the models: only for the tests that call it)
  import jax
  from bcjax import augment, models, optim, parallel, steps, train_state
  from configs import cnn
  images, labels = np.asarray(images), np.asarray(labels)
  assert images.dtype == np.uint8 and images.shape[0] == 1, (images.dtype, images.shape)
  config = override(cnn.get_config('tiny'), **{
      'image_size': images.shape[2], 'batch_size': images.shape[1],
      'data.augment.flips': True, 'data.augment.rot90': True,
      'model.dropout_conv': 0.0, 'model.dropout_dense': 0.0,
      'optimizer.name': 'sgd', 'optimizer.learning_rate': 0.1})
  runner = parallel.make_runner(config, models.build_model(config, axis_name=steps.AXIS))
  tx, _ = optim.make(config, steps_per_epoch=4)
  start = train_state.create(config, jax.random.key(0), tx)
  key = jax.random.key(7)
  step_key = jax.random.fold_in(jax.random.fold_in(key, 0), 0)  # Step 0, device 0.
  d = augment.draws(jax.random.fold_in(step_key, augment.STREAM), images.shape[1])
  flipped = reference_flips(images[0], d, True, True)[None]
  assert not np.array_equal(flipped, images)  # The draws move some image.

  def step(batch_images):
    state, metrics = runner.train_step(runner.put_state(start),
                                       runner.put_batch({'image': batch_images, 'label': labels}),
                                       key)
    return runner.get_metrics(metrics), jax.device_get(runner.get_state(state).params)

  def as_float(x):
    return np.asarray(augment.to_float(x))  # The step's own scaling.

  got, want, unflipped = step(images), step(as_float(flipped)), step(as_float(images))
  assert got[0] == pytest.approx(want[0], rel=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got[1], want[1])
  assert got[0]['loss_sum'] != pytest.approx(unflipped[0]['loss_sum'], rel=1e-6)
