"""Train and eval steps, written once, per device.

Each step is a pure function of one device's shard of the batch. Every
cross-device reduction is here, under the single axis name :data:`AXIS`:

* gradients are averaged (``lax.pmean``); BatchNorm statistics are averaged by
  the model itself (built with ``axis_name=AXIS``, flax BatchNorm -> pmean);
* metrics are *summed* (``lax.psum``) as counts - ``loss_sum``, ``correct``,
  ``count`` - never averaged, so a padded last eval batch and uneven epochs
  stay exact; the host divides when it logs.

``bcjax/parallel.py`` maps these functions over devices with either
``jax.pmap`` or ``jax.jit`` + ``jax.shard_map``; the per-device code is the
same under both, which is what makes their numbers identical.

Usage (what parallel.py does)::

    step = functools.partial(steps.train_step, model=build_model(config, axis_name=steps.AXIS),
                             label_smoothing=config.label_smoothing)
    state, metrics = jax.pmap(step, axis_name=steps.AXIS)(state, batch, rng)
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

AXIS = 'devices'  # The one named device axis of every mapped step.

Metrics = dict[str, jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy, with optional label smoothing."""
  targets = jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _variables(state, params) -> dict[str, Any]:
  variables = {'params': params}
  if state.batch_stats:
    variables['batch_stats'] = state.batch_stats
  return variables


def train_step(state, batch: dict[str, jax.Array], rng: jax.Array, *,
               model: nn.Module, label_smoothing: float = 0.0):
  """One optimisation step on this device's shard; returns (state, metrics).

  ``rng`` is the run's dropout key, the same on every device: the step folds
  in the global step (so resuming replays the same masks) and the device
  index (so devices draw different masks).
  """
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), lax.axis_index(AXIS))
  images, labels = batch['image'], batch['label']

  def loss_fn(params):
    mutable = ['batch_stats'] if state.batch_stats else False
    out = model.apply(_variables(state, params), images, train=True,
                      rngs={'dropout': rng}, mutable=mutable)
    logits, updates = out if mutable else (out, {})
    losses = cross_entropy(logits, labels, logits.shape[-1], label_smoothing)
    return losses.mean(), (losses, logits, updates)

  (_, (losses, logits, updates)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  # Every device holds the mean gradient of its equal-sized shard; their mean
  # is the gradient of the global batch mean.
  grads = lax.pmean(grads, AXIS)
  state = state.apply_gradients(
      grads=grads, batch_stats=updates.get('batch_stats', state.batch_stats))
  metrics = {
      'loss_sum': losses.sum(),
      'correct': (logits.argmax(-1) == labels).sum(),
      'count': jnp.asarray(labels.shape[0], jnp.int32),
  }
  return state, lax.psum(metrics, AXIS)


def dihedral(images: jax.Array) -> list[jax.Array]:
  """The 8 flips/90-degree rotations of square NHWC images (identity first)."""
  out = []
  for x in (images, images[:, :, ::-1]):
    for k in range(4):
      out.append(jnp.rot90(x, k, axes=(1, 2)))
  return out


def predict_log_probs(model: nn.Module, variables, images: jax.Array,
                      tta: bool = False) -> jax.Array:
  """Log-probabilities in eval mode; with ``tta`` of the softmax averaged over ``dihedral``."""
  if not tta:
    return jax.nn.log_softmax(model.apply(variables, images, train=False).astype(jnp.float32))
  probs = [jax.nn.softmax(model.apply(variables, v, train=False).astype(jnp.float32))
           for v in dihedral(images)]
  return jnp.log(sum(probs) / len(probs))


def eval_step(state, batch: dict[str, jax.Array], *, model: nn.Module,
              tta: bool = False) -> tuple[Metrics, jax.Array]:
  """Masked metrics (summed over devices) and this shard's probabilities.

  Padding examples (``mask == False``) count nowhere; their probabilities are
  returned too and dropped on the host by the same mask.
  """
  log_probs = predict_log_probs(model, _variables(state, state.params), batch['image'], tta)
  probs = jnp.exp(log_probs)
  labels, mask = batch['label'], batch['mask']
  nll = -jnp.take_along_axis(log_probs, labels[:, None], -1)[:, 0]
  metrics = {
      'loss_sum': jnp.where(mask, nll, 0.0).sum(),
      'correct': ((probs.argmax(-1) == labels) & mask).sum(),
      'count': mask.sum().astype(jnp.int32),
  }
  return lax.psum(metrics, AXIS), probs
