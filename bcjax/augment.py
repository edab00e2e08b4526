"""Augmentation inside the jitted train step: flips and 90-degree rotations of uint8 batches.

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

import jax
import jax.numpy as jnp

# Folded into the step's key for the augmentation draws; the dropout key itself
# stays as it was, so runs without device-side augmentation keep their masks.
STREAM = 0x61756720  # 'aug '


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
