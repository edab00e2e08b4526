"""Augmentation inside the jitted train step: geometry, colour, optics and mixup.

All training augmentation lives here; the input paths deliver the training
split's ``uint8`` pixels unaugmented (the tf.data and packed-file backends
stream them from the host, bcjax/data/resident.py gathers them on the
devices). The train step then augments and scales every batch itself, from
its own key::

    draws = augment.draws(key, n)                           # int32 [n, 3]
    images = augment.apply(images_uint8, draws, flips=True, rot90=True)
    images = augment.to_float(images)                       # float32 in [0, 1]

and on the float batch the optional stain jitter, lab-to-lab ops and mixup
(:class:`StepAugment`, ``config.data.augment.*``). One implementation serves
every input path, so they augment identically, and the host does no
per-pixel work.

Why here and not on the host: on a GPU one step takes milliseconds and the
host cannot keep up with per-image NumPy work; on the device these are a few
element-wise selects that XLA fuses with the scaling (and, on the device
path, with the gather). Why on ``uint8``: the
selects move a quarter of the bytes they would move on float32, and so does
a streamed batch on its way to the device.

The draws per image are (flip left-right, flip up-down, quarter turns) in
``[0, 2) x [0, 2) x [0, 4)``, applied in that order (tests/test_resident.py
checks them against a NumPy reference on the same draws). The step derives
``key`` from its dropout key (which already folds in the global step and the
device index), so a resumed run replays the same augmentation, and devices
draw independently.
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
AFFINE_STREAM = 0x61666620  # 'aff ': zoom, rotation and translation.
BLUR_STREAM = 0x626c7220  # 'blr ': the blur's sigma.
COLOUR_STREAM = 0x636f6c20  # 'col ': brightness, contrast, saturation, hue, gamma, grayscale.
NOISE_STREAM = 0x6e6f7320  # 'nos ': the noise's level and values.
CHOICE_STREAM = 0x63686f20  # 'cho ': which images the lab-to-lab chain changes.


@dataclasses.dataclass(frozen=True)
class StepAugment:
  """What the train step does to a batch before the forward pass (hashable: a jit static).

  ``flips`` / ``rot90`` act on uint8 batches (what every input path delivers
  for training); ``stain`` (the jitter's sigma, 0 = off) and ``mixup_alpha``
  (0 = off) act on every batch.
  """
  flips: bool = False
  rot90: bool = False
  stain: float = 0.0
  mixup_alpha: float = 0.0
  # Another lab's microscope, camera and stain (:func:`apply_domain`); each 0 = off.
  zoom: tuple[float, float] = (1.0, 1.0)
  rotate: bool = False
  translate: float = 0.0
  blur: float = 0.0
  brightness: float = 0.0
  contrast: float = 0.0
  saturation: float = 0.0
  hue: float = 0.0
  gamma: float = 0.0
  grayscale: float = 0.0
  noise: float = 0.0
  # The share of images the lab-to-lab chain changes; the rest stay as PBC
  # shows them, so the model still learns PBC's fine detail.
  domain_prob: float = 1.0

  @classmethod
  def from_config(cls, config) -> 'StepAugment':
    a = config.data.augment
    zoom = tuple(float(z) for z in a.get('zoom', (1.0, 1.0)))
    return cls(flips=bool(a.flips), rot90=bool(a.rot90), stain=float(a.get('stain', 0.0)),
               mixup_alpha=float(a.get('mixup_alpha', 0.0)), zoom=zoom,
               rotate=bool(a.get('rotate', False)), domain_prob=float(a.get('domain_prob', 1.0)),
               **{f: float(a.get(f, 0.0)) for f in DOMAIN_FIELDS})

  @property
  def domain(self) -> bool:
    """Whether any op of :func:`apply_domain` is on."""
    return self.geometric or self.colour or bool(self.blur or self.stain or self.noise)

  @property
  def geometric(self) -> bool:
    return self.zoom != (1.0, 1.0) or self.rotate or self.translate > 0

  @property
  def colour(self) -> bool:
    return any(getattr(self, f) for f in ('brightness', 'contrast', 'saturation', 'hue',
                                          'gamma', 'grayscale'))


# The float-valued strengths of StepAugment read from config.data.augment.
DOMAIN_FIELDS = ('translate', 'blur', 'brightness', 'contrast', 'saturation', 'hue', 'gamma',
                 'grayscale', 'noise')


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
  reciprocal, so a value may differ from the host's division (the eval
  batches' ``spec.to_float``) by one float32 ulp (tests/test_resident.py
  bounds it).
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


def mix_channels(x: jax.Array, m: jax.Array) -> jax.Array:
  """``x @ m`` over the last axis of 3 channels, as element-wise products.

  ``m`` is [3, D] (one matrix) or [n, 3, D] (one per image). Written out
  because XLA:CPU runs a dot with a contraction of 3 through its general
  matrix kernel, much slower than the fused products.
  """
  if m.ndim == 3:
    m = m[:, None, None]  # [n, 1, 1, 3, D]
  return x[..., 0:1] * m[..., 0, :] + x[..., 1:2] * m[..., 1, :] + x[..., 2:3] * m[..., 2, :]


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
  stains = mix_channels(od, jnp.asarray(HED_FROM_RGB, jnp.float32))
  stains = stains * scale[:, None, None, :] + shift[:, None, None, :]
  od = mix_channels(stains, jnp.asarray(RGB_FROM_HED, jnp.float32))
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


# -- Another lab's cells. What changes between labs is the microscope's
# magnification and the crop around the cell (a cell spans a different share
# of the image), the optics' sharpness, the camera's colour response, exposure
# and noise, and the stain's hue and strength. Each op below draws one strength
# per image from its own key, in a range that includes the identity, and acts
# on float images in [0, 1]: :func:`apply_domain` chains them in the order
# light meets them (geometry, blur, colour, noise).

def affine_draws(key: jax.Array, n: int, zoom: tuple[float, float], rotate: bool,
                 translate: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Per image: zoom (log-uniform in ``zoom``), angle in radians, shift [n, 2] (fraction of side)."""
  k_zoom, k_angle, k_shift = jax.random.split(key, 3)
  lo, hi = np.log(zoom[0]), np.log(zoom[1])
  z = jnp.exp(jax.random.uniform(k_zoom, (n,), jnp.float32, lo, hi))
  angle = (jax.random.uniform(k_angle, (n,), jnp.float32, 0.0, 2 * np.pi) if rotate
           else jnp.zeros((n,), jnp.float32))
  shift = jax.random.uniform(k_shift, (n, 2), jnp.float32, -translate, translate)
  return z, angle, shift


def _reflect(u: jax.Array, size: int) -> jax.Array:
  """Continuous coordinates folded into [0, size - 1] by mirror reflection."""
  period = 2.0 * (size - 1)
  u = jnp.mod(u, period)
  return jnp.where(u > size - 1, period - u, u)


def apply_affine(images: jax.Array, zoom: jax.Array, angle: jax.Array,
                 shift: jax.Array) -> jax.Array:
  """Images [n, H, W, C] magnified by ``zoom``, turned by ``angle`` and moved by ``shift``.

  Output pixel ``p`` reads the input at ``c + R(-angle) (p - c) / zoom - shift * side``
  (``c`` the centre), bilinearly. Outside the image the input is mirrored, so a
  zoomed-out cell sits among mirrored neighbours on the smear's own
  background instead of a black frame no microscope makes. Zoom 1, angle 0
  and shift 0 read every pixel where it is (the identity, exactly).
  """
  n, h, w, _ = images.shape
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  yy, xx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32) - cy,
                        jnp.arange(w, dtype=jnp.float32) - cx, indexing='ij')
  cos, sin = jnp.cos(angle)[:, None, None], jnp.sin(angle)[:, None, None]
  inv = (1.0 / zoom)[:, None, None]
  sy = (cos * yy - sin * xx) * inv + cy - shift[:, 0, None, None] * h
  sx = (sin * yy + cos * xx) * inv + cx - shift[:, 1, None, None] * w
  sy, sx = _reflect(sy, h), _reflect(sx, w)
  y0 = jnp.clip(jnp.floor(sy), 0, h - 2).astype(jnp.int32)
  x0 = jnp.clip(jnp.floor(sx), 0, w - 2).astype(jnp.int32)
  fy, fx = (sy - y0)[..., None], (sx - x0)[..., None]

  def sample(img, y0, x0, fy, fx):
    a, b = img[y0, x0], img[y0, x0 + 1]
    c, d = img[y0 + 1, x0], img[y0 + 1, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy

  return jax.vmap(sample)(images.astype(jnp.float32), y0, x0, fy, fx)


def gaussian_kernels(sigma: jax.Array, radius: int) -> jax.Array:
  """Normalised 1-D Gaussian taps [n, 2 * radius + 1]; sigma 0 gives the identity tap."""
  t = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  s = jnp.maximum(sigma, 1e-3)[:, None]
  k = jnp.exp(-0.5 * (t[None, :] / s) ** 2)
  return k / k.sum(-1, keepdims=True)


def blur_radius(max_sigma: float) -> int:
  """Taps either side of the centre for blurs up to ``max_sigma`` pixels (3 sigma)."""
  return max(1, int(np.ceil(3.0 * max_sigma)))


def blur_matrices(sigma: jax.Array, radius: int, size: int) -> jax.Array:
  """[n, size, size]: row ``i`` holds pixel ``i``'s Gaussian taps on a mirrored edge."""
  offsets = np.arange(-radius, radius + 1)
  src = np.abs(np.arange(size)[:, None] + offsets[None, :])  # Mirror at 0 ...
  src = np.where(src > size - 1, 2 * (size - 1) - src, src)  # ... and at size - 1.
  onehot = np.eye(size, dtype=np.float32)[src]  # [size, K, size]
  return jnp.einsum('nk,ikj->nij', gaussian_kernels(sigma, radius), jnp.asarray(onehot))


def apply_blur(images: jax.Array, sigma: jax.Array, radius: int) -> jax.Array:
  """Each image blurred by a separable Gaussian of its own ``sigma`` (pixels), mirrored edges.

  Written as two batched matrix products (rows, then columns) with each
  image's banded blur matrix: XLA:CPU runs a per-image depthwise convolution
  much slower than these.
  """
  _, h, w, _ = images.shape
  x = jnp.einsum('nij,njwc->niwc', blur_matrices(sigma, radius, h), images.astype(jnp.float32))
  return jnp.einsum('nkw,niwc->nikc', blur_matrices(sigma, radius, w), x)


# ITU-R BT.601 luma: the grey an RGB camera's pixel would read as.
LUMA = np.array([0.299, 0.587, 0.114], np.float64)
# YIQ: luma and two chroma axes; a hue shift is a rotation of the chroma plane.
YIQ_FROM_RGB = np.array([[0.299, 0.587, 0.114],
                         [0.596, -0.274, -0.322],
                         [0.211, -0.523, 0.312]], np.float64)
RGB_FROM_YIQ = np.linalg.inv(YIQ_FROM_RGB)


def colour_draws(key: jax.Array, n: int, a: StepAugment) -> dict[str, jax.Array]:
  """Per image: brightness shift, contrast / saturation factors, hue turn, gamma, grey flag."""
  ks = jax.random.split(key, 6)

  def u(k, lo, hi):
    return jax.random.uniform(k, (n,), jnp.float32, lo, hi)

  return {
      'brightness': u(ks[0], -a.brightness, a.brightness),
      'contrast': u(ks[1], 1.0 - a.contrast, 1.0 + a.contrast),
      'saturation': u(ks[2], 1.0 - a.saturation, 1.0 + a.saturation),
      'hue': u(ks[3], -a.hue, a.hue),  # Fraction of a full turn.
      'gamma': jnp.exp(u(ks[4], -a.gamma, a.gamma)),
      'grey': jax.random.uniform(ks[5], (n,)) < a.grayscale,
  }


def apply_colour(images: jax.Array, d: dict[str, jax.Array]) -> jax.Array:
  """Brightness, contrast, saturation, hue, gamma and grayscale, per image, clipped to [0, 1].

  Brightness adds to every channel; contrast scales about the image's mean
  grey; saturation scales the distance from each pixel's own grey; hue
  rotates the YIQ chroma plane (a linear stand-in for HSV's hue that needs
  no branches); gamma raises to a power (the camera's response curve); a
  grey image keeps only luma in all three channels.
  """
  def col(v):
    return v[:, None, None, None]

  x = images.astype(jnp.float32)
  luma = jnp.asarray(LUMA, jnp.float32)[:, None]  # [3, 1]
  x = jnp.clip(x + col(d['brightness']), 0.0, 1.0)
  # The mean grey is the luma of the channel means (reducing the plain image
  # first: XLA:CPU reduces a fused channel mix much slower).
  mean = x.reshape(x.shape[0], -1, 3).mean(1) @ luma[:, 0]
  x = jnp.clip(col(mean) + col(d['contrast']) * (x - col(mean)), 0.0, 1.0)
  grey = mix_channels(x, luma)
  x = jnp.clip(grey + col(d['saturation']) * (x - grey), 0.0, 1.0)
  theta = 2 * np.pi * d['hue']
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  one, zero = jnp.ones_like(cos), jnp.zeros_like(cos)
  rot = jnp.stack([jnp.stack([one, zero, zero], -1),
                   jnp.stack([zero, cos, -sin], -1),
                   jnp.stack([zero, sin, cos], -1)], -2)  # [n, 3, 3] on (Y, I, Q).
  m = (jnp.asarray(RGB_FROM_YIQ, jnp.float32) @ rot
       @ jnp.asarray(YIQ_FROM_RGB, jnp.float32))  # [n, 3, 3]: new RGB rows from old.
  x = jnp.clip(mix_channels(x, jnp.swapaxes(m, 1, 2)), 0.0, 1.0)
  x = jnp.exp(col(d['gamma']) * jnp.log(jnp.maximum(x, _EPS)))  # x ** gamma, a faster form.
  grey = jnp.broadcast_to(mix_channels(x, luma), x.shape)
  return jnp.where(col(d['grey']), grey, x)


def apply_noise(images: jax.Array, key: jax.Array, max_sigma: float) -> jax.Array:
  """Gaussian sensor noise, its standard deviation U(0, max_sigma) per image, clipped."""
  k_level, k_noise = jax.random.split(key)
  sigma = jax.random.uniform(k_level, (images.shape[0],), jnp.float32, 0.0, max_sigma)
  noise = jax.random.normal(k_noise, images.shape, jnp.float32)
  return jnp.clip(images + sigma[:, None, None, None] * noise, 0.0, 1.0)


def apply_domain(images: jax.Array, key: jax.Array, a: StepAugment) -> jax.Array:
  """The lab-to-lab ops ``a`` turns on, in the order light meets them; float [0, 1] in and out.

  Geometry, then blur, stain jitter, colour and noise, each from its own key
  folded into ``key`` (the step's augmentation key), so turning one on
  changes no other's draws. Blur sigmas are ``a.blur`` times the image side.
  With ``a.domain_prob`` < 1 each image keeps its own pixels with probability
  ``1 - domain_prob`` (a draw of its own stream).
  """
  n, side = images.shape[0], images.shape[1]
  x = images.astype(jnp.float32)
  if a.geometric:
    z, angle, shift = affine_draws(jax.random.fold_in(key, AFFINE_STREAM), n, a.zoom,
                                   a.rotate, a.translate)
    x = apply_affine(x, z, angle, shift)
  if a.blur:
    max_sigma = a.blur * side
    sigma = jax.random.uniform(jax.random.fold_in(key, BLUR_STREAM), (n,), jnp.float32,
                               0.0, max_sigma)
    x = apply_blur(x, sigma, blur_radius(max_sigma))
  if a.stain:
    scale, shift = stain_draws(jax.random.fold_in(key, STAIN_STREAM), n, a.stain)
    x = apply_stain(x, scale, shift)
  if a.colour:
    x = apply_colour(x, colour_draws(jax.random.fold_in(key, COLOUR_STREAM), n, a))
  if a.noise:
    x = apply_noise(x, jax.random.fold_in(key, NOISE_STREAM), a.noise)
  if a.domain_prob < 1.0:
    changed = jax.random.uniform(jax.random.fold_in(key, CHOICE_STREAM), (n,)) < a.domain_prob
    x = jnp.where(changed[:, None, None, None], x, images.astype(jnp.float32))
  return x.astype(images.dtype)
