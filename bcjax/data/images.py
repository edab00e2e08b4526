"""Image bytes to 8-bit RGB, and the one resize + scale the model ever sees.

Real folders hold JPEGs, but also files that are not images, truncated files,
and whatever users add (grayscale, RGBA, palette or 16-bit PNGs). Everything
that reads pixels goes through this module so that the builder, the pipeline
and ``predict.py`` agree bit for bit:

    stored = normalize(data)          # bytes tf.io.decode_image reads as RGB8
    image = decode(stored)            # uint8 (H, W, 3), TensorFlow's decoder
    x = preprocess(image, 64)         # float32 (64, 64, 3) in [0, 1]

:func:`normalize` keeps an RGB JPEG's original bytes (no second lossy
encoding) after TensorFlow has decoded it once, which proves the pipeline can
decode it later. Any other readable image is converted to 8-bit RGB with
Pillow and stored as lossless PNG.
"""

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image

from bcjax import errors
from bcjax.data.tf_cpu import tf

# Far beyond any cell image (PBC's JPEGs are ~100 KB, 360x363 px), so a file
# or zip entry declaring more is refused before it is read, and an image
# header declaring more pixels than Pillow's decompression-bomb threshold is
# an error, not a warning: a few-KB file must not make a process allocate
# gigabytes.
MAX_FILE_BYTES = 64 * 2**20
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
# Pillow warns (once, on stderr) before it raises; _check_pixels raises at the warning's
# threshold instead, with the file's name, so the warning is only noise.
warnings.filterwarnings('ignore', category=Image.DecompressionBombWarning)


class UnreadableImageError(ValueError):
  """A file that is not a decodable image; ``str(e)`` is the short reason."""


def _check_pixels(image: Image.Image) -> None:
  width, height = image.size
  if width * height > MAX_PIXELS:
    raise UnreadableImageError(
        f'declares {width}x{height} pixels, more than {MAX_PIXELS:,} (a decompression bomb?)')


def too_large(size: int) -> str | None:
  """The reason a file of ``size`` bytes is not read, or None."""
  if size > MAX_FILE_BYTES:
    return (f'{size:,} bytes, more than any cell image (limit {MAX_FILE_BYTES:,}); '
            'not read')
  return None


def to_rgb8(image: Image.Image) -> np.ndarray:
  """Converts any Pillow image to uint8 (H, W, 3).

  Pillow's own ``convert('RGB')`` clips 16-bit and 32-bit integer images
  instead of scaling them, so those modes are rescaled by their bit depth
  here first. bcjax/export_loader_example.py has a copy (it imports nothing
  from bcjax); tests/test_faults_data.py checks the two read alike.
  """
  mode = image.mode
  if mode.startswith('I;16') or mode in ('I', 'F'):
    array = np.asarray(image).astype(np.float64)
    peak = array.max(initial=0.0)
    if mode.startswith('I;16') or peak > 255:
      top = 65535.0  # 16-bit data (Pillow may open it as 32-bit 'I').
    elif mode == 'F' and peak <= 1.0:
      top = 1.0  # Float image in [0, 1].
    else:
      top = 255.0
    gray = np.clip(np.round(array / top * 255.0), 0, 255).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  if mode == 'P' and 'transparency' in image.info:
    image = image.convert('RGBA')
  return np.asarray(image.convert('RGB'), dtype=np.uint8)


def _normalize_and_decode(data: bytes) -> tuple[bytes, np.ndarray]:
  if not data:
    raise UnreadableImageError('empty file')
  try:
    with Image.open(io.BytesIO(data)) as image:
      _check_pixels(image)  # From the header, before anything is decoded.
      if image.format == 'JPEG' and image.mode == 'RGB':
        try:
          return data, decode(data).numpy()
        except tf.errors.InvalidArgumentError as e:
          reason = str(e).strip().splitlines()[0]
          raise UnreadableImageError(f'corrupt or truncated JPEG ({reason})') from None
      image.load()
      array = to_rgb8(image)
  except Image.UnidentifiedImageError:
    raise UnreadableImageError('not an image') from None
  except UnreadableImageError:
    raise
  except Image.DecompressionBombError as e:
    raise UnreadableImageError(f'a decompression bomb ({e})') from None
  except (OSError, SyntaxError, ValueError) as e:
    raise UnreadableImageError(f'corrupt or truncated image ({e})') from None
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG', compress_level=1)
  return buffer.getvalue(), array


def normalize(data: bytes) -> bytes:
  """Bytes that :func:`decode` turns into 8-bit RGB, or UnreadableImageError."""
  return _normalize_and_decode(data)[0]


def decode(data) -> tf.Tensor:
  """Encoded JPEG/PNG bytes (from :func:`normalize`) to uint8 (H, W, 3)."""
  return tf.io.decode_image(data, channels=3, dtype=tf.uint8,
                            expand_animations=False)


def read_image(path) -> np.ndarray:
  """Reads one image file as uint8 RGB (H, W, 3), as the builder would.

  Raises:
    errors.UserError: ``cannot read image <path>: <reason>`` when the file is
      missing or not a decodable image.
  """
  try:
    st = os.stat(path)  # Before opening: a FIFO would block, a huge file fill memory.
    if not stat.S_ISREG(st.st_mode):
      raise UnreadableImageError('not a regular file')
    if too_large(st.st_size):
      raise UnreadableImageError(too_large(st.st_size))
    with open(path, 'rb') as f:
      data = f.read(MAX_FILE_BYTES + 1)
    return _normalize_and_decode(data)[1]
  except (OSError, UnreadableImageError) as e:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    raise errors.UserError(f'cannot read image {path}: {reason}') from None


def resize_uint8(images, image_size: int) -> tf.Tensor:
  """Antialiased bilinear resize to a square, rounded back to uint8.

  Works on one image (H, W, C) or a batch (N, H, W, C). Rounding back to
  uint8 keeps the cache four times smaller than float32; images already at
  the target size pass through unchanged (the kernel is the identity there).
  """
  images = tf.convert_to_tensor(images)
  if images.shape[-3] == image_size and images.shape[-2] == image_size:
    return tf.cast(images, tf.uint8)
  resized = tf.image.resize(images, (image_size, image_size),
                            method='bilinear', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(resized), 0.0, 255.0), tf.uint8)


def scale(images) -> tf.Tensor:
  """uint8 to float32 in [0, 1]: the paper's 1/255, done as late as possible."""
  return tf.cast(images, tf.float32) / 255.0


def preprocess(images_uint8, image_size: int):
  """The pipeline's resize + scale, for one image or a batch.

  Returns a NumPy array when given NumPy input (eager use in ``predict.py``),
  a tf.Tensor when given a tensor (inside tf.data).
  """
  out = scale(resize_uint8(images_uint8, image_size))
  if tf.is_tensor(images_uint8):
    return out
  return out.numpy()
