"""Results tables from finished workdirs: ``python -m bcjax.results runs/*``.

Reads each workdir's ``report/test_metrics.json`` (or the JSON given with
``--report``, e.g. an ensemble's or a TTA eval's ``test_metrics.json``), groups runs by
config name (seeds of one config form one row) and prints a markdown table of
the paper's Table 3 metrics, mean +- standard deviation over seeds, with the
expected calibration error, the number of seeds and test examples, and the
training wall time from ``history.json``. Every results table in
docs/results.md comes from this command.

When the reports hold them (bcjax/metrics.py), a second
table follows with what medical imaging papers report: one-vs-rest ROC AUC
(macro), Cohen's kappa, balanced accuracy, and the bootstrap 95% intervals of
accuracy and macro F1 (for a row of one run; a row of several seeds shows
their spread as the standard deviation instead).

``--runs`` adds one row per run: its seed, accuracy and macro F1, the epoch
of its best validation accuracy, the range of validation accuracy over the
last five epochs (how much luck picking the best checkpoint holds), its last
training loss and the classes it never predicted on the test split. A mean over seeds hides a run that
collapsed onto a few classes; this table shows it.

``--validation`` is for choosing: it reads only ``history.json`` and
``config.json``, never a test report, and prints per row the best validation
accuracy, the mean validation accuracy over the last five epochs (a settled
curve's score, less lucky than its best epoch) and how far the curve swings
there. For a run with an EMA of the weights, an epoch's score is the better
of the two validations, the one its checkpoint is chosen and tested by. Rank
recipes, levers and checkpoints on this table, then look at the test split
once::

    python -m bcjax.results runs/ablation/* --by data.augment.mixup_alpha --validation

``--other-lab`` puts beside each run an evaluation of the same run on another
lab's folder (``launch.py --mode=eval --config.data.split=all
--config.data.path=FOLDER --out DIR``: pass DIR or its ``all_metrics.json``;
repeat the flag for more runs or labs). The evaluation is matched to its run
by the workdir it records (and its test-time augmentation or ensemble), and a
table follows with, per row and lab, the PBC column (test accuracy, or the
best validation accuracy with ``--validation``) and the other lab's accuracy
with the prediction over all classes and restricted to the classes present
there, the balanced accuracy of both, and the classes the folder lacks::

    python -m bcjax.results runs/base_hybrid_s0 --other-lab /tmp/chula_eval
"""

import argparse
import collections
import json
import os
import sys
from typing import Sequence

import numpy as np

from bcjax import run_config

COLUMNS = (('accuracy', 'accuracy'), ('precision_macro', 'precision (macro)'),
           ('recall_macro', 'recall (macro)'), ('f1_macro', 'F1 (macro)'), ('ece', 'ECE'))
# The second table's columns: (key, header, shown in percent).
MEDICAL_COLUMNS = (('roc_auc_macro', 'ROC AUC (macro)', False),
                   ('cohen_kappa', "Cohen's kappa", False),
                   ('balanced_accuracy', 'balanced accuracy %', True))


def _config_value(workdir: str, dotted: str):
  """``dotted`` (e.g. ``model.initializers``) from the run's ``config.json``; None if absent."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    value = json.load(f)
  for key in dotted.split('.'):
    if not isinstance(value, dict) or key not in value:
      return None
    value = value[key]
  return value


def _label(name: str, workdir: str, by: Sequence[str]) -> str:
  """The row label: ``name`` and the run's value of each ``by`` field."""
  return name + ''.join(f' ({field.split(".")[-1]}={_config_value(workdir, field)})'
                        for field in by)


def load(path: str, by: Sequence[str] = ()) -> dict:
  """One run's metrics (and training wall time) from a workdir or a metrics JSON.

  ``by`` names config fields (``model.initializers``) whose values, read from
  the run's ``config.json``, join its row label: runs of one config that
  differ there become rows of their own.
  """
  metrics_path = path if path.endswith('.json') else os.path.join(path, 'report',
                                                                  'test_metrics.json')
  if not os.path.exists(metrics_path):
    raise FileNotFoundError(f'no test metrics at {metrics_path}: has the run finished?')
  with open(metrics_path) as f:
    metrics = json.load(f)
  workdir = metrics.get('workdir') or os.path.dirname(os.path.dirname(metrics_path))
  metrics.setdefault('workdir', os.path.abspath(workdir))
  history = run_config.read_history(workdir)
  if history is not None:
    metrics['train_hours'] = sum(e.get('seconds', 0.0) for e in history) / 3600
    metrics['epochs'] = len(history)
    metrics['history'] = history
  elif 'epochs_trained' in metrics:
    metrics['epochs'] = metrics['epochs_trained']
  metrics['config_name'] = _label(metrics.get('config_name') or os.path.basename(workdir),
                                  workdir, by)
  if metrics.get('ensemble'):  # Its members' training is in their own rows.
    metrics['config_name'] = (f"ensemble of {len(metrics['ensemble'])} "
                              f"({metrics['config_name']})")
    metrics.pop('train_hours', None)
    metrics.pop('epochs', None)
  if metrics.get('tta'):
    metrics['config_name'] += ' +TTA'
  return metrics


def _cell(values: Sequence[float], percent: bool = True, digits: int | None = None) -> str:
  scale, default_digits = (100, 2) if percent else (1, 3)
  digits = digits or default_digits
  mean = float(np.mean(values)) * scale
  if len(values) == 1:
    return f'{mean:.{digits}f}'
  return f'{mean:.{digits}f} ± {float(np.std(values, ddof=1)) * scale:.{digits}f}'


def _groups(runs: Sequence[dict]) -> dict[str, list[dict]]:
  groups: dict[str, list[dict]] = collections.OrderedDict()
  for r in runs:
    groups.setdefault(r['config_name'], []).append(r)
  return groups


def table(runs: Sequence[dict]) -> str:
  """Markdown table, one row per config name (mean ± sd over its seeds)."""
  groups = _groups(runs)
  head = ['config'] + [name + (' %' if key != 'ece' else '') for key, name in COLUMNS]
  head += ['seeds', 'test images', 'epochs', 'train hours']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  for name, rs in groups.items():
    cells = [name]
    for key, _ in COLUMNS:
      cells.append(_cell([r[key] for r in rs], percent=key != 'ece'))
    cells.append(str(len(rs)))
    cells.append(str(rs[0].get('num_examples', '')))
    cells.append(str(rs[0].get('epochs', '')))
    hours = [r['train_hours'] for r in rs if 'train_hours' in r]
    cells.append(f'{np.mean(hours):.2f}' if hours else '')
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def _interval(rs: Sequence[dict], key: str) -> str:
  if len(rs) != 1 or not rs[0].get(f'{key}_ci95'):
    return ''
  lo, hi = rs[0][f'{key}_ci95']
  return f'{100 * lo:.2f} - {100 * hi:.2f}'


def medical_table(runs: Sequence[dict]) -> str:
  """ROC AUC, kappa, balanced accuracy and bootstrap intervals; '' if no report has them."""
  if not any('roc_auc_macro' in r for r in runs):
    return ''
  head = (['config'] + [h for _, h, _ in MEDICAL_COLUMNS]
          + ['accuracy 95% CI %', 'F1 (macro) 95% CI %', 'seeds'])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  for name, rs in _groups(runs).items():
    cells = [name]
    for key, _, percent in MEDICAL_COLUMNS:
      values = [r[key] for r in rs if r.get(key) is not None]
      cells.append(_cell(values, percent=percent, digits=None if percent else 4)
                   if values else '')
    cells += [_interval(rs, 'accuracy'), _interval(rs, 'f1_macro'), str(len(rs))]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def never_predicted(metrics: dict) -> list[str]:
  """Classes no test image was assigned to (empty confusion-matrix columns)."""
  cm = metrics.get('confusion_matrix')
  if not isinstance(cm, dict) or 'counts' not in cm:
    return []
  counts = np.asarray(cm['counts'])
  return [name for name, total in zip(cm['class_names'], counts.sum(axis=0)) if total == 0]


LAST_EPOCHS = 5  # How settled the validation curve is where the best checkpoint is chosen.


def selection_score(entry: dict) -> float:
  """An epoch's validation accuracy as the trainer ranks checkpoints by it.

  With ``config.ema_decay`` > 0 both the weights and their average are
  validated and the better one is what the checkpoint is kept and tested
  with (bcjax/train.py), so that is the score to choose on.
  """
  ema = entry.get('val_accuracy_ema')
  return entry['val_accuracy'] if ema is None else max(entry['val_accuracy'], ema)


def _spread(values: Sequence[float]) -> str:
  return f'{min(values):.4f} - {max(values):.4f}' if values else ''


def load_validation(workdir: str, by: Sequence[str] = ()) -> dict:
  """A run's validation curve and config name, without opening its test report."""
  history = run_config.read_history(workdir)
  if history is None:
    raise FileNotFoundError(f'no {run_config.HISTORY_FILE} in {workdir}: is it a workdir?')
  history = [e for e in history if e.get('val_accuracy') is not None]
  if not history:
    raise FileNotFoundError(f'{run_config.history_path(workdir)} has no validated epoch yet')
  name = _config_value(workdir, 'name') or os.path.basename(os.path.normpath(workdir))
  return {'config_name': _label(name, workdir, by), 'seed': _config_value(workdir, 'seed'),
          'history': history, 'workdir': os.path.abspath(workdir)}


def validation_table(runs: Sequence[dict]) -> str:
  """Per row, validation only: best, mean of the last epochs, and their swing."""
  head = ['config', 'best validation %', f'validation, mean of last {LAST_EPOCHS} epochs %',
          f'swing over last {LAST_EPOCHS} epochs (points)', 'seeds', 'epochs']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  for name, rs in _groups(runs).items():
    lasts = [[selection_score(e) for e in r['history'][-LAST_EPOCHS:]] for r in rs]
    swing = [100 * (max(v) - min(v)) for v in lasts]
    epochs = sorted({r['history'][-1]['epoch'] for r in rs})
    lines.append('| ' + ' | '.join([
        name, _cell([max(selection_score(e) for e in r['history']) for r in rs]),
        _cell([float(np.mean(v)) for v in lasts]),
        _cell(swing, percent=False, digits=1), str(len(rs)),
        '/'.join(str(e) for e in epochs)]) + ' |')
  return '\n'.join(lines)


def runs_table(runs: Sequence[dict]) -> str:
  """One row per run: the spread a mean over seeds hides, collapses included."""
  head = ['config', 'seed', 'accuracy %', 'F1 (macro) %', 'best validation (epoch)',
          f'validation, last {LAST_EPOCHS} epochs', 'last train loss', 'classes never predicted']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  for r in runs:
    history = [e for e in r.get('history', []) if e.get('val_accuracy') is not None]
    best = max(history, key=selection_score) if history else None
    never = never_predicted(r)
    cells = [r['config_name'], str(r.get('seed', '')), f"{100 * r['accuracy']:.2f}",
             f"{100 * r['f1_macro']:.2f}",
             f"{selection_score(best):.4f} ({best['epoch']})" if best else '',
             _spread([selection_score(e) for e in history[-LAST_EPOCHS:]]),
             f"{history[-1]['train_loss']:.4f}" if history and 'train_loss' in history[-1] else '',
             f"{len(never)} ({', '.join(never)})" if never else 'none']
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def load_other_lab(path: str) -> dict:
  """An evaluation on another lab's folder: an eval's ``--out`` folder or its ``all_metrics.json``."""
  metrics_path = path if path.endswith('.json') else os.path.join(path, 'all_metrics.json')
  if not os.path.exists(metrics_path):
    raise FileNotFoundError(f'no other-lab metrics at {metrics_path} (an eval with '
                            '--config.data.split=all writes all_metrics.json into its --out)')
  with open(metrics_path) as f:
    metrics = json.load(f)
  if metrics.get('split') != 'all' or not metrics.get('workdir'):
    raise ValueError(f'{metrics_path} is not an evaluation of a workdir on a labelled folder '
                     "(split 'all')")
  metrics['path'] = metrics_path
  return metrics


def _run_key(metrics: dict) -> tuple:
  """Which evaluation of which run: the workdir, test-time augmentation and ensemble members."""
  return (os.path.realpath(metrics.get('workdir') or ''), bool(metrics.get('tta')),
          tuple(os.path.realpath(m) for m in metrics.get('ensemble') or ()))


def attach_other_lab(runs: Sequence[dict], other: Sequence[dict]) -> None:
  """Adds each other-lab evaluation to its run's ``other_lab`` list (ValueError if none)."""
  by_key: dict[tuple, list[dict]] = {}
  for r in runs:
    by_key.setdefault(_run_key(r), []).append(r)
  for m in other:
    matched = by_key.get(_run_key(m))
    if not matched:
      raise ValueError(f"{m['path']} evaluates {m['workdir']}"
                       + (' with TTA' if m.get('tta') else '')
                       + ', which is not among the runs given: pass that workdir too')
    for r in matched:
      r.setdefault('other_lab', []).append(m)


def _lab_name(metrics: dict) -> str:
  path = str(metrics.get('data_path') or '?')
  return os.path.basename(os.path.normpath(path)) or path


def other_lab_table(runs: Sequence[dict], validation: bool = False) -> str:
  """Per row and lab: the PBC column beside the other lab's accuracies; '' if none given."""
  rows: dict[tuple[str, str], list[tuple[dict, dict]]] = collections.OrderedDict()
  for r in runs:
    for m in r.get('other_lab', []):
      rows.setdefault((r['config_name'], _lab_name(m)), []).append((r, m))
  if not rows:
    return ''
  head = ['config', 'PBC best validation %' if validation else 'PBC test accuracy %',
          'other lab', 'images', 'accuracy, predicted over all classes %',
          'accuracy, predicted over the classes present %',
          'balanced accuracy, over all / present %', 'absent classes', 'seeds']
  lines = ['| ' + ' | '.join(head) + ' |', '|' + ' --- |' * len(head)]
  for (name, lab), pairs in rows.items():
    if validation:
      pbc = [max(selection_score(e) for e in r['history']) for r, _ in pairs]
    else:
      pbc = [r['accuracy'] for r, _ in pairs]
    evals = [m for _, m in pairs]

    def cell(key, fallback=None):
      values = [m.get(key, m.get(fallback) if fallback else None) for m in evals]
      return _cell(values) if values and None not in values else ''

    first = evals[0]
    n_all = len(first.get('per_class') or {}) or ''
    present = first.get('present_classes')
    absent = first.get('absent_classes')
    lines.append('| ' + ' | '.join([
        name, _cell(pbc), lab, str(first.get('num_examples', '')),
        cell('accuracy_present_all_argmax', 'accuracy') + (f' ({n_all})' if n_all else ''),
        cell('accuracy_present_restricted_argmax')
        + (f' ({len(present)})' if present else ''),
        f"{cell('balanced_accuracy_present_all_argmax', 'balanced_accuracy')} / "
        f"{cell('balanced_accuracy_present_restricted_argmax')}",
        ', '.join(absent) if absent else ('none' if absent is not None else '?'),
        str(len(pairs))]) + ' |')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('paths', nargs='+', help='workdirs or test_metrics.json files')
  parser.add_argument('--by', action='append', default=[],
                      help='a config field (e.g. model.initializers) that splits rows')
  parser.add_argument('--runs', action='store_true',
                      help='also one row per run: seed, best epoch, classes never predicted')
  parser.add_argument('--validation', action='store_true',
                      help='validation only (never reads a test report): for choosing recipes')
  parser.add_argument('--curves', help="a PNG of every run's validation accuracy and "
                      'training loss per epoch, labelled by row and seed')
  parser.add_argument('--other-lab', action='append', default=[], metavar='EVAL',
                      help="an eval of one of the runs on another lab's folder (its --out "
                      'folder or all_metrics.json), shown beside the run; repeatable')
  args = parser.parse_args(argv)
  try:
    runs = [(load_validation if args.validation else load)(p, args.by) for p in args.paths]
    attach_other_lab(runs, [load_other_lab(p) for p in args.other_lab])
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(validation_table(runs) if args.validation else table(runs))
  other = other_lab_table(runs, validation=args.validation)
  if other:
    print('\n' + other)
  if args.curves:
    from bcjax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top  (matplotlib)
    metrics_lib.plot_compared_curves(
        {f"{r['config_name']} seed {r.get('seed', '?')}": r['history']
         for r in runs if r.get('history')}, args.curves)
  if args.validation:
    return 0
  medical = medical_table(runs)
  if medical:
    print('\n' + medical)
  if args.runs:
    print('\n' + runs_table(runs))
  return 0


if __name__ == '__main__':
  sys.exit(main())
