"""The training state: parameters, optimiser state, BatchNorm statistics, step.

A flax ``TrainState`` plus ``batch_stats`` (empty for models without
BatchNorm) and, with ``config.ema_decay`` > 0, ``ema_params``
(:class:`EmaTrainState`). Only arrays are pytree leaves, so the same object is
replicated by ``pmap``, sharded by ``jit``, and saved / restored by orbax as a whole.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import struct
from flax.training import train_state

from bcjax import models


class TrainState(train_state.TrainState):
  batch_stats: Any = None
  ema_params = None  # Only EmaTrainState has them.


class EmaTrainState(TrainState):
  """With ``config.ema_decay`` > 0: also an exponential moving average of the parameters.

  Updated after every step and validated beside them (bcjax/train.py). A
  class of its own, so that a state without it has exactly the leaves it
  always had and checkpoints written before it existed still restore.
  """
  ema_params: Any = None
  ema_decay: float = struct.field(pytree_node=False, default=0.0)

  def apply_gradients(self, *, grads, **kwargs) -> 'TrainState':
    new = super().apply_gradients(grads=grads, **kwargs)
    if self.ema_params is None:
      return new
    # The decay ramps up over the first steps ((1 + t) / (10 + t), as TensorFlow's
    # ExponentialMovingAverage with num_updates), so the average soon forgets the
    # initial weights even in a short run.
    t = jnp.asarray(self.step, jnp.float32)
    decay = jnp.minimum(self.ema_decay, (1.0 + t) / (10.0 + t))
    ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, self.ema_params, new.params)
    return new.replace(ema_params=ema)


def init_variables(config: ml_collections.ConfigDict, rng: jax.Array) -> dict[str, Any]:
  """The model's initial variables for ``config.image_size`` inputs, on the host."""
  model = models.build_model(config)
  return jax.device_get(_init(model, config.image_size, rng))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init(model, image_size: int, rng: jax.Array):
  # Jitted once per (model, size): a module compares by its fields, so later
  # runs in the same process reuse the compiled initialiser.
  x = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  params_rng, dropout_rng = jax.random.split(rng)
  return model.init({'params': params_rng, 'dropout': dropout_rng}, x, train=False)


def create(config: ml_collections.ConfigDict, rng: jax.Array,
           tx: optax.GradientTransformation, params=None) -> TrainState:
  """A fresh state; ``params`` replaces the initial parameters when given."""
  variables = init_variables(config, rng)
  if params is not None:
    variables['params'] = params
  decay = float(config.get('ema_decay', 0.0))
  if decay > 0:
    return EmaTrainState.create(
        apply_fn=None, params=variables['params'], tx=tx,
        batch_stats=variables.get('batch_stats', {}),
        ema_params=jax.tree.map(np.array, variables['params']), ema_decay=decay)
  return TrainState.create(
      apply_fn=None, params=variables['params'], tx=tx,
      batch_stats=variables.get('batch_stats', {}))
