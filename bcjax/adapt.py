"""Adapting a trained model to a new lab: ``launch.py --mode=adapt``.

A model trained on PBC meets another lab's microscope, camera and stain. The
lab can give many unlabelled images of its own cells and a few cells its
staff label; each becomes a new workdir whose checkpoint every other mode
reads (eval, predict, explain, export, ``--ensemble``). The source workdir is
only read. ``config.adapt.method`` picks what is updated:

* ``'adabn'`` (Li et al. 2016): the BatchNorm statistics (``batch_stats``
  mean and variance) become the exact mean and (biased) variance of each
  layer's input over all the lab's images; nothing else changes. Computed
  layer by layer in inference mode (:func:`adabn`): each pass runs every
  image once, with the statistics found so far, and records each norm
  layer's input moments (summed over the batches, weighted by their sizes,
  combined exactly in float64); after as many passes as the model has
  BatchNorm layers, every layer's statistics are those of the activations it
  receives once the layers before it use their new statistics. The fused
  ``layers.BatchNormReluPool`` of the extractors and flax ``nn.BatchNorm``
  are both found by intercepting their calls, so no model code changes. A
  model without BatchNorm (GroupNorm, LayerNorm) has no statistics to
  re-estimate: AdaBN leaves it unchanged and says so.
* ``'tent'`` (Wang et al., ICLR 2021): AdaBN, then ``adapt.tent_steps`` Adam
  steps on the mean prediction entropy of batches of the lab's images,
  updating only the normalisation layers' ``scale`` and ``bias`` (BatchNorm,
  GroupNorm and LayerNorm alike). As in the paper, BatchNorm normalises by
  each batch's statistics during those steps (dropout is off); AdaBN then runs
  again so the saved statistics are those of the adapted layers.
* ``'finetune'``: supervised steps on a labelled folder (class sub-folders,
  any subset of the model's classes), from the trained weights, with the
  config's own train step (``bcjax.steps.train_step``: its flips, rotations,
  stain jitter, label smoothing and optimiser; ``adapt.learning_rate``,
  constant). ``adapt.trainable`` picks what moves: ``'head'`` (the hybrids'
  ``head`` subtree; the last Dense layer of a model without one), ``'norm'``
  (normalisation scale and shift) or ``'all'``. Stopping rule: a fixed budget
  of ``adapt.steps`` steps, chosen on Chulalongkorn (docs/adaptation.md), so no
  labelled image is spent on validation. With ``adapt.adabn`` (default) the
  statistics start from and end at AdaBN on the lab's unlabelled images (the
  labelled ones included).

No label is read by ``adabn`` and ``tent``. The new workdir's ``config.json``
is the config that adapted it plus an ``adaptation`` record: source workdir
and checkpoint, method, and every image used (paths, and a SHA-256 of their
names and bytes).

Usage::

    python launch.py --config configs/best.py:hybrid_cpu --mode=adapt \\
        --workdir runs/base --out runs/base_lab --config.adapt.images=LAB_IMAGES
    python launch.py --config configs/best.py:hybrid_cpu --mode=adapt \\
        --workdir runs/base --out runs/base_lab10 --config.adapt.method=finetune \\
        --config.adapt.labelled=LAB_LABELLED --config.adapt.images=LAB_IMAGES
"""

import dataclasses
import functools
import hashlib
import json
import os
import sys
import time
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from PIL import Image

from bcjax import checkpointing, ensemble_members, files, models, optim, parallel, steps
from bcjax import run_config, train_state
from bcjax.errors import UserError
from bcjax.models import layers

METHODS = ('adabn', 'tent', 'finetune')
TRAINABLE = ('head', 'norm', 'all')
# Layers whose ``batch_stats`` AdaBN re-estimates: flax's and the fused extractor stage.
BATCH_NORMS = (nn.BatchNorm, layers.BatchNormReluPool)
DROPOUTS = (nn.Dropout, layers.Dropout)
# Pillow modes of images without colour: the model reads stained cells in RGB.
GRAY_MODES = ('1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F')
NO_BATCH_NORM = ('the model has no BatchNorm statistics (e.g. GroupNorm or LayerNorm '
                 'normalise each image by itself): AdaBN leaves it unchanged')


def _say(message: str) -> None:
  print(message, flush=True)


def _warn(message: str) -> None:
  print(f'warning: {message}', file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Images.

@dataclasses.dataclass
class Images:
  """The lab's images, resized as the pipeline resizes them (uint8, [n, S, S, 3])."""
  pixels: np.ndarray
  paths: list[str]
  sha256: list[str]
  labels: np.ndarray | None = None  # Indices into the model's class names.

  def digest(self) -> str:
    """One hash of every (path, bytes hash[, label]) in order: what the record names."""
    rows = [f'{p}\t{h}' + (f'\t{int(l)}' if self.labels is not None else '')
            for p, h, l in zip(self.paths, self.sha256,
                               self.labels if self.labels is not None else self.paths)]
    return hashlib.sha256('\n'.join(rows).encode()).hexdigest()

  def subset(self, rows) -> 'Images':
    rows = np.asarray(rows, int)
    return Images(self.pixels[rows], [self.paths[i] for i in rows],
                  [self.sha256[i] for i in rows],
                  None if self.labels is None else self.labels[rows])


def _check_image(path: str, config: ml_collections.ConfigDict) -> None:
  """A one-line UserError for an image the model cannot be adapted with (mode, size)."""
  try:
    with Image.open(path) as image:  # The header only.
      mode, (width, height) = image.mode, image.size
  except (OSError, Image.UnidentifiedImageError, Image.DecompressionBombError):
    return  # Not an image: read_image says so, and the file is skipped.
  if mode in GRAY_MODES:
    raise UserError(f'{path} is a grayscale image (mode {mode}); the model reads colour '
                    'images of stained cells: give the lab\'s colour (RGB) images')
  low, high = int(config.adapt.min_image_side), int(config.adapt.max_image_side)
  if min(width, height) < low or max(width, height) > high:
    raise UserError(f'{path} is {width}x{height} px; adaptation takes single-cell crops '
                    f'between {low} and {high} px a side (config.adapt.min_image_side, '
                    '.max_image_side): crop the cells out of whole fields first')


def read_images(paths: Sequence[str], config: ml_collections.ConfigDict, *,
                what: str = 'images', warn=_warn) -> tuple[Images, list[str]]:
  """Reads, checks and resizes ``paths`` with the pipeline's reader.

  Returns the readable images and the paths skipped as unreadable (each with
  one ``warn`` line). Grayscale images and images outside the crop sizes are
  UserErrors (:func:`_check_image`).
  """
  from bcjax import data  # pylint: disable=g-import-not-at-top  (TensorFlow: import late)
  from bcjax.data import images as image_io  # pylint: disable=g-import-not-at-top
  pixels, kept, hashes, skipped = [], [], [], []
  for path in paths:
    _check_image(path, config)
    try:
      image = data.read_image(path)
    except UserError as e:
      warn(f'skipping {path}: {str(e).replace(f"cannot read image {path}: ", "")}')
      skipped.append(path)
      continue
    with open(path, 'rb') as f:
      hashes.append(hashlib.sha256(f.read()).hexdigest())
    pixels.append(np.asarray(image_io.resize_uint8(image, config.image_size)))
    kept.append(os.path.abspath(path))
  s = config.image_size
  stack = np.stack(pixels) if pixels else np.zeros((0, s, s, 3), np.uint8)
  return Images(stack, kept, hashes), skipped


def read_unlabelled(path: str, config: ml_collections.ConfigDict) -> Images:
  """Every image file under ``path`` (a folder, walked recursively, or one file)."""
  from bcjax import predict  # pylint: disable=g-import-not-at-top
  if not os.path.exists(path):
    raise UserError(f'config.adapt.images: {path} does not exist')
  found, _ = read_images(predict.expand_paths([path]), config)
  if not len(found.paths):
    raise UserError(f'config.adapt.images: {path} holds no readable image')
  return found


def read_labelled(path: str, config: ml_collections.ConfigDict,
                  class_names: Sequence[str]) -> Images:
  """A folder of class sub-folders (any subset of ``class_names``, any letter case)."""
  if not os.path.isdir(path):
    raise UserError(f'config.adapt.labelled: {path} is not a folder of class folders')
  known = {c.lower(): i for i, c in enumerate(class_names)}
  folders = sorted(e for e in os.listdir(path)
                   if os.path.isdir(os.path.join(path, e)) and not e.startswith(('.', '__MACOSX')))
  if not folders:
    raise UserError(f'config.adapt.labelled: {path} has no class folders (expected some of '
                    f'{", ".join(class_names)})')
  for name in folders:
    if name.lower() not in known:
      raise UserError(f'labelled folder {os.path.join(path, name)}: the model does not know '
                      f'class {name!r} (it knows {", ".join(class_names)})')
  lower = [f.lower() for f in folders]
  twice = sorted({f for f in lower if lower.count(f) > 1})
  if twice:
    raise UserError(f'labelled folder {path} has two folders for class {twice[0]!r} '
                    '(names are read case-insensitively); merge them')
  from bcjax import predict  # pylint: disable=g-import-not-at-top
  parts = []
  for name in folders:
    folder = os.path.join(path, name)
    try:
      listed = predict.expand_paths([folder])
    except UserError:
      listed = []
    found, _ = read_images(listed, config)
    if not len(found.paths):
      raise UserError(f'class folder {folder} has no readable image')
    found.labels = np.full(len(found.paths), known[name.lower()], np.int32)
    parts.append(found)
  return Images(np.concatenate([p.pixels for p in parts]), sum((p.paths for p in parts), []),
                sum((p.sha256 for p in parts), []), np.concatenate([p.labels for p in parts]))


# ---------------------------------------------------------------------------
# Variables: which ones each method updates.

def has_batch_stats(variables: dict[str, Any]) -> bool:
  return bool(jax.tree.leaves(variables.get('batch_stats') or {}))


def norm_affine_labels(params) -> dict:
  """'trained' for every normalisation layer's ``scale`` and ``bias``, 'frozen' elsewhere.

  A normalisation layer (BatchNorm, GroupNorm, LayerNorm) is a module whose
  parameters include ``scale``; convolutions and dense layers have ``kernel``.
  """
  flat = traverse_util.flatten_dict(params)
  norms = {k[:-1] for k in flat if k[-1] == 'scale'}
  return traverse_util.unflatten_dict(
      {k: 'trained' if k[:-1] in norms and k[-1] in ('scale', 'bias') else 'frozen'
       for k in flat})


def trainable_labels(params, trainable: str) -> dict:
  """``params -> 'trained' | 'frozen'`` for ``config.adapt.trainable``."""
  if trainable == 'all':
    return jax.tree.map(lambda _: 'trained', params)
  if trainable == 'norm':
    return norm_affine_labels(params)
  if trainable == 'head':
    head = 'head' if 'head' in params else 'logits'
    if head not in params:
      raise UserError(f"config.adapt.trainable='head': the model has neither a 'head' nor a "
                      f"'logits' layer at the top ({', '.join(sorted(params))})")
    return {k: jax.tree.map(lambda _, k=k: 'trained' if k == head else 'frozen', v)
            for k, v in params.items()}
  raise UserError(f'unknown config.adapt.trainable {trainable!r}; known: {", ".join(TRAINABLE)}')


def _masked(tx: optax.GradientTransformation, labels) -> optax.GradientTransformation:
  return optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)


# ---------------------------------------------------------------------------
# AdaBN.

def _batch_norm_input_moments(model: nn.Module, variables, images: jax.Array,
                              mask: jax.Array) -> dict[str, tuple]:
  """{layer path: (count, mean, sum of squared deviations)} of each BatchNorm's input.

  Inference mode (the saved statistics normalise); rows where ``mask`` is
  False (padding) count nowhere.
  """
  x = images.astype(jnp.float32) / jnp.float32(255.0) if images.dtype == jnp.uint8 else images
  found = {}

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == '__call__' and isinstance(module, BATCH_NORMS):
      h = args[0].astype(jnp.float32)
      w = mask.astype(jnp.float32).reshape((-1,) + (1,) * (h.ndim - 1))
      axes = tuple(range(h.ndim - 1))
      count = w.sum() * np.prod(h.shape[1:-1])
      mean = (h * w).sum(axes) / count
      m2 = (jnp.square(h - mean) * w).sum(axes)
      found['/'.join(module.scope.path)] = (count, mean, m2)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply(variables, x, train=False)
  return found


@functools.lru_cache(maxsize=8)
def _moments_fn(model: nn.Module):
  # Compiled once per model (modules compare by their fields) and batch shape.
  return jax.jit(functools.partial(_batch_norm_input_moments, model))


def _set_stats(batch_stats, path: str, mean: np.ndarray, var: np.ndarray):
  flat = traverse_util.flatten_dict(batch_stats)
  key = tuple(path.split('/'))
  flat[key + ('mean',)] = mean.astype(np.float32)
  flat[key + ('var',)] = var.astype(np.float32)
  return traverse_util.unflatten_dict(flat)


def _batches(n: int, batch_size: int):
  for start in range(0, n, batch_size):
    yield start, min(n, start + batch_size)


def adabn(model: nn.Module, variables: dict[str, Any], pixels: np.ndarray, *,
          batch_size: int = 64) -> dict[str, Any]:
  """``variables`` with every BatchNorm's statistics those of ``pixels`` (uint8 [n, S, S, 3]).

  Exact: per layer, the mean and biased variance over every image and
  position of the input the layer receives in inference mode, once the
  layers before it use their new statistics (one pass over the images per
  BatchNorm layer, see the module's doc). Models without BatchNorm come back
  unchanged.
  """
  if not has_batch_stats(variables):
    return variables
  if not len(pixels):
    raise UserError('AdaBN needs at least one image of the lab')
  moments = _moments_fn(model)
  batch_size = min(batch_size, len(pixels))
  variables = dict(variables)
  n_layers = len(jax.tree.leaves(variables['batch_stats'])) // 2
  for _ in range(n_layers):
    totals: dict[str, tuple[float, np.ndarray, np.ndarray]] = {}
    for start, stop in _batches(len(pixels), batch_size):
      x = np.zeros((batch_size, *pixels.shape[1:]), pixels.dtype)
      x[:stop - start] = pixels[start:stop]
      mask = np.arange(batch_size) < stop - start
      for path, (n_b, mean_b, m2_b) in jax.device_get(moments(variables, x, mask)).items():
        n_b, mean_b, m2_b = float(n_b), mean_b.astype(np.float64), m2_b.astype(np.float64)
        if path not in totals:
          totals[path] = (n_b, mean_b, m2_b)
          continue
        n_a, mean_a, m2_a = totals[path]  # Chan et al.'s pairwise combination: exact.
        n = n_a + n_b
        delta = mean_b - mean_a
        totals[path] = (n, mean_a + delta * n_b / n, m2_a + m2_b + delta ** 2 * n_a * n_b / n)
    stats = variables['batch_stats']
    for path, (n, mean, m2) in totals.items():
      stats = _set_stats(stats, path, mean, m2 / n)
    variables['batch_stats'] = stats
  return variables


# ---------------------------------------------------------------------------
# TENT.

def _deterministic_dropout(next_fun, args, kwargs, context):
  """Dropout as in inference (the identity) while the rest of the model is in training mode."""
  if context.method_name == '__call__' and isinstance(context.module, DROPOUTS):
    return args[0]
  return next_fun(*args, **kwargs)


def mean_entropy(logits: jax.Array) -> jax.Array:
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
  return -(jnp.exp(log_p) * log_p).sum(-1).mean()


def _tent_loss(params, batch_stats, model, images):
  x = images.astype(jnp.float32) / jnp.float32(255.0)
  variables = {'params': params}
  with nn.intercept_methods(_deterministic_dropout):
    if batch_stats:
      variables['batch_stats'] = batch_stats
      logits, _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
    else:
      logits = model.apply(variables, x, train=True)
  return mean_entropy(logits)


@functools.lru_cache(maxsize=4)
def _tent_fns(model: nn.Module, learning_rate: float):
  """TENT's optimiser and jitted step, made once per (model, learning rate) in a process."""
  tx = _masked(optax.adam(learning_rate), norm_affine_labels)

  def step(params, opt_state, batch_stats, images):
    loss, grads = jax.value_and_grad(_tent_loss)(params, batch_stats, model, images)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return tx, jax.jit(step)


def tent(model: nn.Module, variables: dict[str, Any], pixels: np.ndarray, *, steps_: int,
         learning_rate: float, batch_size: int, seed: int) -> dict[str, Any]:
  """Entropy minimisation on the normalisation layers' scale and shift (no labels).

  ``steps_`` Adam steps, each on ``batch_size`` images drawn without
  replacement (a seeded permutation per pass); BatchNorm uses each batch's
  statistics, dropout is off. The caller re-estimates the statistics after.
  """
  params = variables['params']
  labels = norm_affine_labels(params)
  if 'trained' not in jax.tree.leaves(labels):
    raise UserError("config.adapt.method='tent': the model has no normalisation layer "
                    'with a scale and shift to adapt')
  tx, step = _tent_fns(model, float(learning_rate))
  batch_stats = variables.get('batch_stats') or {}
  opt_state = tx.init(params)
  order = _order(len(pixels), min(batch_size, len(pixels)), steps_, seed)
  for i, rows in enumerate(order):
    params, opt_state, loss = step(params, opt_state, batch_stats, pixels[rows])
    if i == 0:
      first = float(loss)
  if steps_:
    _say(f'tent: mean entropy {first:.4f} at the first step, {float(loss):.4f} at the last')
  return dict(variables, params=jax.device_get(params))


def _order(n: int, batch_size: int, count: int, seed: int) -> list[np.ndarray]:
  """``count`` batches of rows: consecutive slices of seeded permutations of ``range(n)``."""
  rng = np.random.default_rng(seed)
  stream = np.zeros(0, int)
  out = []
  for _ in range(count):
    while len(stream) < batch_size:
      stream = np.concatenate([stream, rng.permutation(n)])
    out.append(stream[:batch_size])
    stream = stream[batch_size:]
  return out


# ---------------------------------------------------------------------------
# Few-label fine-tuning.

def finetune(config: ml_collections.ConfigDict, variables: dict[str, Any], labelled: Images, *,
             trainable: str, steps_: int, learning_rate: float, batch_size: int,
             seed: int) -> dict[str, Any]:
  """``steps_`` steps of the config's own train step on ``labelled`` (uint8 images, labels).

  What ``bcjax.steps.train_step`` does in training: the config's flips /
  rotations (on the uint8 batch), stain jitter, label smoothing, BatchNorm in
  training mode; the optimiser is the config's at a constant
  ``learning_rate``, masked to ``trainable``.
  """
  c = ml_collections.ConfigDict(config.to_dict())
  c.optimizer.learning_rate = float(learning_rate)
  c.optimizer.frozen = ''
  c.schedule.name = 'constant'
  c.schedule.warmup_epochs = 0.0
  c.microbatch_size = 0
  c.distill.teachers = ''
  base_tx, _ = optim.make(c, 1)
  params = variables['params']
  tx = _masked(base_tx, trainable_labels(params, trainable))
  state = train_state.TrainState.create(apply_fn=None, params=params, tx=tx,
                                        batch_stats=variables.get('batch_stats') or {})
  runner = parallel.make_runner(c, models.build_model(c, axis_name=steps.AXIS))
  d = runner.num_devices
  batch_size = max(d, min(batch_size, len(labelled.paths)) // d * d)
  state = runner.put_state(state)
  rng = jax.random.key(seed)
  for rows in _order(len(labelled.paths), batch_size, steps_, seed):
    batch = {'image': labelled.pixels[rows].reshape(d, -1, *labelled.pixels.shape[1:]),
             'label': labelled.labels[rows].astype(np.int32).reshape(d, -1)}
    state, _ = runner.train_step(state, runner.put_batch(batch), rng)
  host = runner.get_state(state)
  out = {'params': jax.device_get(host.params)}
  if has_batch_stats(variables):
    out['batch_stats'] = jax.device_get(host.batch_stats)
  return out


# ---------------------------------------------------------------------------
# The whole adaptation, on arrays (the curve calls this too).

def check_config(config: ml_collections.ConfigDict) -> None:
  a = config.adapt
  if a.method not in METHODS:
    raise UserError(f'unknown config.adapt.method {a.method!r}; known: {", ".join(METHODS)}')
  if a.trainable not in TRAINABLE:
    raise UserError(f'unknown config.adapt.trainable {a.trainable!r}; known: '
                    f'{", ".join(TRAINABLE)}')
  for field in ('steps', 'tent_steps'):
    if int(a[field]) < 0:
      raise UserError(f'config.adapt.{field} must be >= 0, got {a[field]}')
  for field in ('batch_size', 'finetune_batch_size'):
    if int(a[field]) < 1:
      raise UserError(f'config.adapt.{field} must be >= 1, got {a[field]}')
  for field in ('learning_rate', 'tent_learning_rate'):
    if not float(a[field]) > 0:
      raise UserError(f'config.adapt.{field} must be > 0, got {a[field]}')


def adapt_variables(config: ml_collections.ConfigDict, variables: dict[str, Any], *,
                    unlabelled: np.ndarray, labelled: Images | None = None,
                    say=_say) -> dict[str, Any]:
  """The adapted model variables for ``config.adapt`` (see the module's doc).

  ``unlabelled``: the lab's images as uint8 [n, S, S, 3] (for AdaBN and
  TENT); ``labelled``: images with labels (finetune only).
  """
  check_config(config)
  a = config.adapt
  model = models.build_model(config)
  bn = has_batch_stats(variables)
  use_adabn = bn and (a.method != 'finetune' or bool(a.adabn))
  if not bn and (a.method != 'finetune' or a.adabn):
    say(NO_BATCH_NORM)
  if use_adabn:
    variables = adabn(model, variables, unlabelled, batch_size=int(a.batch_size))
  if a.method == 'tent':
    variables = tent(model, variables, unlabelled, steps_=int(a.tent_steps),
                     learning_rate=float(a.tent_learning_rate),
                     batch_size=int(a.batch_size), seed=int(a.seed))
    if use_adabn:
      variables = adabn(model, variables, unlabelled, batch_size=int(a.batch_size))
  elif a.method == 'finetune':
    if labelled is None or not len(labelled.paths):
      raise UserError("config.adapt.method='finetune' needs labelled images: set "
                      'config.adapt.labelled to a folder of class folders')
    variables = finetune(config, variables, labelled, trainable=a.trainable,
                         steps_=int(a.steps), learning_rate=float(a.learning_rate),
                         batch_size=int(a.finetune_batch_size), seed=int(a.seed))
    if use_adabn:
      variables = adabn(model, variables, unlabelled, batch_size=int(a.batch_size))
  return variables


# ---------------------------------------------------------------------------
# Workdirs.

def _same_dir(a: str, b: str) -> bool:
  return os.path.realpath(os.path.expanduser(a)) == os.path.realpath(os.path.expanduser(b))


def adapt_workdir(config: ml_collections.ConfigDict, source: str, out: str | None, *,
                  checkpoint: str = 'best') -> dict[str, Any]:
  """Adapts ``source``'s checkpoint with ``config.adapt`` and writes the workdir ``out``.

  The model fields come from the source run's ``config.json``. Returns the
  ``adaptation`` record written into ``out/config.json``.
  """
  started = time.perf_counter()
  check_config(config)
  if not out:
    raise UserError('--mode=adapt needs --out NEW_WORKDIR (the source workdir is never changed)')
  if _same_dir(source, out):
    raise UserError(f'--out {out} is the source workdir itself; adaptation writes a new '
                    'workdir and never changes its source: pass another --out')
  if os.path.isdir(checkpointing.checkpoint_dir(out)):
    raise UserError(f'{out} already holds checkpoints; pass a new --out folder')
  config = ensemble_members.member_config(config, source)  # The model the source trained.
  # Results tables label the adapted run by its source run's name and seed.
  source_record = run_config.read(source) or {}
  config.name = f"{source_record.get('name') or config.name}+{config.adapt.method}"
  config.seed = int(source_record.get('seed', config.seed))
  state, meta, kind, step = train_state.load_for_inference(config, source, checkpoint)
  class_names = train_state.trained_class_names(meta)
  a = config.adapt
  labelled = None
  if a.method == 'finetune':
    if not a.labelled:
      raise UserError("config.adapt.method='finetune' needs config.adapt.labelled: a folder "
                      'with one sub-folder of labelled images per class')
    labelled = read_labelled(a.labelled, config, class_names)
  elif a.labelled:
    raise UserError(f'config.adapt.labelled is set but config.adapt.method={a.method!r} reads '
                    "no labels; use method 'finetune' or unset it")
  parts = []
  if a.images:
    parts.append(read_unlabelled(a.images, config))
  elif a.method != 'finetune':
    raise UserError(f'config.adapt.method={a.method!r} needs config.adapt.images: a folder of '
                    "the lab's unlabelled images")
  if labelled is not None:
    parts.append(dataclasses.replace(labelled, labels=None))
  unlabelled = Images(np.concatenate([p.pixels for p in parts]),
                      sum((p.paths for p in parts), []), sum((p.sha256 for p in parts), []))
  # A file given twice (a labelled image also among config.adapt.images) counts once.
  first = {}
  for i, digest in enumerate(unlabelled.sha256):
    first.setdefault(digest, i)
  unlabelled = unlabelled.subset(sorted(first.values()))
  files.check_writable(out, '--out')
  say_what = (f'{len(labelled.paths)} labelled images of {len(set(labelled.labels.tolist()))} '
              'classes, ' if labelled is not None else '')
  _say(f'adapting {source} ({kind} checkpoint, step {step}) with {a.method}: {say_what}'
       f'{len(unlabelled.paths)} unlabelled images')
  variables = adapt_variables(config, state.variables(), unlabelled=unlabelled.pixels,
                              labelled=labelled)
  seconds = time.perf_counter() - started
  record = {
      'source_workdir': os.path.abspath(source),
      'source_checkpoint': {'kind': kind, 'step': int(step)},
      'method': a.method,
      'adabn': bool(has_batch_stats(state.variables()) and (a.method != 'finetune' or a.adabn)),
      'unlabelled_images': {'paths': unlabelled.paths, 'sha256': unlabelled.digest(),
                            'count': len(unlabelled.paths)},
      'seconds': round(seconds, 1),
  }
  if labelled is not None:
    record['labelled_images'] = {
        'paths': labelled.paths, 'classes': [class_names[i] for i in labelled.labels],
        'sha256': labelled.digest(), 'count': len(labelled.paths)}
  write_workdir(config, out, variables, meta, record)
  _say(f'adapted checkpoint written to {out} in {seconds:.1f} s; evaluate it with '
       f'--mode=eval --workdir {out}')
  return record


def write_workdir(config: ml_collections.ConfigDict, out: str, variables: dict[str, Any],
                  source_meta: dict[str, Any], record: dict[str, Any]) -> None:
  """``out/config.json`` (the config + ``adaptation``) and ``checkpoints/{best,latest}/0``."""
  os.makedirs(out, exist_ok=True)
  recorded = json.loads(config.to_json_best_effort())
  recorded['adaptation'] = record
  files.write_json(os.path.join(out, 'config.json'), recorded)
  meta = {'history': [], 'class_names': list(train_state.trained_class_names(source_meta)),
          'image_size': config.image_size, 'config_name': config.name,
          'adaptation': {k: v for k, v in record.items()
                         if k not in ('unlabelled_images', 'labelled_images')}}
  host = {'params': jax.device_get(variables['params']), 'step': np.asarray(0, np.int32)}
  if has_batch_stats(variables):
    host['batch_stats'] = jax.device_get(variables['batch_stats'])
  ckpts = checkpointing.Checkpoints(out, keep=1)
  try:
    for kind in checkpointing.KINDS:
      ckpts.save(kind, 0, host, meta)
  finally:
    ckpts.close()
