"""The training state: parameters, optimiser state, BatchNorm statistics, step.

Also where a trained state comes back for inference (:func:`load_for_inference`,
used by eval, predict, export and explain) and the check that a checkpoint's
classes are the data's (:func:`check_class_names`, used by train and eval).

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

from bcjax import checkpointing, models, run_config
from bcjax.data import spec
from bcjax.errors import UserError


class TrainState(train_state.TrainState):
  batch_stats: Any = None
  ema_params = None  # Only EmaTrainState has them.

  def variables(self, params=None) -> dict[str, Any]:
    """What ``model.apply`` takes: ``params`` (default: the state's), BatchNorm statistics."""
    variables = {'params': self.params if params is None else params}
    if self.batch_stats:
      variables['batch_stats'] = self.batch_stats
    return variables


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


def _subtree(tree, path: str):
  for part in (p for p in path.split('/') if p):
    if not isinstance(tree, dict) or part not in tree:
      return None
    tree = tree[part]
  return tree


def _replaced(tree: dict[str, Any], parts: list[str], value) -> dict[str, Any]:
  if not parts:
    return value
  return dict(tree, **{parts[0]: _replaced(tree[parts[0]], parts[1:], value)})


def pretrained_params(config: ml_collections.ConfigDict, params) -> dict[str, Any]:
  """``params`` with ``config.init.subtree`` ('' = all) from ``config.init.checkpoint``.

  For any model: the loaded part must have the same structure and shapes as
  the fresh one (a one-line error otherwise).
  """
  path, subtree = config.init.checkpoint, config.init.subtree
  loaded = _subtree(checkpointing.load_params(path), subtree)
  fresh = _subtree(params, subtree)
  what = f'parameters {subtree!r}' if subtree else 'parameters'
  if loaded is None or fresh is None:
    missing = path if loaded is None else f'config.model ({config.model.name})'
    raise UserError(f'config.init.subtree={subtree!r}: {missing} holds no such parameters')
  if jax.tree.map(np.shape, loaded) != jax.tree.map(np.shape, fresh):
    raise UserError(f'the {what} in {path} do not fit config.model ({config.model.name}): '
                    'they differ in structure or shape')
  return _replaced(params, [p for p in subtree.split('/') if p], jax.device_get(loaded))


def load_for_inference(config: ml_collections.ConfigDict, workdir: str,
                       checkpoint: str = 'best') -> tuple[TrainState, dict[str, Any], str, int]:
  """(host state with params + batch_stats, meta, kind, step) of a workdir's checkpoint.

  Only the model's variables are restored, so evaluation works whatever
  optimiser the config names.
  """
  ckpts = checkpointing.Checkpoints(workdir, read_only=True)
  try:
    kind, step = ckpts.find(checkpoint)
    variables, meta = ckpts.restore_variables(checkpoint)
  finally:
    ckpts.close()
  expected = init_variables(config, jax.random.key(0))
  for name in ('params', 'batch_stats'):
    want = jax.tree.map(np.shape, expected.get(name, {}))
    got = jax.tree.map(np.shape, variables.get(name, {}))
    if want != got:
      raise UserError(f'checkpoint {kind}/{step} in {workdir} does not fit '
                      f'config.model ({config.model.name}): its {name} differ in structure '
                      'or shape; pass the config it was trained with')
  check_model_fields(config, workdir)
  state = TrainState.create(apply_fn=None, params=variables['params'], tx=optax.identity(),
                            batch_stats=variables.get('batch_stats', {}))
  return state, meta, kind, step


# Model fields that change training only, not the function a checkpoint computes.
_TRAINING_ONLY = ('conv_impl', 'initializers', 'bn_momentum')


def check_model_fields(config: ml_collections.ConfigDict, workdir: str) -> None:
  """A UserError when ``config.model`` computes another function than the run recorded.

  Some fields change what a model computes without changing any parameter's
  shape (``input_norm``, ``bn_epsilon``): a checkpoint would load and answer
  wrongly without a word. Fields the record or the config lacks are not
  compared (records written before a field existed).
  """
  recorded = (run_config.read(workdir) or {}).get('model')
  if not isinstance(recorded, dict):
    return
  ours = config.model.to_dict()
  differ = sorted(k for k in set(recorded) & set(ours)
                  if k not in _TRAINING_ONLY and not k.startswith('dropout')
                  and _plain(recorded[k]) != _plain(ours[k]))
  if differ:
    fixes = ' '.join(f'--config.model.{k}={_plain(recorded[k])}' for k in differ)
    raise UserError(f'{workdir} was trained with other model fields than config.model has: '
                    + ', '.join(f'{k} {_plain(recorded[k])!r} (config: {_plain(ours[k])!r})'
                                for k in differ)
                    + f'; pass the config it was trained with, or {fixes}')


def _plain(value):
  return list(value) if isinstance(value, tuple) else value


def trained_class_names(meta: dict[str, Any]) -> list[str]:
  """The classes a checkpoint was trained on (the eight PBC classes where it does not say)."""
  return list(meta.get('class_names') or spec.CLASS_NAMES)


def check_class_names(meta: dict[str, Any], class_names) -> None:
  """A UserError when a checkpoint was trained on other classes than the data has."""
  trained = meta.get('class_names')
  if trained and tuple(trained) != tuple(class_names):
    raise UserError(f'the model was trained on classes {", ".join(trained)} but the data '
                    f'has {", ".join(class_names)}')
