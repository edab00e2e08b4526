"""The training state: parameters, optimiser state, BatchNorm statistics, step.

A flax ``TrainState`` plus ``batch_stats`` (empty for models without
BatchNorm). Only arrays are pytree leaves, so the same object is replicated by
``pmap``, sharded by ``jit``, and saved / restored by orbax as a whole.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax.training import train_state

from bcjax import models


class TrainState(train_state.TrainState):
  batch_stats: Any = None


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
  return TrainState.create(
      apply_fn=None, params=variables['params'], tx=tx,
      batch_stats=variables.get('batch_stats', {}))
