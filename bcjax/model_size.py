"""How much memory a config's model needs, known before anything is initialised.

An image size the model cannot take fails deep in a layer (a pooled map of
size 0, a dense layer of no inputs: ``ZeroDivisionError``), and one far too
large makes initialisation allocate for minutes before anything is printed
(``image_size=6400`` gives the Table 1 CNN 10.5 B parameters). Both are
known from shapes alone: :func:`estimate` traces the model with
``jax.eval_shape`` (nothing is computed or allocated) and :func:`check`
refuses, in one line naming the limit, a size the model cannot take or whose
estimate exceeds the memory of the machine (its accelerator's, or the host's
for CPU devices)::

    found = model_size.check(config, training=True)   # a UserError, or:
    print(found.describe())   # '822,792 parameters: 13 MiB with ..., activations 25 MiB ...'

The estimate is a floor, not a prediction: parameters in float32 with their
gradients and optimiser state (and the moving average with
``config.ema_decay``), plus every layer's output for the per-device batch
(twice in training: kept for the backward pass, and its gradient). Temporary
buffers of XLA's own come on top, so a refused size never fits, while an
accepted one may still be tight.
"""

import dataclasses
import math
import os

import jax
import ml_collections

from bcjax.errors import UserError

_MAX_PROBE = 8192  # The largest size tried when looking for the smallest one a model takes.
_SIZE_ERRORS = (ZeroDivisionError, TypeError, ValueError, IndexError)


@dataclasses.dataclass(frozen=True)
class Estimate:
  """Memory of one device's share of the model, in bytes."""
  params: int
  batch_stats: int
  state_bytes: int  # Parameters, gradients, optimiser slots, EMA, BatchNorm statistics.
  activation_bytes: int
  batch: int  # Images per device the activations are for.
  devices_sharing: int  # Devices that share the memory compared with (CPU: all of them).
  training: bool
  slots: str  # What ``state_bytes`` holds besides the parameters.

  @property
  def total(self) -> int:
    return (self.state_bytes + self.activation_bytes) * self.devices_sharing

  def describe(self) -> str:
    return (f'{self.params:,} parameters: {_bytes(self.state_bytes)} {self.slots}; '
            f'activations {_bytes(self.activation_bytes)} at {self.batch} image(s) per device'
            + (f', x {self.devices_sharing} devices' if self.devices_sharing > 1 else ''))


def _bytes(n: float) -> str:
  for unit, size in (('TiB', 2**40), ('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if n >= size:
      return f'{n / size:.1f} {unit}'
  return f'{int(n)} B'


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def _shape_config(config: ml_collections.ConfigDict, image_size: int) -> ml_collections.ConfigDict:
  """``config`` at ``image_size`` with XLA's own lowering: the same shapes, nothing to build."""
  copy = ml_collections.ConfigDict(config.to_dict())
  copy.image_size = image_size
  if 'conv_impl' in copy.model:
    copy.model.conv_impl = 'native'
  return copy


def _layers(config: ml_collections.ConfigDict, image_size: int):
  """(rows, variables) of ``bcjax.summary.layer_rows``; a _SIZE_ERRORS or ValueError if none."""
  from bcjax import summary  # pylint: disable=g-import-not-at-top  (flax: import late)
  rows, variables = summary.layer_rows(_shape_config(config, image_size))
  empty = [r for r in rows if any(d == 0 for d in r.shape[1:])]
  if empty:
    raise ValueError(f'{"/".join(empty[0].path)} has output shape {empty[0].shape}')
  return rows, variables


def smallest_size(config: ml_collections.ConfigDict, above: int) -> int | None:
  """The smallest image size above ``above`` that the model takes, or None up to _MAX_PROBE."""
  def takes(size: int) -> bool:
    try:
      _layers(config, size)
    except _SIZE_ERRORS:
      return False
    return True

  low, high = above, above + 1
  while not takes(high):
    low, high = high, high * 2
    if high > _MAX_PROBE:
      return None
  while high - low > 1:  # Pooling floors: every size from the smallest one on works.
    mid = (low + high) // 2
    low, high = (low, mid) if takes(mid) else (mid, high)
  return high


def _optimizer_slots(config) -> tuple[int, str]:
  name = config.optimizer.name
  slots, words = 1, ['gradients']
  if name in ('adam', 'adamw'):
    slots, words = slots + 2, words + [f"{name}'s two moments"]
  elif name == 'sgd' and config.optimizer.momentum > 0:
    slots, words = slots + 1, words + ['momentum']
  if config.get('ema_decay', 0.0) > 0:
    slots, words = slots + 1, words + ['the moving average']
  return slots, 'with ' + (', '.join(words[:-1]) + ' and ' + words[-1] if len(words) > 1
                          else words[0])


def estimate(config: ml_collections.ConfigDict, *, training: bool,
             device_count: int | None = None) -> Estimate:
  """The model's memory at ``config.image_size``; a UserError if it cannot take that size."""
  size = config.image_size
  try:
    rows, variables = _layers(config, size)
  except _SIZE_ERRORS as e:
    smallest = smallest_size(config, size)
    if smallest is None:
      raise
    raise UserError(
        f'config.image_size={size} is too small for model {config.model.name!r}: its '
        f'convolutions and poolings leave nothing of it ({type(e).__name__}: {str(e)[:80]}); '
        f'the smallest size it takes is {smallest}') from None
  params = _count(variables.get('params', {}))
  batch_stats = _count(variables.get('batch_stats', {}))
  slots, slot_words = _optimizer_slots(config) if training else (0, '')
  state = 4 * (params * (1 + slots) + batch_stats)
  devices = device_count or jax.device_count()
  batch_size = config.batch_size if training else config.eval_batch_size
  per_device = max(1, batch_size // devices)
  micro = config.get('microbatch_size', 0)
  if training and micro and micro < per_device:
    per_device = micro
  dtype_bytes = 2 if config.get('dtype') == 'bfloat16' else 4
  per_image = 3 * size * size * 4 + sum(math.prod(r.shape[1:]) for r in rows) * dtype_bytes
  activations = per_image * per_device * (2 if training else 1)
  on_cpu = jax.default_backend() == 'cpu'
  return Estimate(params, batch_stats, state, activations, per_device,
                  jax.local_device_count() if on_cpu else 1, training,
                  slot_words if training else 'for inference')


def machine_memory() -> tuple[int | None, str]:
  """(bytes, what they are) of the memory the estimate must fit in; None when unknown.

  An accelerator's own memory limit, else the host's physical memory or its
  cgroup's limit, whichever is smaller.
  """
  if jax.default_backend() != 'cpu':
    stats = jax.local_devices()[0].memory_stats() or {}
    limit = stats.get('bytes_limit')
    kind = jax.local_devices()[0].device_kind
    return (int(limit), f'{kind} memory') if limit else (None, '')
  try:
    total = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError, AttributeError):
    total = None
  for path in ('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory/memory.limit_in_bytes'):
    try:
      with open(path) as f:
        text = f.read().strip()
    except OSError:
      continue
    if text.isdigit() and (total is None or int(text) < total):
      total = int(text)
  return total, 'host memory'


def check(config: ml_collections.ConfigDict, *, training: bool,
          memory: tuple[int | None, str] | None = None) -> Estimate:
  """The estimate, or a UserError when the model cannot take the size or does not fit.

  ``memory`` is ``machine_memory()`` unless given (tests).
  """
  found = estimate(config, training=training)
  limit, what = memory or machine_memory()
  if limit and found.total > limit:
    batch_field = 'config.batch_size' if training else 'config.eval_batch_size'
    batch = config.batch_size if training else config.eval_batch_size
    raise UserError(
        f'model {config.model.name!r} at config.image_size={config.image_size} and '
        f'{batch_field}={batch} needs at least {_bytes(found.total)} ({found.describe()}), '
        f'more than the '
        f'{_bytes(limit)} of {what}; lower '
        + (f'{batch_field} or config.image_size' if found.activation_bytes > found.state_bytes
           else 'config.image_size'))
  return found
