"""The lab-to-lab augmentation of the train step (bcjax/augment.py, apply_domain).

Each op is checked three ways: it is the identity at zero strength, it equals
a plain float64 NumPy reference written here for the same draws, and it
draws from its own key, so turning one op on changes no other op's draws.
The extractor's normalisation choices are checked in tests/test_models.py.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax import augment, config_checks
from bcjax.errors import UserError
from configs import best

RNG = np.random.default_rng(0)
IMAGES = RNG.uniform(0.02, 1.0, (5, 12, 10, 3)).astype(np.float32)
SQUARE = RNG.uniform(0.02, 1.0, (5, 11, 11, 3)).astype(np.float32)


def _reflect(u, size):
  period = 2.0 * (size - 1)
  u = np.mod(u, period)
  return np.where(u > size - 1, period - u, u)


def _reference_affine(images, zoom, angle, shift):
  """Bilinear read at c + R(-angle)(p - c)/zoom - shift*side, mirrored, in float64 loops."""
  n, h, w, c = images.shape
  out = np.zeros((n, h, w, c))
  cy, cx = (h - 1) / 2, (w - 1) / 2
  for b in range(n):
    co, si = np.cos(angle[b]), np.sin(angle[b])
    for i in range(h):
      for j in range(w):
        y, x = i - cy, j - cx
        sy = _reflect((co * y - si * x) / zoom[b] + cy - shift[b, 0] * h, h)
        sx = _reflect((si * y + co * x) / zoom[b] + cx - shift[b, 1] * w, w)
        y0, x0 = min(int(np.floor(sy)), h - 2), min(int(np.floor(sx)), w - 2)
        fy, fx = sy - y0, sx - x0
        img = images[b].astype(np.float64)
        out[b, i, j] = ((img[y0, x0] * (1 - fx) + img[y0, x0 + 1] * fx) * (1 - fy)
                        + (img[y0 + 1, x0] * (1 - fx) + img[y0 + 1, x0 + 1] * fx) * fy)
  return out


def _reference_blur(images, sigma, radius):
  """Separable Gaussian, mirrored edges (numpy 'reflect' pad), per image."""
  n, h, w, c = images.shape
  out = np.zeros(images.shape)
  t = np.arange(-radius, radius + 1)
  for b in range(n):
    k = np.exp(-0.5 * (t / max(sigma[b], 1e-3)) ** 2)
    k /= k.sum()
    x = np.pad(images[b].astype(np.float64), ((radius, radius), (radius, radius), (0, 0)),
               mode='reflect')
    rows = sum(k[i] * x[i:i + h] for i in range(len(t)))
    out[b] = sum(k[i] * rows[:, i:i + w] for i in range(len(t)))
  return out


def _reference_colour(images, d):
  luma = np.array([0.299, 0.587, 0.114])
  yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
  out = []
  for b, img in enumerate(images.astype(np.float64)):
    x = np.clip(img + d['brightness'][b], 0, 1)
    m = (x @ luma).mean()
    x = np.clip(m + d['contrast'][b] * (x - m), 0, 1)
    g = (x @ luma)[..., None]
    x = np.clip(g + d['saturation'][b] * (x - g), 0, 1)
    th = 2 * np.pi * d['hue'][b]
    rot = np.array([[1, 0, 0], [0, np.cos(th), -np.sin(th)], [0, np.sin(th), np.cos(th)]])
    x = np.clip(x @ (np.linalg.inv(yiq) @ rot @ yiq).T, 0, 1)
    x = x ** d['gamma'][b]
    if d['grey'][b]:
      x = np.repeat((x @ luma)[..., None], 3, -1)
    out.append(x)
  return np.stack(out)


def test_affine_is_the_identity_at_zoom_one_and_the_reference_otherwise():
  n = len(SQUARE)
  same = augment.apply_affine(SQUARE, jnp.ones(n), jnp.zeros(n), jnp.zeros((n, 2)))
  np.testing.assert_array_equal(np.asarray(same), SQUARE)
  zoom, angle, shift = augment.affine_draws(jax.random.key(1), n, (0.5, 2.0), True, 0.1)
  zoom, angle, shift = map(np.asarray, (zoom, angle, shift))
  assert ((zoom >= 0.5) & (zoom <= 2.0)).all() and (np.abs(shift) <= 0.1).all()
  assert len(set(zoom.round(5))) == n
  got = np.asarray(augment.apply_affine(IMAGES, zoom, angle, shift))
  np.testing.assert_allclose(got, _reference_affine(IMAGES, zoom, angle, shift), atol=2e-5)
  assert np.abs(got - IMAGES).mean() > 0.05


def test_a_quarter_turn_of_the_affine_is_a_clockwise_rot90():
  n = len(SQUARE)
  turned = augment.apply_affine(SQUARE, jnp.ones(n), jnp.full((n,), np.pi / 2), jnp.zeros((n, 2)))
  want = np.stack([np.rot90(im, -1, axes=(0, 1)) for im in SQUARE])
  np.testing.assert_allclose(np.asarray(turned), want, atol=1e-5)


def test_blur_is_the_identity_at_sigma_zero_and_the_reference_gaussian_otherwise():
  n = len(IMAGES)
  np.testing.assert_allclose(np.asarray(augment.apply_blur(IMAGES, jnp.zeros(n), 2)), IMAGES,
                             atol=1e-6)
  sigma = np.array([0.0, 0.5, 1.0, 1.5, 2.0], np.float32)
  radius = augment.blur_radius(2.0)
  got = np.asarray(augment.apply_blur(IMAGES, sigma, radius))
  np.testing.assert_allclose(got, _reference_blur(IMAGES, sigma, radius), atol=1e-5)
  # Blur keeps each image's mean (normalised taps) and lowers its variance.
  np.testing.assert_allclose(got.mean((1, 2)), IMAGES.mean((1, 2)), atol=0.02)
  assert got[4].var() < 0.5 * IMAGES[4].var()


def test_colour_is_the_identity_at_zero_and_the_reference_otherwise():
  n = len(IMAGES)
  off = augment.colour_draws(jax.random.key(0), n, augment.StepAugment())
  np.testing.assert_allclose(np.asarray(augment.apply_colour(IMAGES, off)), IMAGES, atol=2e-6)
  a = augment.StepAugment(brightness=0.2, contrast=0.4, saturation=0.6, hue=0.1, gamma=0.3,
                          grayscale=0.5)
  d = {k: np.asarray(v) for k, v in augment.colour_draws(jax.random.key(2), n, a).items()}
  assert (np.abs(d['brightness']) <= 0.2).all() and (np.abs(d['hue']) <= 0.1).all()
  assert ((d['gamma'] >= np.exp(-0.3) - 1e-6) & (d['gamma'] <= np.exp(0.3) + 1e-6)).all()
  d['grey'] = np.array([True, False, False, True, False])  # Both branches, whatever the draw.
  got = np.asarray(augment.apply_colour(IMAGES, d))
  np.testing.assert_allclose(got, _reference_colour(IMAGES, d), atol=5e-5)
  assert np.allclose(got[0, ..., 0], got[0, ..., 1]) and not np.allclose(got[1, ..., 0],
                                                                         got[1, ..., 1])


def test_noise_is_zero_at_sigma_zero_and_bounded_by_its_level():
  x = jnp.asarray(np.full((4, 16, 16, 3), 0.5, np.float32))
  np.testing.assert_array_equal(np.asarray(augment.apply_noise(x, jax.random.key(0), 0.0)), x)
  y = np.asarray(augment.apply_noise(x, jax.random.key(0), 0.05))
  spread = (y - 0.5).std(axis=(1, 2, 3))
  assert (spread < 0.06).all() and spread.max() > 0.005


ALL_ON = augment.StepAugment(zoom=(0.6, 1.8), rotate=True, translate=0.05, blur=0.02, stain=0.2,
                             brightness=0.1, contrast=0.2, saturation=0.3, hue=0.05, gamma=0.2,
                             grayscale=0.2, noise=0.03)


def test_apply_domain_is_the_identity_when_off_and_each_op_draws_its_own_key():
  x = jnp.asarray(SQUARE)
  key = jax.random.key(7)
  off = augment.StepAugment()
  assert not off.domain and ALL_ON.domain
  np.testing.assert_array_equal(np.asarray(augment.apply_domain(x, key, off)), SQUARE)
  # Geometry alone equals the affine op on the draws of its own stream.
  geo = augment.StepAugment(zoom=ALL_ON.zoom, rotate=True, translate=0.05)
  z, a, s = augment.affine_draws(jax.random.fold_in(key, augment.AFFINE_STREAM), len(SQUARE),
                                 geo.zoom, True, 0.05)
  np.testing.assert_allclose(np.asarray(augment.apply_domain(x, key, geo)),
                             np.asarray(augment.apply_affine(x, z, a, s)), atol=1e-6)
  # Turning blur on beside geometry leaves the geometry's draws alone: blurring
  # the geometry-only output with the blur stream's sigmas gives the same.
  both = dataclasses.replace(geo, blur=0.05)
  side = SQUARE.shape[1]
  sigma = jax.random.uniform(jax.random.fold_in(key, augment.BLUR_STREAM), (len(SQUARE),),
                             jnp.float32, 0.0, 0.05 * side)
  want = augment.apply_blur(augment.apply_affine(x, z, a, s), sigma, augment.blur_radius(0.05 * side))
  np.testing.assert_allclose(np.asarray(augment.apply_domain(x, key, both)), np.asarray(want),
                             atol=1e-5)
  # Stain jitter keeps the draws of its own stream (the same as before the chain existed).
  stain = augment.StepAugment(stain=0.2)
  sc, sh = augment.stain_draws(jax.random.fold_in(key, augment.STAIN_STREAM), len(SQUARE), 0.2)
  np.testing.assert_allclose(np.asarray(augment.apply_domain(x, key, stain)),
                             np.asarray(augment.apply_stain(x, sc, sh)), atol=1e-6)
  y = np.asarray(augment.apply_domain(x, key, ALL_ON))
  assert y.shape == SQUARE.shape and 0.0 <= y.min() and y.max() <= 1.0


def test_the_config_reaches_the_step_augment_and_bad_values_are_one_line():
  c = best.get_config('tiny')
  c.data.augment.zoom = (0.5, 2.0)
  c.data.augment.hue = 0.1
  a = augment.StepAugment.from_config(c)
  assert a.zoom == (0.5, 2.0) and a.hue == 0.1 and a.domain and hash(a)
  config_checks.check(c)
  for field, value in (('hue', 0.7), ('blur', -0.1), ('zoom', (2.0, 1.0)), ('grayscale', 1.5)):
    bad = best.get_config('tiny')
    bad.data.augment[field] = value
    with pytest.raises(UserError, match=f'data.augment.{field}'):
      config_checks.check(bad)
  bad = best.get_config('tiny')
  bad.model.norm = 'instance'
  with pytest.raises(UserError, match='model.norm'):
    config_checks.check(bad)


def test_domain_prob_keeps_the_other_images_as_they_were():
  x = jnp.asarray(SQUARE)
  key = jax.random.key(3)
  full = np.asarray(augment.apply_domain(x, key, ALL_ON))
  none = np.asarray(augment.apply_domain(x, key, dataclasses.replace(ALL_ON, domain_prob=0.0)))
  np.testing.assert_array_equal(none, SQUARE)
  half = np.asarray(augment.apply_domain(x, key, dataclasses.replace(ALL_ON, domain_prob=0.5)))
  changed = jax.random.uniform(jax.random.fold_in(key, augment.CHOICE_STREAM), (len(SQUARE),)) < 0.5
  for i, c in enumerate(np.asarray(changed)):
    np.testing.assert_array_equal(half[i], full[i] if c else SQUARE[i])
