"""Augmentation inside the jitted train step: geometry, stain jitter and mixup.

Two kinds live here. Flips and 90-degree rotations of ``uint8`` batches run
in the step only when the split is resident on the devices (below); the host
pipelines apply the same ones themselves. Stain jitter and mixup
(:class:`StepAugment`, ``config.data.augment.stain`` / ``.mixup_alpha``) run in
the step on every input path, on the float batch, so the tf.data, NumPy and
device paths share one implementation and the host does no per-pixel work.

When the training split is resident on the devices (bcjax/data/resident.py)
the step receives ``uint8`` pixels gathered there, not float batches made on
the host. The step then augments and scales them itself, from its own key::

    draws = augment.draws(key, n)                           # int32 [n, 3]
    images = augment.apply(images_uint8, draws, flips=True, rot90=True)
    images = augment.to_float(images)                       # float32 in [0, 1]

Why here and not on the host: on a GPU one step takes milliseconds and the
host cannot keep up with per-image NumPy work; on the device these are a few
element-wise selects that XLA fuses with the gather. Why on ``uint8``: the
selects move a quarter of the bytes they would move on float32.

The draws per image are (flip left-right, flip up-down, quarter turns) in
``[0, 2) x [0, 2) x [0, 4)``, applied in that order, exactly as the NumPy
backend applies its own draws (bcjax/data/packed.py), so a test can compare
the two on the same draws. The step derives ``key`` from its dropout key
(which already folds in the global step and the device index), so a resumed
run replays the same augmentation, and devices draw independently.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# Folded into the step's key for the augmentation draws; the dropout key itself
# stays as it was, so runs without device-side augmentation keep their masks.
STREAM = 0x61756720  # 'aug '
STAIN_STREAM = 0x73746e20  # 'stn ': the stain jitter's draws.
MIXUP_STREAM = 0x6d697820  # 'mix ': mixup's partner permutation and weight.


@dataclasses.dataclass(frozen=True)
class StepAugment:
  """What the train step does to a batch before the forward pass (hashable: a jit static).

  ``flips`` / ``rot90`` act on uint8 batches from the resident split only;
  ``stain`` (the jitter's sigma, 0 = off) and ``mixup_alpha`` (0 = off) act on
  every batch.
  """
  flips: bool = False
  rot90: bool = False
  stain: float = 0.0
  mixup_alpha: float = 0.0

  @classmethod
  def from_config(cls, config) -> 'StepAugment':
    a = config.data.augment
    return cls(flips=bool(a.flips), rot90=bool(a.rot90), stain=float(a.get('stain', 0.0)),
               mixup_alpha=float(a.get('mixup_alpha', 0.0)))


def draws(key: jax.Array, n: int) -> jax.Array:
  """(flip left-right, flip up-down, quarter turns) per image: int32 [n, 3]."""
  return jax.random.randint(key, (n, 3), 0, jnp.array([2, 2, 4], jnp.int32), jnp.int32)


def apply(images: jax.Array, d: jax.Array, *, flips: bool, rot90: bool) -> jax.Array:
  """``images`` [n, S, S, C] flipped / rotated per image by the draws ``d`` [n, 3]."""
  def per_image(mask):
    return mask[:, None, None, None]

  if flips:
    images = jnp.where(per_image(d[:, 0] == 1), images[:, :, ::-1], images)
    images = jnp.where(per_image(d[:, 1] == 1), images[:, ::-1], images)
  if rot90:
    k = d[:, 2]
    turned = [jnp.rot90(images, q, axes=(1, 2)) for q in (1, 2, 3)]
    images = jnp.where(per_image(k == 1), turned[0],
                       jnp.where(per_image(k == 2), turned[1],
                                 jnp.where(per_image(k == 3), turned[2], images)))
  return images


def to_float(images: jax.Array) -> jax.Array:
  """uint8 to float32 in [0, 1]: the paper's 1/255.

  XLA turns the division by a constant into a multiplication by its
  reciprocal, so a value may differ from the host pipelines' division by one
  float32 ulp (tests/test_resident.py bounds it).
  """
  return images.astype(jnp.float32) / jnp.float32(255.0)


# -- Stain jitter (Tellez et al. 2018, "H&E-jitter"): perturb each image's
# stain concentrations in colour-deconvolution space (Ruifrok & Johnston 2001)
# and map back to RGB. PBC smears are May-Grünwald-Giemsa stained, not H&E:
# the basis is scikit-image's H-E-DAB one (``skimage.color.rgb_from_hed``), used
# as three fixed optical-density directions that span the purple / pink
# variation between slides, not as a claim about the dyes.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                         [0.07, 0.99, 0.11],
                         [0.27, 0.57, 0.78]], np.float64)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_EPS = 1e-6


def stain_draws(key: jax.Array, n: int, sigma: float) -> tuple[jax.Array, jax.Array]:
  """Per image and stain: (scale in [1-sigma, 1+sigma], shift in [-sigma, sigma]), [n, 3] each."""
  k_scale, k_shift = jax.random.split(key)
  scale = jax.random.uniform(k_scale, (n, 3), jnp.float32, 1.0 - sigma, 1.0 + sigma)
  shift = jax.random.uniform(k_shift, (n, 3), jnp.float32, -sigma, sigma)
  return scale, shift


def apply_stain(images: jax.Array, scale: jax.Array, shift: jax.Array) -> jax.Array:
  """Float images [n, S, S, 3] in [0, 1], stain concentrations ``c * scale + shift``, clipped.

  Concentrations are in natural-log optical density, so a shift of 0.05
  darkens or lightens a white background by about 5%. (scikit-image's
  ``rgb2hed`` divides optical density by -log(1e-6), about 13.8, so the same
  sigma there perturbs 13.8 times as hard: the "HED-light" 0.05 of code built
  on it is about 0.7 here.) Unlike ``rgb2hed`` the concentrations are not
  clipped at 0 before the way back, so scale 1 and shift 0 return the image
  (to float round-off) and a white background stays white under a pure scale.
  """
  od = -jnp.log(jnp.maximum(images.astype(jnp.float32), _EPS))
  stains = od @ jnp.asarray(HED_FROM_RGB, jnp.float32)
  stains = stains * scale[:, None, None, :] + shift[:, None, None, :]
  od = stains @ jnp.asarray(RGB_FROM_HED, jnp.float32)
  return jnp.clip(jnp.exp(-od), 0.0, 1.0)


# -- Mixup (Zhang et al. 2018): each image is blended with a partner from the
# same device's shard, and so is its target distribution.
def mixup(images: jax.Array, targets: jax.Array, key: jax.Array,
          alpha: float) -> tuple[jax.Array, jax.Array]:
  """(images, targets) blended with a random permutation of themselves.

  One weight ``lam ~ Beta(alpha, alpha)`` per shard, folded to ``max(lam,
  1 - lam)`` so each image keeps the larger share: the train accuracy the
  step reports then still refers to each example's own label. Targets are
  probability rows (one-hot or smoothed).
  """
  k_perm, k_lam = jax.random.split(key)
  lam = jax.random.beta(k_lam, alpha, alpha)
  lam = jnp.maximum(lam, 1.0 - lam)
  partner = jax.random.permutation(k_perm, images.shape[0])
  images = lam * images + (1.0 - lam) * images[partner]
  targets = lam * targets + (1.0 - lam) * targets[partner]
  return images, targets
