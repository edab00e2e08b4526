"""The predictions CSV: one row per example, written by eval and predict, read by ensembles.

Writer and reader live together so the format has one home::

    predictions_csv.write('runs/cnn/report/test_predictions.csv', names, probs, class_names, labels)
    names, truth, probs, class_names = predictions_csv.read('runs/cnn/report/test_predictions.csv')

Columns: ``path``, ``true_class`` (labelled splits only), ``predicted_class``,
one ``p_<class>`` per class (six decimals) and ``error`` (a file predict
could not read). Text cells are escaped for spreadsheets (:func:`csv_cell`).
"""

import csv
import os

import numpy as np

from bcjax import files
from bcjax.errors import UserError

_FORMULA_STARTS = ('=', '+', '-', '@', '\t', '\r')


def csv_cell(text: str) -> str:
  """``text`` safe for a spreadsheet: a leading ``'`` before = + - @ (OWASP's rule).

  File names are the user's (or an attacker's): ``=HYPERLINK(...)``.jpg opened
  in a spreadsheet would run as a formula. Probabilities are written as
  numbers and never start with those characters.
  """
  return "'" + text if text.startswith(_FORMULA_STARTS) else text


def write(path: str, names, probs: np.ndarray, class_names,
          labels: np.ndarray | None = None, errors=None) -> None:
  """One row per example: path, (true class), predicted class, probabilities, error.

  Written atomically (bcjax/files.py); text cells are escaped by :func:`csv_cell`.
  """
  with files.atomic_write(path, newline='') as f:
    w = csv.writer(f)
    class_names = [csv_cell(str(c)) for c in class_names]
    names = [csv_cell(str(n)) for n in names]
    header = ['path'] + (['true_class'] if labels is not None else [])
    w.writerow(header + ['predicted_class'] + [f'p_{c}' for c in class_names] + ['error'])
    for i, name in enumerate(names):
      row = [name] + ([class_names[labels[i]]] if labels is not None else [])
      err = errors[i] if errors is not None else ''
      if err:
        w.writerow(row + [''] + [''] * len(class_names) + [csv_cell(err)])
      else:
        w.writerow(row + [class_names[int(probs[i].argmax())]] +
                   [f'{p:.6f}' for p in probs[i]] + [''])


def read(path: str) -> tuple[list[str], list[str], np.ndarray, tuple[str, ...]]:
  """``(file names, true classes, probabilities [N, C], class names)`` of a labelled CSV."""
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
