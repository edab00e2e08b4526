"""Procedurally drawn cell-like images: eight learnable classes, any size.

Tests, offline demos and benchmarks need data that exists everywhere, costs
nothing to make, and that a model can learn: reaching high accuracy on it in
a few steps is an end-to-end check that the trainer really learns. Each class
is drawn with the cue a haematologist would look at (cell size, cytoplasm
colour, nucleus shape and colour, granules), plus nuisance variation
(position, orientation, size, colour, red cells in the background, noise) so
that the task is not a lookup of one pixel::

    images, labels = synthetic.make_split(seed=42, split='train', num=64,
                                          image_size=32)

Every image is a pure function of ``(seed, split, index, image_size)``.
"""

import numpy as np

from bcjax.data import spec
from bcjax.data.spec import CLASS_NAMES
from bcjax.data.tf_cpu import tf

SPLIT_IDS = {'train': 0, 'validation': 1, 'test': 2}

# Per class: cell radius, cytoplasm RGB, nucleus RGB, nucleus kind.
_CELLS = (
    (0.22, (0.78, 0.66, 0.86), (0.22, 0.08, 0.32), 'granules'),  # basophil
    (0.25, (0.96, 0.62, 0.42), (0.42, 0.20, 0.55), 'bilobed'),  # eosinophil
    (0.16, (0.55, 0.58, 0.86), (0.18, 0.05, 0.28), 'round_dense'),  # erythroblast
    (0.29, (0.70, 0.74, 0.92), (0.58, 0.40, 0.74), 'oval'),  # ig
    (0.18, (0.62, 0.76, 0.97), (0.33, 0.14, 0.50), 'round_big'),  # lymphocyte
    (0.31, (0.76, 0.73, 0.80), (0.50, 0.36, 0.66), 'kidney'),  # monocyte
    (0.24, (0.92, 0.82, 0.86), (0.40, 0.18, 0.56), 'multilobed'),  # neutrophil
    (0.00, (0.00, 0.00, 0.00), (0.55, 0.32, 0.72), 'fragments'),  # platelet
)
assert len(_CELLS) == len(CLASS_NAMES)


def split_sizes(num_examples: int, train_fraction: float,
                val_fraction: float) -> dict[str, int]:
  """The 70/15/15 (by default) split of ``num_examples``, rounded half up."""
  train = int(np.floor(num_examples * train_fraction + 0.5))
  val = int(np.floor(num_examples * (train_fraction + val_fraction) + 0.5)) - train
  return {'train': train, 'validation': val, 'test': num_examples - train - val}


def _paint_ellipse(image, cx, cy, a, b, theta, color):
  """Blends an antialiased filled ellipse into ``image`` (float HxWx3, in place).

  Coordinates are fractions of the side; only the ellipse's bounding box is
  touched, so hundreds of granules stay cheap at 224 px.
  """
  size = image.shape[0]
  r = max(a, b)
  x0, x1 = max(int((cx - r) * size) - 1, 0), min(int((cx + r) * size) + 2, size)
  y0, y1 = max(int((cy - r) * size) - 1, 0), min(int((cy + r) * size) + 2, size)
  if x0 >= x1 or y0 >= y1:
    return
  ys = (np.arange(y0, y1) + 0.5) / size - cy
  xs = (np.arange(x0, x1) + 0.5) / size - cx
  dx, dy = np.meshgrid(xs, ys)
  c, s = np.cos(theta), np.sin(theta)
  u, v = c * dx + s * dy, -s * dx + c * dy
  # Approximate signed distance to the boundary, in pixels.
  dist = (np.sqrt((u / a) ** 2 + (v / b) ** 2) - 1.0) * min(a, b) * size
  alpha = np.clip(0.5 - dist, 0.0, 1.0)[..., None]
  patch = image[y0:y1, x0:x1]
  patch *= 1.0 - alpha
  patch += alpha * np.asarray(color)


def draw(rng: np.random.Generator, label: int, image_size: int) -> np.ndarray:
  """One uint8 (image_size, image_size, 3) image of class ``label``."""
  image = np.empty((image_size, image_size, 3))
  image[...] = np.array([0.93, 0.84, 0.84]) + rng.uniform(-0.04, 0.04, 3)
  for _ in range(rng.integers(2, 6)):  # Red blood cells around the cell.
    x, y = rng.uniform(0.0, 1.0, 2)
    rr = rng.uniform(0.11, 0.16)
    _paint_ellipse(image, x, y, rr, rr * rng.uniform(0.85, 1.0),
                   rng.uniform(0, np.pi), (0.88, 0.58, 0.58))
    _paint_ellipse(image, x, y, rr * 0.45, rr * 0.45, 0.0, (0.92, 0.72, 0.72))

  radius, cytoplasm, nucleus, kind = _CELLS[label]
  zoom = rng.uniform(0.9, 1.1)
  cx, cy = 0.5 + rng.uniform(-0.07, 0.07, 2)
  theta = rng.uniform(0, 2 * np.pi)
  jitter = lambda color: np.clip(np.asarray(color) + rng.uniform(-0.05, 0.05, 3), 0, 1)
  cytoplasm, nucleus = jitter(cytoplasm), jitter(nucleus)
  radius *= zoom
  along = np.array([np.cos(theta), np.sin(theta)])

  def at(offset_along, offset_across=0.0):
    across = np.array([-along[1], along[0]])
    p = np.array([cx, cy]) + zoom * (offset_along * along + offset_across * across)
    return p[0], p[1]

  if kind != 'fragments':
    _paint_ellipse(image, cx, cy, radius, radius * rng.uniform(0.9, 1.0),
                   theta, cytoplasm)
  if kind == 'granules':
    _paint_ellipse(image, cx, cy, radius * 0.55, radius * 0.5, theta, nucleus)
    for _ in range(40):
      rho, phi = radius * np.sqrt(rng.uniform(0, 0.8)), rng.uniform(0, 2 * np.pi)
      g = 0.02 * zoom
      _paint_ellipse(image, cx + rho * np.cos(phi), cy + rho * np.sin(phi), g, g,
                     0.0, nucleus)
  elif kind == 'bilobed':
    for _ in range(30):  # Orange granules first, the nucleus over them.
      rho, phi = radius * np.sqrt(rng.uniform(0, 0.8)), rng.uniform(0, 2 * np.pi)
      g = 0.018 * zoom
      _paint_ellipse(image, cx + rho * np.cos(phi), cy + rho * np.sin(phi), g, g,
                     0.0, (0.9, 0.45, 0.25))
    for side in (-1, 1):
      _paint_ellipse(image, *at(side * 0.085), 0.075 * zoom, 0.06 * zoom,
                     theta, nucleus)
  elif kind == 'round_dense':
    _paint_ellipse(image, cx, cy, radius * 0.7, radius * 0.7, 0.0, nucleus)
  elif kind == 'oval':
    _paint_ellipse(image, *at(0.05), 0.16 * zoom, 0.12 * zoom, theta, nucleus)
  elif kind == 'round_big':
    _paint_ellipse(image, *at(0.02), radius * 0.82, radius * 0.8, theta, nucleus)
  elif kind == 'kidney':
    _paint_ellipse(image, cx, cy, 0.19 * zoom, 0.13 * zoom, theta, nucleus)
    _paint_ellipse(image, *at(0.0, 0.12), 0.09 * zoom, 0.07 * zoom, theta,
                   cytoplasm)
  elif kind == 'multilobed':
    lobes = rng.integers(3, 5)
    for k in range(lobes):
      offset = (k - (lobes - 1) / 2) * 0.075
      _paint_ellipse(image, *at(offset, 0.03 * np.sin(3 * offset / 0.075)),
                     0.045 * zoom, 0.04 * zoom, theta, nucleus)
  elif kind == 'fragments':
    for _ in range(rng.integers(3, 7)):
      x, y = np.array([cx, cy]) + rng.uniform(-0.12, 0.12, 2)
      g = rng.uniform(0.03, 0.05)
      _paint_ellipse(image, x, y, g, g * rng.uniform(0.7, 1.0),
                     rng.uniform(0, np.pi), nucleus)

  image += rng.normal(0.0, 0.02, image.shape)
  return np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)


def make_split(*, seed: int, split: str, num: int,
               image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """``num`` images (uint8, N x S x S x 3) and labels (int32), classes balanced.

  Example ``i`` has label ``i % 8`` and is drawn from its own generator
  ``(seed, split, i)``, so sizes and splits never change each other.
  """
  images = np.empty((num, image_size, image_size, 3), np.uint8)
  labels = np.arange(num, dtype=np.int32) % len(CLASS_NAMES)
  for i in range(num):
    rng = np.random.default_rng([seed, SPLIT_IDS[split], i])
    images[i] = draw(rng, int(labels[i]), image_size)
  return images, labels


def prepare(config) -> spec.DatasetInfo:
  """Nothing to build: the sizes follow from ``config.data.synthetic_examples``."""
  sizes = split_sizes(config.data.synthetic_examples,
                      config.data.train_fraction, config.data.val_fraction)
  return spec.DatasetInfo(CLASS_NAMES, sizes, config.image_size)


def raw_split(config, split: str) -> spec.RawSplit:
  """The split drawn at ``config.image_size`` from ``config.data.seed``."""
  num = prepare(config).split_sizes[split]
  images, labels = make_split(seed=config.data.seed, split=split, num=num,
                              image_size=config.image_size)
  names = np.array([f'synthetic/{split}/{i:05d}' for i in range(num)], dtype=bytes)
  dataset = tf.data.Dataset.from_tensor_slices(
      {'image': images, 'label': labels, 'file_name': names})
  return spec.RawSplit(dataset, num, encoded=False)
