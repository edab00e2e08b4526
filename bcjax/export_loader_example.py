"""Runs a model exported by ``launch.py --mode=export`` with JAX alone: no flax, no bcjax.

Copy this file anywhere JAX runs (it imports nothing from bcjax) and give it the
export directory and image files::

    python export_loader_example.py export/cnn_attention cell1.jpg cell2.png

It prints each image's predicted class and probability. Needs ``jax`` and
``numpy``, and Pillow to decode image files. The same artifact runs on CPU or
on a CUDA GPU: JAX picks the lowering of the device it runs on.
"""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import export


def load(directory: str):
  """``(forward, meta)``: forward maps float32 images [N, S, S, 3] in [0, 1] to logits."""
  with open(os.path.join(directory, 'model.json')) as f:
    meta = json.load(f)
  with open(os.path.join(directory, meta['artifact']), 'rb') as f:
    exported = export.deserialize(bytearray(f.read()))
  return exported.call, meta


def to_rgb8(image) -> np.ndarray:
  """Any Pillow image as uint8 (H, W, 3), as bcjax's training pipeline reads it.

  Pillow's ``convert('RGB')`` clips 16- and 32-bit images instead of scaling
  them (a 16-bit PNG would turn white), so those are scaled by their depth
  first; a palette with a transparent colour goes through RGBA.
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


def read_image(path: str, size: int) -> np.ndarray:
  """An image file as the model's input (``meta['input']``): RGB, resized, / 255.

  JAX's antialiased linear resize stands in for the training pipeline's
  TensorFlow one; both round to uint8 before scaling. They differ by at most
  a grey level or so at some pixels.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as image:
    rgb = to_rgb8(image).astype(np.float32)
  resized = jax.image.resize(rgb, (size, size, 3), 'linear', antialias=True)
  return np.asarray(jnp.clip(jnp.round(resized), 0, 255), np.float32) / 255


def main(argv: list[str]) -> None:
  if len(argv) < 2:
    sys.exit(f'usage: {os.path.basename(__file__)} EXPORT_DIR IMAGE [IMAGE ...]')
  forward, meta = load(argv[0])
  images = np.stack([read_image(p, meta['image_size']) for p in argv[1:]])
  probs = np.asarray(jax.nn.softmax(forward(images), axis=-1))
  for path, p in zip(argv[1:], probs):
    print(f"{path}: {meta['class_names'][int(p.argmax())]} ({p.max():.3f})")


if __name__ == '__main__':
  main(sys.argv[1:])
