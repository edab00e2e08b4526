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

import functools
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


def dihedral_view(images: jax.Array, index: int) -> jax.Array:
  """View ``index`` (0-7) of the 8 flips/90-degree rotations of square NHWC images.

  0-3 rotate by 0, 90, 180, 270 degrees; 4-7 do the same after a horizontal
  flip. View 0 is the identity.
  """
  x = images[:, :, ::-1] if index >= 4 else images
  return jnp.rot90(x, index % 4, axes=(1, 2))


def dihedral(images: jax.Array) -> list[jax.Array]:
  """All 8 views of :func:`dihedral_view`, identity first."""
  return [dihedral_view(images, i) for i in range(8)]


def predict_log_probs(model: nn.Module, variables, images: jax.Array,
                      tta: bool = False) -> jax.Array:
  """Log-probabilities in eval mode; with ``tta`` of the softmax averaged over ``dihedral``.

  The views run one after another in a loop, so test-time augmentation needs
  the memory of one forward pass, not eight (224 px at batch 256 would not fit
  a 24 GB host otherwise).
  """
  def probs(view):
    return jax.nn.softmax(model.apply(variables, view, train=False).astype(jnp.float32))

  if not tta:
    return jax.nn.log_softmax(model.apply(variables, images, train=False).astype(jnp.float32))
  branches = [functools.partial(dihedral_view, index=i) for i in range(8)]
  total = lax.fori_loop(1, 8, lambda i, acc: acc + probs(lax.switch(i, branches, images)),
                        probs(images))
  return jnp.log(total / 8)


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
