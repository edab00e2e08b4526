"""A model meant for other labs' cells: configs/best.py's hybrid plus lab-to-lab training.

PBC comes from one hospital, one CellaVision DM96 and one stain; another
lab's microscope frames its cells at another scale, blurs them differently,
and its camera and stain give other colours. This recipe takes
configs/best.py's (the paper's Table 2 hybrid; flips, rotations, AdamW with
warm-up + cosine, EMA, label smoothing) and adds, in the train step
(bcjax/augment.py, ``apply_domain``), random zoom, rotation and translation,
blur, stain and colour jitter, gamma, grayscale and sensor noise on half of
each batch; the model standardises each image per channel before its first
convolution. It keeps BatchNorm: at a new lab, ``--mode=adapt`` re-estimates
the BatchNorm statistics from the lab's unlabelled images (AdaBN), which is
where most of the other-lab accuracy comes from (docs/robustness.md,
docs/adaptation.md). How each part was chosen, on PBC's validation split and
the other-lab validation folder, is in docs/robustness.md. Train::

    python launch.py --config configs/robust.py:cpu --workdir runs/robust_cpu_s0 \
        --config.data.path=../shared/data/PBC_dataset_normal_DIB

adapt to a lab's unlabelled images and evaluate on its labelled folder::

    python launch.py --config configs/robust.py:cpu --workdir runs/robust_cpu_s0 --mode=adapt \
        --config.adapt.images=LAB_FOLDER --out runs/robust_cpu_s0_lab
    python launch.py --config configs/robust.py:cpu --workdir runs/robust_cpu_s0_lab --mode=eval \
        --config.data.split=all --config.data.path=LAB_FOLDER --out runs/robust_cpu_s0_lab/eval

Variants: ``''`` (224 px, 30 epochs: a GPU's or a day's CPU run), ``cpu``
(112 px, 15 epochs, sized for a 2-core CPU) and ``tiny`` (seconds, synthetic
data).
"""

import ml_collections

from configs import best, default

VARIANTS = ('', 'cpu', 'tiny')


def lab_to_lab(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The augmentation and normalisation fields of the recipe, on top of any hybrid config."""
  a = c.data.augment
  a.zoom = (0.6, 1.8)  # A cell at 0.6 to 1.8 times its PBC size.
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
  a.domain_prob = 0.5  # Half of each batch as PBC shows it.
  c.model.input_norm = 'channels'
  return c


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  if variant not in VARIANTS:
    raise ValueError(f'unknown variant {variant!r} of configs/robust.py; known: '
                     + ', '.join(repr(v) for v in VARIANTS))
  c = best.get_config('hybrid_cpu' if variant == 'cpu' else 'hybrid')
  c = lab_to_lab(c)
  if variant == 'tiny':
    c = default.tiny(c)
    c.image_size = 28
    c.model.extractor_features = (8, 8)  # 28 px -> the 7x7 grid, 49 steps.
  c.name = 'robust' + (':' + variant if variant else '')
  return c
