"""Ensembles of saved predictions: average the class probabilities of evaluated runs.

The paper names ensembles as future work. ``--mode=eval`` and
``--mode=predict`` take more workdirs with ``--ensemble`` (bcjax/ensemble_members.py)::

    python launch.py --config configs/cnn_lstm.py --mode=eval --workdir runs/a \
        --ensemble runs/b --ensemble runs/c --out runs/ensemble_test

Members already evaluated need not run again: their ``<split>_predictions.csv``
files (written by every eval) average into the same report, up to the CSV's
six decimals, in seconds - also for runs evaluated on different machines::

    python -m bcjax.ensemble runs/a/report/test_predictions.csv \
        runs/b/eval_test_tta/test_predictions.csv --out runs/ensemble_ab
"""

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np

from bcjax import ensemble_members
from bcjax import predictions_csv
from bcjax.errors import UserError

def _sibling_metrics(csv_path: str, split: str) -> dict:
  """The ``<split>_metrics.json`` an eval wrote beside its predictions CSV, or {}."""
  path = os.path.join(os.path.dirname(csv_path), f'{split}_metrics.json')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def ensemble_predictions(paths: Sequence[str], out_dir: str) -> dict:
  """Averages the members' saved probabilities; writes and returns the report's metrics."""
  from bcjax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top  (matplotlib)
  members = [predictions_csv.read(p) for p in paths]
  names, truth, _, classes = members[0]
  for path, (n, t, _, c) in zip(paths[1:], members[1:]):
    if (n, t, c) != (names, truth, classes):
      raise UserError(f'{path} does not list the same examples, labels and classes as {paths[0]}')
  labels = np.array([classes.index(t) for t in truth])
  probs = ensemble_members.average([m[2] for m in members], [labels] * len(members))
  metrics, text = metrics_lib.classification_metrics(labels, probs, classes)
  split = os.path.basename(paths[0]).split('_predictions')[0]
  # Each eval wrote <split>_metrics.json beside its CSV: the members' names and TTA.
  facts = [_sibling_metrics(p, split) for p in paths]  # {} where an eval wrote none.
  config_names = dict.fromkeys(f['config_name'] for f in facts if 'config_name' in f)
  metrics.update(split=split, config_name=', '.join(config_names) or 'predictions',
                 tta=all(f.get('tta') for f in facts),
                 ensemble=[f.get('workdir', os.path.abspath(p)) for f, p in zip(facts, paths)],
                 ensemble_of_predictions=[os.path.abspath(p) for p in paths])
  metrics_lib.write_report(out_dir, metrics, text, split=split,
                           title=f"ensemble of {len(paths)} ({metrics['config_name']})"
                           + (' +TTA' if metrics['tta'] else '') + f' - {split}',
                           labels=labels, probs=probs)
  predictions_csv.write(os.path.join(out_dir, f'{split}_predictions.csv'),
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
  from bcjax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  print(f'ensemble of {len(args.predictions)}: {metrics_lib.format_metrics(metrics)}')
  print(f'report written to {args.out}')


if __name__ == '__main__':
  main()
