"""Distillation targets: an ensemble's probabilities for every training image, made once.

An ensemble of three seeds with test-time augmentation beats each of its
members (docs/results.md); distillation trains one model
toward the ensemble's answers, so one forward pass keeps part of that gain.
``config.distill.teachers`` names trained workdirs; before the first step
the trainer runs them over this process's resident training images::

    probs = distill.teacher_probabilities(config, teachers, images_uint8)   # [n, C]
    feed = resident.ResidentTrain(config, runner, images, labels, ..., teacher=probs)

and every step's target row becomes ``(1 - w) * label_target + w *
teacher_row`` (``w = config.distill.weight``, bcjax/steps.py), the teacher
row gathered by the same index as the image.

Why offline, once, and not the teachers inside every step: the teachers
would cost three more forward passes per step. With ``config.distill.tta``
each teacher's probabilities are averaged over the 8 flips and 90-degree
rotations, so they are the same for every view those augmentations give the
student: for them the offline target is exact. Stain jitter is not (its
colours are drawn per step); mixup blends the teacher rows with the images.
Only the device path (``config.data.placement``) holds the training split
in a fixed order whose rows the step can name, so distillation needs it.

The teachers are trained on the training split only, like the student, so
the validation split stays unseen by both.
"""

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from bcjax import augment, ensemble_members, models, steps, train_state
from bcjax.errors import UserError


def teachers(config: ml_collections.ConfigDict) -> list[str]:
  """The teacher workdirs ``config.distill.teachers`` names ('' or absent: none)."""
  distill = config.get('distill')
  names = str(distill.get('teachers', '')) if distill is not None else ''
  return [t.strip() for t in names.split(',') if t.strip()]


@functools.partial(jax.jit, static_argnames=('model', 'tta'))
def _probs(model, variables, images_uint8: jax.Array, tta: bool) -> jax.Array:
  images = augment.to_float(images_uint8)
  return jnp.exp(steps.predict_log_probs(model, variables, images, tta))


def teacher_probabilities(config: ml_collections.ConfigDict, workdirs: Sequence[str],
                          images: np.ndarray, *, class_names: Sequence[str] | None = None,
                          batch_size: int | None = None, progress: bool = True) -> np.ndarray:
  """The teachers' mean class probabilities for ``images`` (uint8 [n, S, S, 3]): float32 [n, C].

  Each teacher is rebuilt from its own ``config.json`` (bcjax/ensemble_members.py)
  and its best checkpoint (the weight average where that validated better);
  it must read this config's image size and classes (``class_names``, the
  data's, when given).
  """
  if images.dtype != np.uint8:
    raise ValueError(f'teacher images must be uint8, got {images.dtype}')
  batch_size = batch_size or int(config.eval_batch_size)
  tta = bool(config.distill.get('tta', True))
  total = np.zeros((len(images), config.num_classes), np.float64)
  bar = tqdm.tqdm(total=len(workdirs) * len(images), unit='img', leave=False,
                  desc='teacher probabilities', disable=not progress)
  for workdir in workdirs:
    teacher = ensemble_members.member_config(config, workdir)
    if teacher.image_size != config.image_size or teacher.num_classes != config.num_classes:
      raise UserError(f'teacher {workdir} reads {teacher.image_size} px images into '
                      f'{teacher.num_classes} classes; this run needs {config.image_size} px '
                      f'and {config.num_classes}')
    state, meta, _, _ = train_state.load_for_inference(teacher, workdir)
    if class_names is not None:
      train_state.check_class_names(meta, class_names)
    model = models.build_model(teacher)
    variables = jax.device_put(state.variables())
    for start in range(0, len(images), batch_size):
      chunk = images[start:start + batch_size]
      total[start:start + len(chunk)] += np.asarray(_probs(model, variables, chunk, tta))
      bar.update(len(chunk))
  bar.close()
  return (total / len(workdirs)).astype(np.float32)
