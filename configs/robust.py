"""A model meant to hold on other labs' cells: configs/best.py plus lab-to-lab training.

PBC comes from one hospital, one CellaVision DM96 and one stain; another
lab's microscope frames its cells at another scale, blurs them differently,
and its camera and stain give other colours. A model trained on PBC alone
learns all of PBC's constants. This recipe takes configs/best.py's (flips,
rotations, AdamW with warm-up + cosine, EMA, label smoothing) and adds, in
the train step (bcjax/augment.py, ``apply_domain``), random zoom, rotation
and translation, blur, stain and colour jitter, gamma, grayscale and sensor
noise; the model standardises each image per channel and normalises its
extractor per image (GroupNorm), so it carries no statistics of PBC's images
into another lab's. How each part was chosen, on PBC's validation split and
the other-lab validation folder, is in docs/robustness.md. Train::

    python launch.py --config configs/robust.py:cpu --workdir runs/robust_cpu_s0 \
        --config.data.path=../shared/data/PBC_dataset_normal_DIB

and evaluate on another lab's labelled folder (docs/other_labs.md)::

    python launch.py --config configs/robust.py:cpu --workdir runs/robust_cpu_s0 --mode=eval \
        --config.data.split=all --config.data.path=LAB_FOLDER --out runs/robust_cpu_s0/eval_lab

Variants: ``''`` (224 px, 30 epochs, a GPU's or a day's CPU run), ``cpu``
(112 px, sized for a 2-core CPU) and ``tiny`` (seconds, synthetic data).
"""

import ml_collections

from configs import best, default

VARIANTS = ('', 'cpu', 'tiny')


def lab_to_lab(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The augmentation and normalisation fields of the recipe, on top of any hybrid config."""
  a = c.data.augment
  a.zoom = (0.6, 1.8)  # A cell at 0.6-1.8x its PBC size.
  a.rotate = True
  a.translate = 0.05
  a.blur = 0.02  # Sigma up to 2% of the side: 2.2 px at 112 px.
  a.stain = 0.3
  a.brightness = 0.15
  a.contrast = 0.4
  a.saturation = 0.6
  a.hue = 0.08
  a.gamma = 0.3
  a.grayscale = 0.1
  a.noise = 0.04
  c.model.norm = 'group'
  c.model.input_norm = 'channels'
  return c


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r} of configs/robust.py; known: '
                     + ', '.join(repr(v) for v in VARIANTS))
  c = best.get_config({'': '', 'cpu': 'cpu', 'tiny': 'tiny'}[variant])
  c = lab_to_lab(c)
  c.name = 'robust' + (':' + variant if variant else '')
  if variant == 'cpu':
    c.num_epochs = 15
  return c
