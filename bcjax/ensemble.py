"""Ensembles: average the class probabilities of several trained workdirs.

The paper names ensembles as future work. ``--mode=eval`` and
``--mode=predict`` take more workdirs with ``--ensemble``::

    python launch.py --config configs/cnn_lstm.py --mode=eval --workdir runs/a \
        --ensemble runs/b --ensemble runs/c --out runs/ensemble_test

Members may differ in model and image size: each member is rebuilt from the
``config.json`` its training run wrote (model, image size, dtype), while what
the command line says about the data and evaluation (path, split, batch size,
test-time augmentation) applies to all. Every member sees the same examples
in the same order (evaluation never shuffles); :func:`average` checks it.

Members already evaluated need not run again: their ``<split>_predictions.csv``
files (written by every eval) average into the same report, up to the CSV's
six decimals, in seconds - also for runs evaluated on different machines::

    python -m bcjax.ensemble runs/a/report/test_predictions.csv \
        runs/b/eval_test_tta/test_predictions.csv --out runs/ensemble_ab
"""

import argparse
import csv
import json
import os
import sys
from typing import Sequence

import ml_collections
import numpy as np

from bcjax.errors import UserError

# Fields a member takes from its own training config; the rest come from the
# command line's config.
MEMBER_FIELDS = ('model', 'image_size', 'num_classes', 'dtype')


def member_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """``config`` with the model fields of the run that trained ``workdir``."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise UserError(f'{workdir} has no config.json: is it a bcjax workdir?')
  with open(path) as f:
    trained = json.load(f)
  member = ml_collections.ConfigDict(config.to_dict())
  for field in MEMBER_FIELDS:
    if field in trained:
      value = trained[field]
      member[field] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  return member


def average(probs: Sequence[np.ndarray], labels: Sequence[np.ndarray | None]) -> np.ndarray:
  """The mean of the members' probabilities, after checking they line up."""
  shapes = {p.shape for p in probs}
  if len(shapes) != 1:
    raise RuntimeError(f'ensemble members produced different shapes: {sorted(shapes)}')
  known = [l for l in labels if l is not None]
  if any(not np.array_equal(known[0], l) for l in known[1:]):
    raise RuntimeError('ensemble members saw the examples in different orders')
  return np.mean(np.stack(probs), axis=0)


def read_predictions(path: str) -> tuple[list[str], list[str], np.ndarray, tuple[str, ...]]:
  """``(file names, true classes, probabilities [N, C], class names)`` of a predictions CSV."""
  if not os.path.exists(path):
    raise UserError(f'no predictions file at {path}')
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  classes = tuple(k[2:] for k in (rows[0] if rows else {}) if k.startswith('p_'))
  if not rows or 'true_class' not in rows[0] or not classes:
    raise UserError(f'{path} is not a labelled predictions CSV of bcjax eval')
  if any(r['error'] for r in rows):
    raise UserError(f'{path} has rows with errors; an ensemble needs every example')
  probs = np.array([[float(r[f'p_{c}']) for c in classes] for r in rows])
  return [r['path'] for r in rows], [r['true_class'] for r in rows], probs, classes


def _sibling_metrics(csv_path: str, split: str) -> dict:
  """The ``<split>_metrics.json`` an eval wrote beside its predictions CSV, or {}."""
  path = os.path.join(os.path.dirname(csv_path), f'{split}_metrics.json')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def ensemble_predictions(paths: Sequence[str], out_dir: str) -> dict:
  """Averages the members' saved probabilities; writes and returns the report's metrics."""
  from bcjax import evaluate, reporting  # pylint: disable=g-import-not-at-top  (JAX, matplotlib)
  members = [read_predictions(p) for p in paths]
  names, truth, _, classes = members[0]
  for path, (n, t, _, c) in zip(paths[1:], members[1:]):
    if (n, t, c) != (names, truth, classes):
      raise UserError(f'{path} does not list the same examples, labels and classes as {paths[0]}')
  labels = np.array([classes.index(t) for t in truth])
  probs = average([m[2] for m in members], [labels] * len(members))
  metrics, text = reporting.classification_metrics(labels, probs, classes)
  split = os.path.basename(paths[0]).split('_predictions')[0]
  # Each eval wrote <split>_metrics.json beside its CSV: the members' names and TTA.
  facts = [_sibling_metrics(p, split) for p in paths]  # {} where an eval wrote none.
  config_names = dict.fromkeys(f['config_name'] for f in facts if 'config_name' in f)
  metrics.update(split=split, config_name=', '.join(config_names) or 'predictions',
                 tta=all(f.get('tta') for f in facts),
                 ensemble=[f.get('workdir', os.path.abspath(p)) for f, p in zip(facts, paths)],
                 ensemble_of_predictions=[os.path.abspath(p) for p in paths])
  reporting.write_report(out_dir, metrics, text, split=split,
                         title=f"ensemble of {len(paths)} ({metrics['config_name']})"
                         + (' +TTA' if metrics['tta'] else '') + f' - {split}',
                         labels=labels, probs=probs)
  evaluate.write_predictions_csv(os.path.join(out_dir, f'{split}_predictions.csv'),
                                 names, probs, classes, labels)
  return metrics


def main(argv: Sequence[str] | None = None) -> None:
  p = argparse.ArgumentParser(description='Average saved predictions CSVs into one report.')
  p.add_argument('predictions', nargs='+', help='<split>_predictions.csv files of bcjax eval')
  p.add_argument('--out', required=True, help='report directory')
  args = p.parse_args(argv)
  try:
    metrics = ensemble_predictions(args.predictions, args.out)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  from bcjax import reporting  # pylint: disable=g-import-not-at-top
  print(f'ensemble of {len(args.predictions)}: {reporting.format_metrics(metrics)}')
  print(f'report written to {args.out}')


if __name__ == '__main__':
  main()
