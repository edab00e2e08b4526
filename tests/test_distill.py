"""Distillation (bcjax/distill.py): the teachers' targets, and the step that trains toward them.

* the step's target row is ``(1 - w) * label target + w * teacher row``
  (checked against a loss made by hand);
* a teacher's probabilities for the resident training images are its
  evaluation of the train split, image for image, and with TTA they are the
  same for every flip / rotation of an image (what makes offline targets exact
  for that augmentation);
* a distilled run trains on the device path under pmap and shard_map, and a
  streamed one is refused in one line.
"""

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bcjax import distill, models, optim, steps, train_state  # pylint: disable=wrong-import-position
from bcjax.errors import UserError  # pylint: disable=wrong-import-position


def tiny_config(**overrides):
  from conftest import override
  from configs import cnn
  config = cnn.get_config('tiny')
  config.image_size = 16
  return override(config, **overrides)


def test_the_step_pulls_each_target_toward_its_teacher_row():
  config = tiny_config(**{'model.dropout_conv': 0.0, 'model.dropout_dense': 0.0})
  tx, _ = optim.make(config, 10)
  state = train_state.create(config, jax.random.key(0), tx)
  model = models.build_model(config, axis_name=steps.AXIS)
  rng = np.random.default_rng(0)
  images = rng.random((1, 6, 16, 16, 3), np.float32)
  labels = rng.integers(0, 8, (1, 6)).astype(np.int32)
  teacher = rng.dirichlet(np.ones(8), (1, 6)).astype(np.float32)
  key = jax.random.key(1)
  stacked = jax.tree.map(lambda x: np.asarray(x)[None], state)

  def loss(batch, weight):
    step = jax.pmap(functools.partial(steps.train_step, model=model, label_smoothing=0.1,
                                      distill_weight=weight),
                    axis_name=steps.AXIS, devices=jax.devices()[:1])
    return float(step(stacked, batch, key[None])[1]['loss_sum'][0])

  got = loss({'image': images, 'label': labels, 'teacher': teacher}, 0.3)
  logits = model.apply(state.variables(), images[0], train=True, mutable=['batch_stats'])[0]
  target = 0.7 * steps.targets(labels[0], 8, 0.1) + 0.3 * teacher[0]
  want = float(jnp.sum(-(target * jax.nn.log_softmax(logits)).sum(-1)))
  assert got == pytest.approx(want, rel=1e-5)
  # The labels alone give another loss: the teacher rows did move the targets.
  alone = float(jnp.sum(-(steps.targets(labels[0], 8, 0.1) * jax.nn.log_softmax(logits)).sum(-1)))
  assert alone != pytest.approx(got, rel=1e-3)


def test_no_teachers_named_is_none():
  assert distill.teachers(tiny_config()) == []
  assert distill.teachers(tiny_config(**{'distill.teachers': ' a, b ,'})) == ['a', 'b']


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
  from bcjax import train
  workdir = str(tmp_path_factory.mktemp('distill') / 'teacher')
  train.train_and_evaluate(tiny_config(**{'num_epochs': 2}), workdir)
  return workdir


@pytest.mark.slow
def test_teacher_probabilities_are_its_evaluation_and_invariant_under_tta(teacher):
  from bcjax import data, evaluate
  config = tiny_config(**{'distill.tta': False})
  images, _ = data.train_pixels(config)
  probs = distill.teacher_probabilities(config, [teacher, teacher], images, progress=False)
  result = evaluate.collect_workdir(config, teacher, split='train')[0]
  np.testing.assert_allclose(probs, result.probs, atol=1e-5)
  np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
  config.distill.tta = True
  with_tta = distill.teacher_probabilities(config, [teacher], images, progress=False)
  turned = distill.teacher_probabilities(config, [teacher], np.ascontiguousarray(
      np.rot90(images[:, ::-1], 1, axes=(1, 2))), progress=False)
  np.testing.assert_allclose(with_tta, turned, atol=1e-5)
  assert np.abs(with_tta - probs).max() > 1e-4  # TTA did average other views.
  with pytest.raises(UserError, match='teacher .* reads 16 px images'):
    distill.teacher_probabilities(tiny_config(**{'image_size': 32}), [teacher],
                                  np.zeros((2, 32, 32, 3), np.uint8), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize('parallel', ['pmap', 'shard_map'])
def test_a_distilled_run_trains_on_the_device_path(teacher, tmp_path, capsys, parallel):
  from bcjax import train
  config = tiny_config(**{'distill.teachers': teacher, 'data.placement': 'device',
                          'parallel': parallel})
  metrics = train.train_and_evaluate(config, str(tmp_path / 'student'))
  assert 'distilling from 1 teacher(s)' in capsys.readouterr().out
  assert 0.0 <= metrics['accuracy'] <= 1.0
  with pytest.raises(UserError, match="distill.teachers needs the training split on the devices"):
    train.train_and_evaluate(tiny_config(**{'distill.teachers': teacher}), str(tmp_path / 's2'))
