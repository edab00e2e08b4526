"""Optimiser and learning-rate schedule from the config, with optax.

Both are looked up by name in explicit registries, so a wrong name is a
one-line :class:`~bcjax.errors.UserError` listing the known ones::

    tx, schedule = optim.make(config, steps_per_epoch=160)
    state = TrainState.create(apply_fn=None, params=params, tx=tx)

The chain is: clip by global norm (if ``grad_clip_norm > 0``) -> the
optimiser (with weight decay) at ``schedule(step)``. Weight decay is
decoupled for ``adamw`` and an L2 term added to the gradient for ``adam`` and
``sgd`` (what "Adam with weight decay" means in Keras and PyTorch); it applies
to kernels only (arrays of rank >= 2), never to biases or BatchNorm scales.

``config.optimizer.frozen`` (a parameter subtree, e.g. the hybrids'
``extractor``) zeroes that subtree's updates with ``optax.multi_transform``:
its parameters stay as initialised or loaded (``config.init``), and the
optimiser keeps no moments for them.
"""

from typing import Callable

import jax
import ml_collections
import optax
from flax import traverse_util

from bcjax.errors import UserError


def _constant(config, total_steps, warmup_steps):
  del total_steps, warmup_steps
  return optax.constant_schedule(config.optimizer.learning_rate)


def _warmup_cosine(config, total_steps, warmup_steps):
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.optimizer.learning_rate,
      warmup_steps=warmup_steps, decay_steps=max(total_steps, warmup_steps + 1),
      end_value=0.0)


SCHEDULES: dict[str, Callable] = {
    'constant': _constant,
    'warmup_cosine': _warmup_cosine,
}


def _kernel_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def _l2(o):
  if not o.weight_decay:
    return optax.identity()
  return optax.add_decayed_weights(o.weight_decay, mask=_kernel_mask)


def _adam(o, lr):
  return optax.chain(_l2(o), optax.adam(lr, b1=o.b1, b2=o.b2))


def _adamw(o, lr):
  return optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay,
                     mask=_kernel_mask)


def _sgd(o, lr):
  return optax.chain(_l2(o), optax.sgd(lr, momentum=o.momentum or None,
                                       nesterov=o.nesterov))


OPTIMIZERS: dict[str, Callable] = {
    'adam': _adam,
    'adamw': _adamw,
    'sgd': _sgd,
}


def _lookup(registry, name, what):
  if name not in registry:
    raise UserError(f'unknown {what} {name!r}; known: {", ".join(sorted(registry))}')
  return registry[name]


def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  total = config.num_epochs * steps_per_epoch
  warmup = int(round(config.schedule.warmup_epochs * steps_per_epoch))
  return _lookup(SCHEDULES, config.schedule.name, 'config.schedule.name')(config, total, warmup)


def _freeze_labels(path: str):
  """``params -> labels``: 'frozen' under ``path`` ('a/b'), 'trained' elsewhere."""
  prefix = tuple(p for p in path.split('/') if p)

  def labels(params):
    flat = traverse_util.flatten_dict(params)
    if not any(k[:len(prefix)] == prefix for k in flat):
      top = sorted({k[0] for k in flat})
      raise UserError(f'config.optimizer.frozen={path!r} names no parameters; the model has '
                      f'{", ".join(top)} at the top')
    return traverse_util.unflatten_dict(
        {k: 'frozen' if k[:len(prefix)] == prefix else 'trained' for k in flat})
  return labels


def make(config: ml_collections.ConfigDict, steps_per_epoch: int
         ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The optimiser and its schedule (the schedule is also what gets logged)."""
  schedule = make_schedule(config, steps_per_epoch)
  o = config.optimizer
  tx = _lookup(OPTIMIZERS, o.name, 'config.optimizer.name')(o, schedule)
  if o.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  if o.frozen:
    tx = optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()},
                               _freeze_labels(o.frozen))
  return tx, schedule
