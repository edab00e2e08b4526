"""Train and eval steps, written once, per device.

Each step is a pure function of one device's shard of the batch. Every
cross-device reduction of the step is here, under the single axis name
:data:`AXIS`, except one that the model makes:

* gradients are averaged (``lax.pmean``); BatchNorm statistics are averaged by
  the model's BatchNorm layers (flax ``BatchNorm`` and the fused
  ``layers.BatchNormReluPool``, each a ``pmean`` over ``axis_name=AXIS``,
  which ``build_model`` passes to models that declare it);
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

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax

from bcjax import augment
from bcjax.errors import UserError

AXIS = 'devices'  # The one named device axis of every mapped step.

Metrics = dict[str, jax.Array]


def targets(labels: jax.Array, num_classes: int, label_smoothing: float = 0.0) -> jax.Array:
  """Target distributions: one-hot rows, smoothed toward uniform by ``label_smoothing``."""
  t = jax.nn.one_hot(labels, num_classes)
  return optax.smooth_labels(t, label_smoothing) if label_smoothing else t


def cross_entropy(logits: jax.Array, labels: jax.Array, num_classes: int,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy, with optional label smoothing."""
  return optax.softmax_cross_entropy(logits.astype(jnp.float32),
                                     targets(labels, num_classes, label_smoothing))


def _grads(state, images: jax.Array, target: jax.Array, rng: jax.Array, *, model: nn.Module):
  """Gradient of the mean loss against ``target`` rows, with (losses, logits, variable updates)."""
  def loss_fn(params):
    mutable = ['batch_stats'] if state.batch_stats else False
    out = model.apply(state.variables(params), images, train=True,
                      rngs={'dropout': rng}, mutable=mutable)
    logits, updates = out if mutable else (out, {})
    losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), target)
    return losses.mean(), (losses, logits, updates)

  (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return grads, aux


def num_microbatches(per_device_batch: int, microbatch_size: int) -> int:
  """How many microbatches of ``microbatch_size`` make this device's batch (0: one)."""
  if microbatch_size <= 0 or microbatch_size >= per_device_batch:
    return 1
  if per_device_batch % microbatch_size:
    raise UserError(f'config.microbatch_size={microbatch_size} does not divide the '
                    f'per-device batch of {per_device_batch}; pick a divisor or 0')
  return per_device_batch // microbatch_size


def _accumulated_grads(grad_fn, state, images, target, rng, k: int):
  """``grad_fn`` over ``k`` equal microbatches in turn (``lax.scan``), gradients averaged.

  The mean of equal-sized microbatches' mean-loss gradients is the whole
  batch's, so a model without BatchNorm gets the same update it would in one
  pass (each microbatch draws its own dropout key). With BatchNorm each
  microbatch normalises by its own statistics ("ghost" batch norm), and the
  running averages move by the mean of the microbatches' updates.
  """
  def split(x):
    return x.reshape(k, x.shape[0] // k, *x.shape[1:])

  def body(grad_sum, xs):
    i, imgs, tgts = xs
    grads, aux = grad_fn(state, imgs, tgts, jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, grad_sum, grads), aux

  zeros = jax.tree.map(jnp.zeros_like, state.params)
  grad_sum, (losses, logits, updates) = lax.scan(
      body, zeros, (jnp.arange(k), split(images), split(target)))
  grads = jax.tree.map(lambda g: g / k, grad_sum)
  updates = jax.tree.map(lambda u: u.mean(0), updates)
  return grads, (losses.reshape(-1), logits.reshape(-1, logits.shape[-1]), updates)


def train_step(state, batch: dict[str, jax.Array], rng: jax.Array, *,
               model: nn.Module, label_smoothing: float = 0.0, microbatch_size: int = 0,
               augmentation: augment.StepAugment = augment.StepAugment(),
               distill_weight: float = 0.0):
  """One optimisation step on this device's shard; returns (state, metrics).

  ``rng`` is the run's dropout key, the same on every device: the step folds
  in the global step (so resuming replays the same masks) and the device
  index (so devices draw different masks). Every input path delivers
  training images as ``uint8`` pixels, unaugmented (streamed from the host
  or gathered on the devices, bcjax/data/resident.py): the step flips /
  rotates them (``augmentation.flips``, ``.rot90``) from a key derived from
  the same folded key, then scales them to float (see bcjax/augment.py). A
  float batch (already in [0, 1]: a benchmark's or a test's) is taken as it
  is, so those two flags do nothing to it. The lab-to-lab ops (zoom, rotation,
  translation, blur, stain jitter, colour, noise: ``augment.apply_domain``)
  and mixup then act on the float batch whichever path it came by, each from
  its own derived key, so turning one on changes neither the dropout masks
  nor another's draws. A batch with a
  ``'teacher'`` row per image (distillation, bcjax/distill.py) moves each
  target row that far toward it: ``(1 - distill_weight) * target +
  distill_weight * teacher``, before mixup. ``microbatch_size`` > 0 runs the
  shard as microbatches of that size and averages their gradients (see
  :func:`_accumulated_grads`): the memory of one microbatch's activations
  (what that does to speed on CPU is measured in ``docs/benchmarks.md``).
  """
  rng = jax.random.fold_in(jax.random.fold_in(rng, state.step), lax.axis_index(AXIS))
  images, labels = batch['image'], batch['label']
  n = labels.shape[0]
  if images.dtype == jnp.uint8:  # Training pixels, from any input path: augment and scale.
    d = augment.draws(jax.random.fold_in(rng, augment.STREAM), n)
    images = augment.to_float(augment.apply(images, d, flips=augmentation.flips,
                                            rot90=augmentation.rot90))
  if augmentation.domain:
    images = augment.apply_domain(images, rng, augmentation)
  target = targets(labels, model.num_classes, label_smoothing)
  if 'teacher' in batch:
    target = (1.0 - distill_weight) * target + distill_weight * batch['teacher']
  if augmentation.mixup_alpha:
    images, target = augment.mixup(images, target, jax.random.fold_in(rng, augment.MIXUP_STREAM),
                                   augmentation.mixup_alpha)
  grad_fn = functools.partial(_grads, model=model)
  k = num_microbatches(n, microbatch_size)
  if k == 1:
    grads, (losses, logits, updates) = grad_fn(state, images, target, rng)
  else:
    grads, (losses, logits, updates) = _accumulated_grads(grad_fn, state, images, target, rng, k)
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
  log_probs = predict_log_probs(model, state.variables(), batch['image'], tta)
  probs = jnp.exp(log_probs)
  labels, mask = batch['label'], batch['mask']
  nll = -jnp.take_along_axis(log_probs, labels[:, None], -1)[:, 0]
  metrics = {
      'loss_sum': jnp.where(mask, nll, 0.0).sum(),
      'correct': ((probs.argmax(-1) == labels) & mask).sum(),
      'count': mask.sum().astype(jnp.int32),
  }
  return lax.psum(metrics, AXIS), probs
