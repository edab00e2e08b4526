"""Accuracy on a lab's held-out cells against the number of labelled cells per class.

    python -m bcjax.adapt_curve --config configs/best.py:hybrid_cpu \\
        --workdir runs/base_hybrid_s0 --lab ../shared/data/other_labs/chulalongkorn_wbc \\
        --out docs/adaptation --shots 0,1,2,5,10,25 --draws 3

``--lab`` is a labelled folder of the lab's cells (class folders, any subset
of the model's classes) whose file names start with the sample they come
from (``B-30_0047_0.jpg``: sample ``B-30``). Each draw splits the samples,
seeded, into adaptation samples and held-out samples (:func:`split_samples`):
every image of a sample lies on one side, so frames of one cell never sit on
both. Then, for that draw:

* 0 labels: the source model as it is; AdaBN and AdaBN + TENT fitted on the
  adaptation samples' images; and the same two fitted transductively, on the
  adaptation and held-out images together (no label read either way);
* k labels per class: k images per class drawn from the adaptation samples,
  fine-tuned (``config.adapt``), with and without AdaBN on the adaptation
  samples' images.

Every adaptation is :func:`bcjax.adapt.adapt_variables`, what ``--mode=adapt``
runs; images are read once, by :func:`bcjax.adapt.read_labelled`. Accuracy on
the held-out images is taken with the argmax over all the model's classes
and over the classes the lab has. Writes ``curve.csv`` (one row per method,
shots and draw), ``curve.json`` (means and standard deviations),
``curve.md`` (the table) and ``curve.png``.
"""

import csv
import functools
import json
import os
import platform
import subprocess
import time
from typing import Any, Sequence

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app, flags  # pylint: disable=g-import-not-at-top
import jax
import ml_collections
import numpy as np
from ml_collections import config_flags

from bcjax import adapt, ensemble_members, files, models, steps, train_state
from bcjax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'The config the source was trained with.',
                                lock_config=False)
flags.DEFINE_string('workdir', None, 'The trained source workdir (only read).')
flags.DEFINE_string('lab', None, "Labelled folder of the lab's cells (class folders).")
flags.DEFINE_string('out', None, 'Folder for curve.{csv,json,md,png}.')
flags.DEFINE_list('shots', ['0', '1', '2', '5', '10', '25'], 'Labelled cells per class.')
flags.DEFINE_integer('draws', 3, 'Random splits and draws of labelled cells per point.')
flags.DEFINE_integer('seed', 0, 'Seed of the splits and draws.')
flags.DEFINE_float('adapt_fraction', 0.5, "Share of each class's images the adaptation "
                   'samples should hold (whole samples, so about).')
flags.DEFINE_string('checkpoint', 'best', "The source's checkpoint.")
flags.DEFINE_list('methods', [], 'Only these methods (default: all; see LABELS).')

ZERO_SHOT = ('unadapted', 'adabn', 'tent', 'adabn_transductive', 'tent_transductive')
FEW_SHOT = ('finetune_adabn', 'finetune')
LABELS = {
    'unadapted': 'unadapted',
    'adabn': 'AdaBN (adaptation samples)',
    'tent': 'AdaBN + TENT (adaptation samples)',
    'adabn_transductive': 'AdaBN (adaptation + held-out images)',
    'tent_transductive': 'AdaBN + TENT (adaptation + held-out images)',
    'finetune_adabn': 'fine-tune, AdaBN start and end',
    'finetune': 'fine-tune, no AdaBN',
}


def sample_of(path: str) -> str:
  """The sample a file comes from: its name up to the first '_' (``B-30_0047_0.jpg``: B-30)."""
  return os.path.basename(path).split('_')[0]


def split_samples(samples: Sequence[str], labels: np.ndarray, rng: np.random.Generator, *,
                  fraction: float = 0.5, need: int = 0, tries: int = 200) -> np.ndarray:
  """A boolean mask of the images on the adaptation side; each sample wholly on one side.

  A sample belongs to the class most of its images have; each class's
  samples, in a random order, go to the adaptation side until it holds
  ``fraction`` of that class's images, leaving at least one sample held out.
  A split where some class lacks images on either side (or has fewer than
  ``need`` on the adaptation side, where it has that many at all) is drawn
  again.
  """
  samples = np.asarray(samples)
  names = sorted(set(samples.tolist()))
  majority = {s: np.bincount(labels[samples == s]).argmax() for s in names}
  classes = sorted(set(labels.tolist()))
  best = None
  for _ in range(tries):
    chosen = set()
    for c in classes:
      own = [s for s in names if majority[s] == c]
      order = [own[i] for i in rng.permutation(len(own))]
      total, got = (labels == c).sum(), 0
      for s in order[:-1]:
        if got >= fraction * total:
          break
        chosen.add(s)
        got += ((samples == s) & (labels == c)).sum()
    mask = np.isin(samples, sorted(chosen))
    ok = all(0 < (mask & (labels == c)).sum() and (~mask & (labels == c)).sum()
             for c in classes)
    enough = all((mask & (labels == c)).sum() >= min(need, (labels == c).sum() // 2)
                 for c in classes)
    if ok and enough:
      return mask
    if ok and best is None:
      best = mask
  if best is None:
    raise UserError('cannot split the lab by sample so that every class has images on both '
                    'sides: each class needs images from at least two samples')
  return best


def draw_shots(labels: np.ndarray, rows: np.ndarray, k: int,
               rng: np.random.Generator) -> np.ndarray:
  """``k`` rows per class (all of a class's rows where it has fewer), from ``rows``."""
  out = []
  for c in sorted(set(labels[rows].tolist())):
    own = rows[labels[rows] == c]
    out.extend(rng.choice(own, size=min(k, len(own)), replace=False).tolist())
  return np.asarray(sorted(out), int)


@functools.lru_cache(maxsize=4)
def _forward(model):
  return jax.jit(functools.partial(steps.predict_log_probs, model))


def probabilities(config, variables, pixels: np.ndarray) -> np.ndarray:
  """Class probabilities of uint8 images, in inference mode (the eval step's function)."""
  forward = _forward(models.build_model(config))
  b = int(config.eval_batch_size)
  out = []
  for start in range(0, len(pixels), b):
    x = np.zeros((b, *pixels.shape[1:]), np.float32)
    chunk = pixels[start:start + b]
    x[:len(chunk)] = chunk.astype(np.float32) / 255.0
    out.append(np.exp(np.asarray(forward(variables, x)))[:len(chunk)])
  return np.concatenate(out)


def accuracies(probs: np.ndarray, labels: np.ndarray, present: Sequence[int]) -> tuple[float, float]:
  """(argmax over every class, argmax over ``present`` classes) accuracy."""
  all_classes = float((probs.argmax(-1) == labels).mean())
  present = np.asarray(sorted(present))
  restricted = float((present[probs[:, present].argmax(-1)] == labels).mean())
  return all_classes, restricted


def _method_config(config, method: str, labelled: bool):
  c = ml_collections.ConfigDict(config.to_dict())
  c.adapt.method = ('finetune' if labelled else
                    'tent' if method.startswith('tent') else 'adabn')
  c.adapt.adabn = method != 'finetune'
  return c


def run_curve(config, workdir: str, lab: str, *, shots: Sequence[int], draws: int, seed: int,
              fraction: float, checkpoint: str = 'best', methods: Sequence[str] = (),
              say=print) -> list[dict[str, Any]]:
  """Every (method, shots, draw) row: accuracies on the held-out samples and seconds."""
  config = ensemble_members.member_config(config, workdir)
  state, meta, kind, step = train_state.load_for_inference(config, workdir, checkpoint)
  class_names = train_state.trained_class_names(meta)
  source = state.variables()
  images = adapt.read_labelled(lab, config, class_names)
  samples = [sample_of(p) for p in images.paths]
  labels = images.labels
  present = sorted(set(labels.tolist()))
  say(f'{lab}: {len(labels)} images, {len(set(samples))} samples, classes '
      f'{", ".join(class_names[c] for c in present)}; source {workdir} ({kind} step {step})')
  rows = []
  for d in range(draws):
    rng = np.random.default_rng([seed, d])
    mask = split_samples(samples, labels, rng, fraction=fraction, need=max(shots))
    adapt_rows, held_rows = np.flatnonzero(mask), np.flatnonzero(~mask)
    held = images.subset(held_rows)
    say(f'draw {d}: adaptation {len(adapt_rows)} images of samples '
        f'{", ".join(sorted({samples[i] for i in adapt_rows}))}; held out {len(held_rows)}')

    def evaluate(method, k, variables, seconds, n_labelled=0):
      acc_all, acc_present = accuracies(probabilities(config, variables, held.pixels),
                                        held.labels, present)
      row = {'method': method, 'shots': k, 'draw': d, 'accuracy_all_classes': acc_all,
             'accuracy_lab_classes': acc_present, 'labelled_images': n_labelled,
             'adaptation_images': len(adapt_rows), 'held_out_images': len(held_rows),
             'seconds': round(seconds, 2)}
      rows.append(row)
      say(f'  {method:20s} k={k:2d}: {acc_all:.3f} (all classes) {acc_present:.3f} '
          f'(lab classes)  {seconds:.1f} s')

    for k in shots:
      if k == 0:
        for method in ZERO_SHOT:
          if methods and method not in methods:
            continue
          started = time.perf_counter()
          if method == 'unadapted':
            variables = source
          else:
            pool = (images.pixels if method.endswith('transductive')
                    else images.pixels[adapt_rows])
            variables = adapt.adapt_variables(_method_config(config, method, False), source,
                                              unlabelled=pool, say=lambda _: None)
          evaluate(method, 0, variables, time.perf_counter() - started)
        continue
      chosen = draw_shots(labels, adapt_rows, k, np.random.default_rng([seed, d, k]))
      labelled = images.subset(chosen)
      for method in FEW_SHOT:
        if methods and method not in methods:
          continue
        started = time.perf_counter()
        c = _method_config(config, method, True)
        c.adapt.seed = int(seed * 1000 + d)
        variables = adapt.adapt_variables(c, source, unlabelled=images.pixels[adapt_rows],
                                          labelled=labelled, say=lambda _: None)
        evaluate(method, k, variables, time.perf_counter() - started, len(chosen))
  return rows


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  out = []
  keys = sorted({(r['method'], r['shots']) for r in rows},
                key=lambda mk: (mk[1], list(LABELS).index(mk[0])))
  for method, k in keys:
    mine = [r for r in rows if (r['method'], r['shots']) == (method, k)]
    entry = {'method': method, 'label': LABELS[method], 'shots': k, 'draws': len(mine),
             'seconds_mean': float(np.mean([r['seconds'] for r in mine]))}
    for field in ('accuracy_all_classes', 'accuracy_lab_classes'):
      values = np.asarray([r[field] for r in mine])
      entry[field + '_mean'] = float(values.mean())
      entry[field + '_std'] = float(values.std())
    out.append(entry)
  return out


def table(summary: list[dict[str, Any]]) -> str:
  lines = ['| labelled cells per class | method | accuracy, argmax over all 8 classes | '
           'accuracy, argmax over the lab\'s 5 | seconds to adapt |',
           '| ---: | --- | ---: | ---: | ---: |']
  for e in summary:
    lines.append(f"| {e['shots']} | {e['label']} | "
                 f"{100 * e['accuracy_all_classes_mean']:.1f} ± "
                 f"{100 * e['accuracy_all_classes_std']:.1f} | "
                 f"{100 * e['accuracy_lab_classes_mean']:.1f} ± "
                 f"{100 * e['accuracy_lab_classes_std']:.1f} | {e['seconds_mean']:.1f} |")
  return '\n'.join(lines) + '\n'


def figure(summary: list[dict[str, Any]], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
  shots = sorted({e['shots'] for e in summary if e['shots'] > 0})
  positions = {k: i + 1 for i, k in enumerate(shots)}
  markers = {'unadapted': 'x', 'adabn': 'o', 'tent': 's', 'adabn_transductive': 'o',
             'tent_transductive': 's'}
  for ax, field, name in zip(axes, ('accuracy_all_classes', 'accuracy_lab_classes'),
                             ('argmax over all 8 classes', "argmax over the lab's 5 classes")):
    for i, method in enumerate(ZERO_SHOT):
      e = next((e for e in summary if e['method'] == method), None)
      if e:
        ax.errorbar([-0.3 + 0.15 * i], [100 * e[field + '_mean']], [100 * e[field + '_std']],
                    fmt=markers[method], capsize=3, label=LABELS[method],
                    mfc='none' if method.endswith('transductive') else None)
    for method in FEW_SHOT:
      mine = [e for e in summary if e['method'] == method]
      if mine:
        ax.errorbar([positions[e['shots']] for e in mine],
                    [100 * e[field + '_mean'] for e in mine],
                    [100 * e[field + '_std'] for e in mine], marker='.', capsize=3,
                    label=LABELS[method])
    ax.set_xticks([0] + [positions[k] for k in shots], ['0'] + [str(k) for k in shots])
    ax.set_xlabel('labelled cells per class')
    ax.set_title(name)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel('accuracy on held-out samples (%)')
  axes[1].legend(fontsize=7, loc='lower right')
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _cpu_model() -> str:
  try:
    out = subprocess.run(['lscpu'], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
      if line.startswith('Model name'):
        return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def main(argv):
  del argv
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax's INFO lines.
  for name in ('config', 'workdir', 'lab', 'out'):
    if not getattr(FLAGS, name):
      raise app.UsageError(f'--{name} is required')
  try:
    shots = sorted({int(s) for s in FLAGS.shots})
    files.check_writable(FLAGS.out, '--out')
    started = time.perf_counter()
    rows = run_curve(FLAGS.config, FLAGS.workdir, FLAGS.lab, shots=shots, draws=FLAGS.draws,
                     seed=FLAGS.seed, fraction=FLAGS.adapt_fraction, checkpoint=FLAGS.checkpoint,
                     methods=FLAGS.methods)
  except UserError as e:
    print(f'error: {e}')
    raise SystemExit(2) from None
  summary = summarise(rows)
  with open(os.path.join(FLAGS.out, 'curve.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  a = FLAGS.config.adapt
  files.write_json(os.path.join(FLAGS.out, 'curve.json'), {
      'workdir': os.path.abspath(FLAGS.workdir), 'lab': os.path.abspath(FLAGS.lab),
      'shots': shots, 'draws': FLAGS.draws, 'seed': FLAGS.seed,
      'adapt_fraction': FLAGS.adapt_fraction, 'adapt': a.to_dict(),
      'machine': _cpu_model(), 'cpus': len(os.sched_getaffinity(0)),
      'seconds': round(time.perf_counter() - started, 1), 'summary': summary})
  files.write_text(os.path.join(FLAGS.out, 'curve.md'), table(summary))
  figure(summary, os.path.join(FLAGS.out, 'curve.png'),
         f'{os.path.basename(os.path.normpath(FLAGS.workdir))} on '
         f'{os.path.basename(os.path.normpath(FLAGS.lab))}: held-out samples, mean ± std over '
         f'{FLAGS.draws} draws')
  print(table(summary))
  print(f'written to {FLAGS.out}')


if __name__ == '__main__':
  app.run(main)
