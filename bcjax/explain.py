"""Why a cell got its class: saliency maps and a check that they mean something.

``launch.py --mode=explain`` (:func:`explain_workdir`)::

    python launch.py --config configs/cnn_attention.py --workdir runs/x --mode=explain \
        --images a.jpg dir/ --out explain/

writes one PNG per image (the image, its predicted class and probability, the
true class when the image sits in a class-named folder - any letter case,
plural or a common other name, as ``bcjax.data.layout.class_of_folder`` reads
it - and each method's map over it), ``faithfulness.json`` and
``faithfulness.png``, and prints the mean deletion / insertion AUC per method
and per class, and the classes no labelled image had. Without ``--images`` it
explains ``config.data.split`` (the test split; 'all' with
``--config.data.path=FOLDER`` for every image of another lab's folder).

The methods, each a pure function of (model, variables, images, classes):

* :func:`grad_cam`: Grad-CAM on the extractor's last spatial map - the 7x7
  grid the sequence heads read (the input of ``RasterSequence``), the 14x14
  map the plain CNN flattens (the input of ``Flatten``). The map is captured
  with ``flax.linen.intercept_methods``, which adds a zero ``delta`` to that
  module's input: the gradient with respect to ``delta`` is the gradient with
  respect to the map, and no model changes.
* :func:`integrated_gradients` (midpoint rule, ``IG_STEPS`` points) and
  :func:`smoothgrad` (``SMOOTHGRAD_SAMPLES`` noisy copies, an explicit key) on
  the input pixels: each a ``lax.map`` over batches of points, jitted.
* :func:`attention_rollout` for models with attention (``cnn_attention``):
  flax's attention records its weights when called with ``sow_weights=True``,
  which an interceptor adds; the self-attention layers are rolled out (each
  averaged over heads, with the residual as ``0.5 A + 0.5 I``) and read by the
  pooling query.

Every map explains the single view (no test-time augmentation) of the
predicted class. Gradients run through XLA's own lowerings (``conv_impl``
'matmul' on CPU, 'native' elsewhere), never the oneDNN FFI kernels, so a map
does not depend on which CPU kernels were built.

Faithfulness (:func:`perturbation_curves`): the image is cut into a
``GRID`` x ``GRID`` grid of cells; deletion replaces the cells with the
baseline (the image's own mean colour: neither black nor white is neutral on a
smear) from the most salient down and records the class probability after
each; insertion starts from the baseline and restores the most salient first.
The area under each curve (deletion: lower is better; insertion: higher) is
set against ``RANDOM_ORDERS`` random orderings of the cells.
"""

import dataclasses
import functools
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bcjax import files, models
from bcjax.errors import UserError
from bcjax.models import layers

METHODS = ('gradcam', 'integrated_gradients', 'smoothgrad', 'rollout')
IG_STEPS = 128
SMOOTHGRAD_SAMPLES = 32
SMOOTHGRAD_SIGMA = 0.15  # Noise standard deviation, in units of the [0, 1] pixel range.
GRID = 7
RANDOM_ORDERS = 4
POINTS_PER_BATCH = 16  # IG / SmoothGrad points per model call: bounds memory.
# The modules whose input is the extractor's last spatial map (N, h, w, C).
SPATIAL_MAP_LAYERS = (layers.RasterSequence, layers.Flatten)


def explain_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with XLA's own lowering: 'matmul' (fast gradients) on CPU, else 'native'."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.conv_impl = 'matmul' if jax.default_backend() == 'cpu' else 'native'
  return config


def _logits(model: nn.Module, variables, images):
  return model.apply(variables, images, train=False)


def _target_logit_sum(model, variables, images, classes):
  """Sum over the batch of each image's logit of its class: its gradient is per image."""
  logits = _logits(model, variables, images)
  return jnp.take_along_axis(logits, classes[:, None], axis=1).sum()


# ---------------------------------------------------------------- Grad-CAM.

def _with_map_delta(model, variables, images, delta):
  """``(logits, spatial map)`` with ``delta`` added to the map where the model reads it."""
  captured = []

  def interceptor(next_fun, args, kwargs, context):
    if (not captured and context.method_name == '__call__'
        and isinstance(context.module, SPATIAL_MAP_LAYERS) and args and args[0].ndim == 4):
      captured.append(args[0])
      return next_fun(args[0] + delta, *args[1:], **kwargs)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    logits = _logits(model, variables, images)
  if not captured:
    raise UserError(f'{type(model).__name__} has no Flatten or RasterSequence layer: '
                    'Grad-CAM cannot find its last spatial map')
  return logits, captured[0]


def spatial_map_shape(model, variables, images) -> tuple[int, ...]:
  """Shape (N, h, w, C) of the map Grad-CAM reads, without running the model."""
  def capture(x):
    return _with_map_delta(model, variables, x, 0.0)[1]
  return tuple(jax.eval_shape(capture, images).shape)


def grad_cam(model, variables, images, classes) -> jax.Array:
  """Grad-CAM maps (N, h, w): ReLU(sum_k alpha_k A_k), alpha_k = mean over (h, w) of dy_c/dA_k."""
  zeros = jnp.zeros(spatial_map_shape(model, variables, images), jnp.float32)

  def target(delta):
    logits, fmap = _with_map_delta(model, variables, images, delta)
    return jnp.take_along_axis(logits, classes[:, None], axis=1).sum(), fmap

  grads, fmap = jax.grad(target, has_aux=True)(zeros)
  alpha = grads.mean(axis=(1, 2))
  return jax.nn.relu(jnp.einsum('nhwk,nk->nhw', fmap, alpha))


# --------------------------------------------- Gradients on the input pixels.

def input_gradients(model, variables, images, classes) -> jax.Array:
  """d logit_class / d image, per image (N, H, W, 3)."""
  return jax.grad(lambda x: _target_logit_sum(model, variables, x, classes))(images)


def baseline_of(images: jax.Array) -> jax.Array:
  """Each image's own mean colour, everywhere: the baseline of IG and of the curves."""
  return jnp.broadcast_to(images.mean(axis=(1, 2), keepdims=True), images.shape)


def integrated_gradients(model, variables, images, classes, baseline, *,
                         steps: int = IG_STEPS) -> jax.Array:
  """(x - x0) * the mean gradient at ``steps`` midpoints of the straight path x0 -> x.

  Completeness: the attributions sum to ``f(x) - f(x0)`` of the class logit,
  up to the quadrature error (tested: within 2% at 128 steps).
  """
  alphas = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps

  def at(alpha):
    return input_gradients(model, variables, baseline + alpha * (images - baseline), classes)

  grads = jax.lax.map(at, alphas, batch_size=min(steps, POINTS_PER_BATCH))
  return (images - baseline) * grads.mean(axis=0)


def smoothgrad(model, variables, images, classes, key: jax.Array, *,
               samples: int = SMOOTHGRAD_SAMPLES, sigma: float = SMOOTHGRAD_SIGMA) -> jax.Array:
  """The mean gradient over ``samples`` copies with N(0, sigma^2) pixel noise (sigma 0: the gradient)."""
  noise = sigma * jax.random.normal(key, (samples, *images.shape), jnp.float32)
  grads = jax.lax.map(lambda n: input_gradients(model, variables, images + n, classes),
                      noise, batch_size=min(samples, POINTS_PER_BATCH))
  return grads.mean(axis=0)


# ------------------------------------------------------- Attention rollout.

def attention_weights(model, variables, images) -> list[jax.Array]:
  """Every attention layer's weights (N, heads, queries, keys), in call order."""
  paths = []

  def interceptor(next_fun, args, kwargs, context):
    if (isinstance(context.module, nn.MultiHeadDotProductAttention)
        and context.method_name == '__call__'):
      paths.append(context.module.path)
      kwargs = dict(kwargs, sow_weights=True)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    _, state = model.apply(variables, images, train=False, mutable=['intermediates'])
  weights = []
  for path in paths:
    node = state['intermediates']
    for name in path:
      node = node[name]
    weights.append(node['attention_weights'][0])
  return weights


def rollout(weights: Sequence[jax.Array]) -> tuple[jax.Array, jax.Array]:
  """``(R, map)``: the rolled-out self-attention (N, L, L) and what the readout attends (N, L).

  Self-attention layers (as many queries as keys) are averaged over heads,
  mixed with the residual stream (``0.5 A + 0.5 I``, rows renormalised) and
  multiplied in order; every row of ``R`` sums to one. A final layer with
  fewer queries (the attention pool's learned query) reads ``R``; without
  one, the map is the mean row of ``R``.
  """
  self_attention = [w for w in weights if w.shape[-2] == w.shape[-1]]
  readout = [w for w in weights if w.shape[-2] != w.shape[-1]]
  if not self_attention and not readout:
    raise UserError('attention rollout needs a model with attention layers (cnn_attention)')
  n, length = weights[0].shape[0], weights[0].shape[-1]
  eye = jnp.eye(length, dtype=jnp.float32)
  r = jnp.broadcast_to(eye, (n, length, length))
  for w in self_attention:
    a = 0.5 * w.astype(jnp.float32).mean(axis=1) + 0.5 * eye
    a = a / a.sum(axis=-1, keepdims=True)
    r = a @ r
  if readout:
    query = readout[-1].astype(jnp.float32).mean(axis=1).mean(axis=1)  # (N, L)
    return r, jnp.einsum('nl,nlk->nk', query, r)
  return r, r.mean(axis=1)


def attention_rollout(model, variables, images) -> jax.Array:
  """Rollout maps (N, h, w) on the grid the sequence was read from."""
  _, h, w, _ = spatial_map_shape(model, variables, images)
  _, flat = rollout(attention_weights(model, variables, images))
  return flat.reshape(-1, h, w)


# ------------------------------------------------- Deletion and insertion.

def cell_scores(maps: jax.Array, grid: int = GRID) -> jax.Array:
  """(N, h, w) maps -> (N, grid * grid) mean saliency per cell (row-major)."""
  n, h, w = maps.shape
  if h % grid == 0 and w % grid == 0:
    cells = maps.reshape(n, grid, h // grid, grid, w // grid).mean(axis=(2, 4))
  else:
    cells = jax.image.resize(maps, (n, grid, grid), 'linear', antialias=True)
  return cells.reshape(n, grid * grid)


def _cell_of_pixel(size: int, grid: int) -> np.ndarray:
  """(size, size) cell index of each pixel, for any size (cells differ by a pixel at most)."""
  axis = np.arange(size) * grid // size
  return axis[:, None] * grid + axis[None, :]


def ranks_of(scores: jax.Array) -> jax.Array:
  """Each cell's place in the order, most salient first (ties: lower index first)."""
  order = jnp.argsort(-scores, axis=-1, stable=True)
  return jnp.argsort(order, axis=-1)


def perturbation_curves(model, variables, images, classes, ranks, baseline, *,
                        grid: int = GRID) -> tuple[jax.Array, jax.Array]:
  """Class probability after k = 0..grid^2 cells (deletion, insertion): two (N, grid^2 + 1)."""
  cells = grid * grid
  pixel_cell = jnp.asarray(_cell_of_pixel(images.shape[1], grid))
  steps = jnp.arange(cells + 1)

  def one(args):
    image, cls, rank, base = args
    gone = rank[None, :] < steps[:, None]  # (steps, cells): cells replaced after k steps.
    gone_px = gone[:, pixel_cell][..., None]  # (steps, H, W, 1)
    deleted = jnp.where(gone_px, base[None], image[None])
    inserted = jnp.where(gone_px, image[None], base[None])
    probs = jax.nn.softmax(_logits(model, variables, jnp.concatenate([deleted, inserted])))
    p = probs[:, cls]
    return p[:cells + 1], p[cells + 1:]

  return jax.lax.map(one, (images, classes, ranks, baseline))


def auc(curves: np.ndarray) -> np.ndarray:
  """Area under each curve over the fraction of cells, [0, 1] (trapezoid rule)."""
  curves = np.asarray(curves, np.float64)
  return (curves[..., 1:] + curves[..., :-1]).sum(-1) / (2 * (curves.shape[-1] - 1))


# ------------------------------------------------------------ One batch.

@dataclasses.dataclass
class Explanation:
  """A batch's predictions, each method's maps, and the faithfulness curves."""
  probs: np.ndarray  # (N, classes)
  classes: np.ndarray  # (N,) the explained (predicted) class
  maps: dict[str, np.ndarray]  # method -> (N, h, w) display map (>= 0)
  deletion: dict[str, np.ndarray]  # method (and 'random') -> (N, grid^2 + 1)
  insertion: dict[str, np.ndarray]


def available_methods(model, variables, image_size: int) -> tuple[str, ...]:
  """The methods that apply to ``model``: rollout needs attention layers."""
  found = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.MultiHeadDotProductAttention):
      found.append(context.module.path)
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v, x: _logits(model, v, x), variables, x)
  return tuple(m for m in METHODS if m != 'rollout' or found)


def display_maps(method: str, raw: jax.Array) -> jax.Array:
  """A method's output as a non-negative (N, h, w) map: what is shown and ranked."""
  if method == 'integrated_gradients':  # Signed: pixels for the class count, against do not.
    return jax.nn.relu(raw.sum(axis=-1))
  if method == 'smoothgrad':  # Gradient magnitude.
    return jnp.abs(raw).sum(axis=-1)
  return raw


@functools.partial(jax.jit, static_argnames=('model', 'methods', 'grid', 'random_orders'))
def explain_batch(model, variables, images, key, *, methods: tuple[str, ...],
                  grid: int = GRID, random_orders: int = RANDOM_ORDERS):
  """Everything :class:`Explanation` holds for one batch, as device arrays."""
  probs = jax.nn.softmax(_logits(model, variables, images))
  classes = probs.argmax(-1)
  baseline = baseline_of(images)
  smooth_key, random_key = jax.random.split(key)
  maps = {}
  for method in methods:
    if method == 'gradcam':
      raw = grad_cam(model, variables, images, classes)
    elif method == 'integrated_gradients':
      raw = integrated_gradients(model, variables, images, classes, baseline)
    elif method == 'smoothgrad':
      raw = smoothgrad(model, variables, images, classes, smooth_key)
    else:
      raw = attention_rollout(model, variables, images)
    maps[method] = display_maps(method, raw)
  deletion, insertion = {}, {}
  for method, m in maps.items():
    deletion[method], insertion[method] = perturbation_curves(
        model, variables, images, classes, ranks_of(cell_scores(m, grid)), baseline, grid=grid)
  cells = grid * grid
  random_ranks = jax.vmap(lambda k: jax.random.permutation(k, cells))(
      jax.random.split(random_key, images.shape[0] * random_orders))
  rd, ri = perturbation_curves(
      model, variables, jnp.repeat(images, random_orders, 0), jnp.repeat(classes, random_orders),
      random_ranks, jnp.repeat(baseline, random_orders, 0), grid=grid)
  deletion['random'] = rd.reshape(-1, random_orders, cells + 1).mean(1)
  insertion['random'] = ri.reshape(-1, random_orders, cells + 1).mean(1)
  return probs, classes, maps, deletion, insertion


def explain(model, variables, images: np.ndarray, key: jax.Array, *,
            methods: Sequence[str], grid: int = GRID,
            random_orders: int = RANDOM_ORDERS) -> Explanation:
  """Host-side :class:`Explanation` of ``images`` (N, S, S, 3) in [0, 1]."""
  out = explain_batch(model, variables, jnp.asarray(images, jnp.float32), key,
                      methods=tuple(methods), grid=grid, random_orders=random_orders)
  probs, classes, maps, deletion, insertion = jax.device_get(out)
  return Explanation(np.asarray(probs), np.asarray(classes), maps, deletion, insertion)


# ------------------------------------------------------- --mode=explain.

def _file_batches(config, paths: Sequence[str], class_names, batch_size: int, max_images: int):
  """``(names, images, true class names)`` batches of image files; unreadable ones skipped."""
  from bcjax import data, predict  # pylint: disable=g-import-not-at-top
  from bcjax.data import layout  # pylint: disable=g-import-not-at-top
  image_files = predict.expand_paths(paths)
  if max_images:
    image_files = image_files[:max_images]
  known = {c.lower(): c for c in class_names}

  def true_class(folder: str) -> str:
    return known.get(layout.class_of_folder(folder) or folder.lower(), '')

  batch: tuple[list, list, list] = ([], [], [])
  for path in image_files:
    try:
      image = data.preprocess(data.read_image(path), config.image_size)
    except UserError as e:
      print(f'skipped: {e}', flush=True)
      continue
    folder = os.path.basename(os.path.dirname(os.path.abspath(path)))
    for part, value in zip(batch, (path, image, true_class(folder))):
      part.append(value)
    if len(batch[0]) == batch_size:
      yield batch[0], np.stack(batch[1]), batch[2]
      batch = ([], [], [])
  if batch[0]:
    yield batch[0], np.stack(batch[1]), batch[2]


def _split_batches(config, split: str, class_names, batch_size: int, max_images: int):
  """The same batches from ``split`` of ``config.data`` (labelled), in the split's order."""
  from bcjax import data  # pylint: disable=g-import-not-at-top
  dataset = data.make_eval_dataset(
      config, split, process_index=0, process_count=1, local_device_count=1,
      batch_size=batch_size)
  seen = 0
  for batch in dataset.as_numpy_iterator():
    keep = batch['mask'].reshape(-1)
    if max_images:
      keep = keep & (np.cumsum(keep) + seen <= max_images)
    names = [n.decode('utf-8', 'replace') for n in batch['file_name'].reshape(-1)[keep]]
    if not names:
      return
    seen += len(names)
    images = batch['image'].reshape(-1, *batch['image'].shape[-3:])[keep]
    labels = batch['label'].reshape(-1)[keep]
    yield names, images, [class_names[int(l)] for l in labels]


def _mean(values) -> float:
  return float(np.mean(values)) if len(values) else float('nan')


def summarise(records: list[dict[str, Any]], methods: Sequence[str]) -> dict[str, Any]:
  """Mean deletion / insertion AUC per method, over all images and per true (else predicted) class."""
  every = [*methods, 'random']

  def means(rs):
    return {m: {k: _mean([r['auc'][m][k] for r in rs]) for k in ('deletion', 'insertion')}
            for m in every}

  by_class: dict[str, list] = {}
  for r in records:
    by_class.setdefault(r.get('true_class') or r['predicted_class'], []).append(r)
  return {'mean_auc': means(records),
          'per_class': {c: {'images': len(rs), 'mean_auc': means(rs)}
                        for c, rs in sorted(by_class.items())}}


def format_table(summary: dict[str, Any], methods: Sequence[str]) -> str:
  """The faithfulness table printed by --mode=explain."""
  every = [*methods, 'random']
  lines = [f"{'method':<22} {'deletion AUC (lower is better)':>31} "
           f"{'insertion AUC (higher is better)':>33}"]
  for m in every:
    a = summary['mean_auc'][m]
    lines.append(f"{m:<22} {a['deletion']:>31.4f} {a['insertion']:>33.4f}")
  lines.append('per class (the true class where a folder names it, else the predicted one), '
               'deletion / insertion AUC:')
  lines.append(f"{'class':<14} {'n':>4}  " + '  '.join(f'{m[:20]:>20}' for m in every))
  for c, v in summary['per_class'].items():
    cells = '  '.join(f"{v['mean_auc'][m]['deletion']:>9.3f} / {v['mean_auc'][m]['insertion']:.3f}"
                      .rjust(20) for m in every)
    lines.append(f"{c:<14} {v['images']:>4}  {cells}")
  return '\n'.join(lines)


def explain_workdir(config: ml_collections.ConfigDict, workdir: str, paths: Sequence[str],
                    out_dir: str, *, checkpoint: str = 'best', methods: Sequence[str] = (),
                    max_images: int = 0, batch_size: int = 8, seed: int = 0) -> dict[str, Any]:
  """Explains image files (or ``config.data.split`` without ``paths``); returns the summary."""
  from bcjax import train_state  # pylint: disable=g-import-not-at-top  (orbax)
  from bcjax import explain_figures as figures  # pylint: disable=g-import-not-at-top
  if not out_dir:
    raise UserError('--mode=explain needs --out DIR')
  files.check_output_dir(out_dir, '--out', inputs=list(paths),
                         protected=files.run_inputs([workdir])[1])
  config = explain_config(config)
  state, meta, kind, step = train_state.load_for_inference(config, workdir, checkpoint)
  model = models.build_model(config)
  variables = state.variables()
  variables = jax.device_put(variables)
  usable = available_methods(model, variables, config.image_size)
  methods = tuple(methods) or usable
  for m in methods:
    if m not in usable:
      raise UserError(f'unknown or unusable explanation method {m!r} for '
                      f'{config.model.name}; usable: {", ".join(usable)}')
  if paths:
    class_names = train_state.trained_class_names(meta)
    batches = _file_batches(config, paths, class_names, batch_size, max_images)
    source = f'{len(paths)} path(s)'
  else:
    from bcjax import data  # pylint: disable=g-import-not-at-top
    split = config.data.split
    if split == 'all':  # Every image of the labelled folder config.data.path.
      class_names = list(data.split_facts(config, split)[0])
    else:
      info = data.prepare(config)
      if split not in info.split_sizes:
        raise UserError(f'unknown split {split!r}; known: {", ".join(sorted(info.split_sizes))}'
                        ', all')
      class_names = list(info.class_names)
    train_state.check_class_names(meta, class_names)
    batches = _split_batches(config, split, class_names, batch_size, max_images)
    source = f'the {split} split of {config.data.path or config.data.source}'
  os.makedirs(os.path.join(out_dir, 'images'), exist_ok=True)
  records: list[dict[str, Any]] = []
  curves = {m: {'deletion': 0.0, 'insertion': 0.0} for m in (*methods, 'random')}
  examples: dict[tuple[str, bool], tuple] = {}  # (true class, correct) -> first such image.
  key = jax.random.key(seed)
  for b, (names, images, truth) in enumerate(batches):
    n = len(names)
    padded = np.zeros((batch_size, *images.shape[1:]), np.float32)
    padded[:n] = images  # One compiled program for every batch.
    ex = explain(model, variables, padded, jax.random.fold_in(key, b), methods=methods)
    for i in range(n):
      cls = class_names[int(ex.classes[i])]
      record = {'file': names[i], 'true_class': truth[i], 'predicted_class': cls,
                'probability': float(ex.probs[i, ex.classes[i]]),
                'auc': {m: {'deletion': float(auc(ex.deletion[m][i])),
                            'insertion': float(auc(ex.insertion[m][i]))}
                        for m in (*methods, 'random')}}
      records.append(record)
      for m in curves:
        for name, c in (('deletion', ex.deletion), ('insertion', ex.insertion)):
          curves[m][name] = curves[m][name] + np.asarray(c[m][i], np.float64)
      maps = {m: ex.maps[m][i] for m in methods}
      stem = os.path.splitext(os.path.basename(names[i]))[0]
      figures.plot_image(images[i], maps, record,
                         os.path.join(out_dir, 'images', f'{len(records):05d}_{stem}.png'))
      if truth[i]:
        examples.setdefault((truth[i], truth[i] == cls), (images[i], maps, record))
  if not records:
    raise UserError(f'no readable images in {source}')
  summary = summarise(records, methods)
  labelled = {r['true_class'] for r in records if r['true_class']}
  absent = [c for c in class_names if c not in labelled] if labelled else []
  best = max(methods, key=lambda m: summary['mean_auc'][m]['insertion']
             - summary['mean_auc'][m]['deletion'])
  mean_curves = {m: {k: (v / len(records)).tolist() for k, v in c.items()}
                 for m, c in curves.items()}
  result = {
      'config_name': config.name, 'model': config.model.name, 'workdir': os.path.abspath(workdir),
      'checkpoint': kind, 'checkpoint_step': int(step), 'source': source,
      'images': len(records), 'methods': list(methods), 'grid': GRID,
      'baseline': "each image's mean colour", 'random_orders': RANDOM_ORDERS,
      'ig_steps': IG_STEPS, 'smoothgrad': {'samples': SMOOTHGRAD_SAMPLES,
                                           'sigma': SMOOTHGRAD_SIGMA},
      'seed': seed, 'conv_impl': config.model.conv_impl,
      'best_method': best, 'absent_classes': absent, **summary, 'mean_curves': mean_curves, 'per_image': records}
  files.write_json(os.path.join(out_dir, 'faithfulness.json'), result)
  title = f'{config.name}, {kind} checkpoint step {step}: {len(records)} images, {GRID}x{GRID} cells'
  figures.plot_curves(mean_curves, summary['mean_auc'],
                      os.path.join(out_dir, 'faithfulness.png'), title)
  if examples:
    figures.plot_examples({k: (im, maps[best], r) for k, (im, maps, r) in examples.items()},
                          best, os.path.join(out_dir, 'examples.png'))
  print(f'explained {len(records)} images from {source} with the {kind} checkpoint '
        f'(step {step}); {GRID}x{GRID} cells, baseline: each image\'s mean colour, '
        f'random: mean of {RANDOM_ORDERS} orders')
  print(format_table(summary, methods))
  if absent:
    print(f'classes with no labelled image here: {", ".join(absent)}')
  print(f'written to {out_dir} (best by insertion - deletion: {best})')
  return result
