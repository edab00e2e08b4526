"""Stain jitter and mixup in the train step (bcjax/augment.py).

* stain jitter is the identity at sigma 0 and equals a float64 NumPy
  reference of colour deconvolution for the same draws;
* mixup blends images and target rows with one weight >= 0.5 and one
  partner permutation;
* a train step with both equals the plain step's loss on the reference batch
  made from the same derived keys, so the step augments what the docs say,
  and the dropout key is not consumed by either.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax import augment, models, optim, steps, train_state


def _reference_stain(images, scale, shift):
  m = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
  od = -np.log(np.maximum(images.astype(np.float64), 1e-6))
  c = od @ np.linalg.inv(m)
  c = c * scale[:, None, None, :] + shift[:, None, None, :]
  return np.clip(np.exp(-(c @ m)), 0.0, 1.0)


def test_stain_jitter_is_the_identity_at_zero_and_the_reference_deconvolution_otherwise():
  images = np.random.default_rng(0).uniform(0.02, 1.0, (6, 9, 9, 3)).astype(np.float32)
  scale, shift = augment.stain_draws(jax.random.key(0), 6, 0.0)
  np.testing.assert_allclose(np.asarray(augment.apply_stain(images, scale, shift)), images,
                             atol=2e-6)
  scale, shift = augment.stain_draws(jax.random.key(1), 6, 0.2)
  scale, shift = np.asarray(scale), np.asarray(shift)
  assert ((scale >= 0.8) & (scale <= 1.2)).all() and ((shift >= -0.2) & (shift <= 0.2)).all()
  assert len({tuple(r) for r in scale.round(6)}) == 6  # Every image draws its own.
  got = np.asarray(augment.apply_stain(images, scale, shift))
  np.testing.assert_allclose(got, _reference_stain(images, scale, shift), atol=1e-5)
  assert np.abs(got - images).mean() > 0.01  # It does change the colours.


def test_mixup_blends_images_and_targets_with_one_dominant_weight():
  n = 8
  images = jnp.asarray(np.random.default_rng(2).random((n, 4, 4, 3)), jnp.float32)
  targets = jax.nn.one_hot(jnp.arange(n), n)  # Each row names its own example.
  mixed, mixed_targets = augment.mixup(images, targets, jax.random.key(3), 0.4)
  t = np.asarray(mixed_targets)
  np.testing.assert_allclose(t.sum(1), 1.0, rtol=1e-6)
  own = t[np.arange(n), np.arange(n)]
  lam = own.min()
  # One weight, the own image's the larger; an example paired with itself keeps all of it.
  assert (np.isclose(own, lam) | np.isclose(own, 1.0)).all() and 0.5 <= lam < 1.0
  partner = np.where(np.eye(n, dtype=bool), 0.0, t).argmax(1)
  partner = np.where(t[np.arange(n), partner] > 0, partner, np.arange(n))  # Paired with itself.
  assert sorted(partner.tolist()) == list(range(n))  # A permutation.
  want = lam * np.asarray(images) + (1 - lam) * np.asarray(images)[partner]
  np.testing.assert_allclose(np.asarray(mixed), want, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_the_step_jitters_and_mixes_from_its_own_keys():
  from configs import cnn
  config = cnn.get_config('tiny')
  config.image_size = 16
  config.model.dropout_conv = 0.0
  config.model.dropout_dense = 0.0
  tx, _ = optim.make(config, 10)
  state = train_state.create(config, jax.random.key(0), tx)
  model = models.build_model(config, axis_name=steps.AXIS)
  rng = np.random.default_rng(4)
  images = rng.random((8, 16, 16, 3), np.float32)
  labels = rng.integers(0, 8, 8).astype(np.int32)
  key = jax.random.key(5)
  aug = augment.StepAugment(stain=0.1, mixup_alpha=0.4)

  def run(step_fn, imgs):
    mapped = jax.pmap(step_fn, axis_name=steps.AXIS, devices=jax.devices()[:1])
    stacked = jax.tree.map(lambda x: np.asarray(x)[None], state)
    _, m = mapped(stacked, {'image': imgs[None], 'label': labels[None]}, key[None])
    return float(m['loss_sum'][0])

  got = run(lambda s, b, k: steps.train_step(s, b, k, model=model, label_smoothing=0.1,
                                             augmentation=aug), images)
  # The reference: the same draws, made outside the step, and the loss by hand.
  step_key = jax.random.fold_in(jax.random.fold_in(key, 0), 0)  # step 0, device 0
  scale, shift = augment.stain_draws(jax.random.fold_in(step_key, augment.STAIN_STREAM), 8, 0.1)
  jittered = augment.apply_stain(images, scale, shift)
  mixed, target = augment.mixup(jittered, steps.targets(labels, 8, 0.1),
                                jax.random.fold_in(step_key, augment.MIXUP_STREAM), 0.4)
  logits, _ = model.apply(state.variables(), mixed, train=True, mutable=['batch_stats'],
                          rngs={'dropout': step_key})
  want = float(jnp.sum(-(target * jax.nn.log_softmax(logits)).sum(-1)))
  assert got == pytest.approx(want, rel=1e-5)
  # ... and not the plain batch's loss: the augmentation did change what the step saw.
  plain = model.apply(state.variables(), images, train=True, mutable=['batch_stats'],
                      rngs={'dropout': step_key})[0]
  plain_loss = float(jnp.sum(-(steps.targets(labels, 8, 0.1) * jax.nn.log_softmax(plain)).sum(-1)))
  assert plain_loss != pytest.approx(got, rel=1e-3)
