"""Config values checked before any work: one line naming the field and what it may be.

A mistyped value must not cost an epoch: ``eval_every_epochs=0`` would
divide by zero after the first epoch, before its checkpoint is saved, and a
negative learning rate trains to nonsense. :func:`check` runs first in every
mode (``launch.py``) and at the top of ``train.train_and_evaluate``::

    config_checks.check(config)                      # UserError on the first bad field
    config_checks.check_classes(config, info.class_names)   # after the data is described

Names looked up in registries (model, optimiser, schedule, runner) are
checked by their registries with the same one-line error; this module checks
the values no registry owns. Model fields other than the lowering are the
models' own (bcjax/models), except that any ``dropout*`` rate must lie in
[0, 1).
"""

import math
from typing import Any

from bcjax.errors import UserError

# Counts and periods that must be whole numbers >= 1.
POSITIVE_INTS = ('num_epochs', 'image_size', 'batch_size', 'eval_batch_size', 'num_classes',
                 'log_every_steps', 'eval_every_epochs', 'checkpoint_every_epochs',
                 'keep_checkpoints', 'data.synthetic_examples', 'data.shuffle_buffer')
NON_NEGATIVE_INTS = ('microbatch_size', 'data.prefetch', 'seed', 'data.seed')
# (field, low, high, high included): rates and fractions.
RANGES = (
    ('optimizer.learning_rate', 0.0, math.inf, False),
    ('optimizer.b1', 0.0, 1.0, False),
    ('optimizer.b2', 0.0, 1.0, False),
    ('optimizer.momentum', 0.0, 1.0, False),
    ('optimizer.weight_decay', 0.0, math.inf, False),
    ('optimizer.grad_clip_norm', 0.0, math.inf, False),
    ('schedule.warmup_epochs', 0.0, math.inf, False),
    ('label_smoothing', 0.0, 1.0, False),
    ('ema_decay', 0.0, 1.0, False),
    ('data.device_memory_mb', 0.0, math.inf, False),
    ('data.augment.stain', 0.0, 1.0, False),
    ('data.augment.mixup_alpha', 0.0, math.inf, False),
    ('data.augment.translate', 0.0, 0.5, True),
    ('data.augment.blur', 0.0, 0.1, True),
    ('data.augment.brightness', 0.0, 1.0, True),
    ('data.augment.contrast', 0.0, 1.0, True),
    ('data.augment.saturation', 0.0, 1.0, True),
    ('data.augment.hue', 0.0, 0.5, True),
    ('data.augment.gamma', 0.0, 2.0, True),
    ('data.augment.grayscale', 0.0, 1.0, True),
    ('data.augment.noise', 0.0, 1.0, True),
    ('data.augment.domain_prob', 0.0, 1.0, True),
    ('distill.weight', 0.0, 1.0, True),
)
DTYPES = ('float32', 'bfloat16')
PARALLEL = ('pmap', 'shard_map')


def _get(config, dotted: str) -> Any:
  node = config
  for part in dotted.split('.'):
    if part not in node:
      return None
    node = node[part]
  return node


def _choice(config, field: str, allowed) -> None:
  value = _get(config, field)
  if value not in allowed:
    raise UserError(f'config.{field}={value!r} is not known; allowed: {", ".join(allowed)}')


def check(config) -> None:
  """Raises a UserError naming the first field whose value cannot work."""
  for field in POSITIVE_INTS + NON_NEGATIVE_INTS:
    value = _get(config, field)
    if value is None:
      continue
    low = 1 if field in POSITIVE_INTS else 0
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      what = 'a whole number >= 1' if low else 'a whole number >= 0'
      raise UserError(f'config.{field}={value!r} must be {what}')
  for field, low, high, high_ok in RANGES:
    value = _get(config, field)
    if value is None:
      continue
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and low <= value and (value < high or
                                                         (high_ok and value == high)))
    if field == 'optimizer.learning_rate' and ok:
      ok = value > 0
    if not ok:
      bound = f'<= {high:g}' if high_ok else (f'< {high:g}' if math.isfinite(high) else '')
      low_text = '> 0' if field == 'optimizer.learning_rate' else f'>= {low:g}'
      raise UserError(f'config.{field}={value!r} must be {low_text}'
                      + (f' and {bound}' if bound else ''))
  for name, value in (config.model.items() if 'model' in config else ()):
    if name.startswith('dropout') and isinstance(value, (int, float)) and not 0 <= value < 1:
      raise UserError(f'config.model.{name}={value!r} must be a rate in [0, 1)')
  check_fractions(config.data.train_fraction, config.data.val_fraction)
  _choice(config, 'dtype', DTYPES)
  from bcjax.data import spec  # pylint: disable=g-import-not-at-top  (bcjax.data: JAX, import late)
  _choice(config, 'data.source', tuple(spec.SOURCES))
  _choice(config, 'parallel', PARALLEL)
  from bcjax.data import resident  # pylint: disable=g-import-not-at-top
  _choice(config, 'data.placement', resident.PLACEMENTS)
  from bcjax.models import layers  # pylint: disable=g-import-not-at-top  (JAX: import late)
  _choice(config, 'model.conv_impl', layers.IMPLS)
  from bcjax.models import cnn_lstm  # pylint: disable=g-import-not-at-top
  if _get(config, 'model.norm') is not None:
    _choice(config, 'model.norm', cnn_lstm.NORMS)
  if _get(config, 'model.input_norm') is not None:
    _choice(config, 'model.input_norm', cnn_lstm.INPUT_NORMS)
  if _get(config, 'model.head_norm') is not None:
    _choice(config, 'model.head_norm', cnn_lstm.HEAD_NORMS)
  zoom = _get(config, 'data.augment.zoom')
  if zoom is not None and not (len(zoom) == 2 and 0 < zoom[0] <= zoom[1] <= 8):
    raise UserError(f'config.data.augment.zoom={tuple(zoom)!r} must be (low, high) with '
                    '0 < low <= high <= 8, e.g. (0.5, 2.0); (1.0, 1.0) is off')
  from bcjax import profiling  # pylint: disable=g-import-not-at-top
  profiling.check(config.get('profile_steps', ()))
  if config.data.source in ('bloodmnist', 'packed') and not config.data.path:
    raise UserError(f'config.data.source={config.data.source!r} needs config.data.path '
                    '(the .npz file or folder to read)')
  if str(_get(config, 'distill.teachers') or '').strip() and config.data.placement == 'stream':
    raise UserError("config.distill.teachers needs the training split on the devices: set "
                    "config.data.placement to 'device' or 'auto' (bcjax/distill.py)")


def check_fractions(train_fraction, val_fraction) -> None:
  """Every split must get images: 0 < train, 0 < validation, train + validation < 1."""
  ok = all(isinstance(x, (int, float)) and not isinstance(x, bool)
           for x in (train_fraction, val_fraction))
  if not (ok and 0 < train_fraction < 1 and 0 < val_fraction < 1
          and train_fraction + val_fraction < 1):
    raise UserError(
        f'config.data.train_fraction={train_fraction!r} and config.data.val_fraction='
        f'{val_fraction!r} must each be in (0, 1) and leave a test split (train + val < 1)')


def check_classes(config, class_names) -> None:
  """``config.num_classes`` must be the data's number of classes."""
  if config.num_classes != len(class_names):
    raise UserError(f'config.num_classes={config.num_classes} but the data has '
                    f'{len(class_names)} classes ({", ".join(class_names)}); set '
                    f'--config.num_classes={len(class_names)}')
