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


def read_image(path: str, size: int) -> np.ndarray:
  """An image file as the model's input (``meta['input']``): RGB, resized, / 255.

  JAX's antialiased linear resize stands in for the training pipeline's
  TensorFlow one; both round to uint8 before scaling. They differ by at most
  a grey level or so at some pixels.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as image:
    rgb = np.asarray(image.convert('RGB'), np.float32)
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
