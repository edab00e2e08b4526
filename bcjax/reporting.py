"""The paper's metrics, figures and reports, from labels and probabilities.

Usage::

    metrics, text = reporting.classification_metrics(labels, probs, class_names)
    reporting.write_report(out_dir, metrics, text, history=history)

writes into ``out_dir``:

* ``test_metrics.json`` (or ``<split>_metrics.json``): accuracy and the
  macro precision / recall / F1 of the paper's Table 3, weighted variants,
  per-class precision / recall / F1 / support, the confusion matrix with class
  names, ``ece`` (expected calibration error, 15 equal-width bins) and the
  ``num_examples``; callers add checkpoint step, config name and seed.
* ``confusion_matrix.png``: counts and row-normalised, like the paper's
  Figures 6 and 8;
* ``learning_curves.png``: train / validation loss and accuracy per epoch
  (Figures 5 and 7), when a history is given;
* ``classification_report.txt``: scikit-learn's plain-text report.

Everything here is host-side numpy; nothing touches a device.
"""

import json
import os
from typing import Any, Sequence

import matplotlib

matplotlib.use('Agg')  # Files only; never a display.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
from sklearn import metrics as skm

ECE_BINS = 15


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray,
                               num_bins: int = ECE_BINS) -> float:
  """ECE: |accuracy - confidence| per equal-width confidence bin, weighted by size."""
  if len(labels) == 0:
    return 0.0
  confidence = probs.max(-1)
  correct = probs.argmax(-1) == labels
  # Bin i holds confidences in (i/n, (i+1)/n]; a confidence of 0 joins bin 0.
  bins = np.clip(np.ceil(confidence * num_bins).astype(int) - 1, 0, num_bins - 1)
  ece = 0.0
  for b in range(num_bins):
    in_bin = bins == b
    if in_bin.any():
      ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
  return float(ece)


def classification_metrics(labels: np.ndarray, probs: np.ndarray,
                           class_names: Sequence[str]) -> tuple[dict[str, Any], str]:
  """The metrics dict of ``test_metrics.json`` (JSON-ready) and the text report."""
  labels = np.asarray(labels)
  probs = np.asarray(probs, np.float64)
  preds = probs.argmax(-1)
  ids = list(range(len(class_names)))
  out: dict[str, Any] = {
      'num_examples': int(len(labels)),
      'accuracy': float(skm.accuracy_score(labels, preds)) if len(labels) else 0.0,
  }
  for avg in ('macro', 'weighted'):
    p, r, f, _ = skm.precision_recall_fscore_support(
        labels, preds, labels=ids, average=avg, zero_division=0)
    out.update({f'precision_{avg}': float(p), f'recall_{avg}': float(r), f'f1_{avg}': float(f)})
  out['ece'] = expected_calibration_error(labels, probs)
  if len(labels):
    # Beside the accuracy, says which way a miscalibration goes (below: under-confident).
    out['mean_confidence'] = float(probs.max(-1).mean())
    out['loss'] = float(-np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None)).mean())
  p, r, f, s = skm.precision_recall_fscore_support(
      labels, preds, labels=ids, average=None, zero_division=0)
  out['per_class'] = {
      name: {'precision': float(p[i]), 'recall': float(r[i]), 'f1': float(f[i]),
             'support': int(s[i])}
      for i, name in enumerate(class_names)}
  out['confusion_matrix'] = {
      'class_names': list(class_names),
      'rows': 'true class', 'columns': 'predicted class',
      'counts': skm.confusion_matrix(labels, preds, labels=ids).tolist(),
  }
  text = skm.classification_report(
      labels, preds, labels=ids, target_names=list(class_names), digits=4, zero_division=0)
  return out, text


def plot_confusion_matrix(counts: np.ndarray, class_names: Sequence[str], path: str,
                          title: str = '') -> None:
  """Counts (left) and row-normalised (right), class names on both axes."""
  counts = np.asarray(counts)
  rows = counts.sum(1, keepdims=True)
  norm = np.divide(counts, rows, out=np.zeros(counts.shape, float), where=rows > 0)
  n = len(class_names)
  fig, axes = plt.subplots(1, 2, figsize=(6 + 1.1 * n, 3 + 0.55 * n))
  for ax, m, fmt, sub in ((axes[0], counts, 'd', 'counts'),
                          (axes[1], norm, '.2f', 'row-normalised (recall)')):
    im = ax.imshow(m, cmap='Blues', vmin=0, vmax=m.max() if m.max() > 0 else 1)
    ax.set_xticks(range(n), class_names, rotation=45, ha='right')
    ax.set_yticks(range(n), class_names)
    ax.set_xlabel('predicted class')
    ax.set_ylabel('true class')
    ax.set_title(sub)
    threshold = m.max() / 2 if m.max() > 0 else 1
    for i in range(n):
      for j in range(n):
        ax.text(j, i, format(m[i, j], fmt), ha='center', va='center', fontsize=8,
                color='white' if m[i, j] > threshold else 'black')
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_learning_curves(history: Sequence[dict[str, Any]], path: str, title: str = '') -> None:
  """Loss and accuracy per epoch, train and validation, side by side."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key in zip(axes, ('loss', 'accuracy')):
    for split, style in (('train', 'o-'), ('val', 's-')):
      pts = [(h['epoch'], h[f'{split}_{key}']) for h in history
             if h.get(f'{split}_{key}') is not None]
      if pts:
        x, y = zip(*pts)
        ax.plot(x, y, style, label='train' if split == 'train' else 'validation')
    ax.set_xlabel('epoch')
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend()
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_report(out_dir: str, metrics: dict[str, Any], report: str, *, split: str = 'test',
                 history: Sequence[dict[str, Any]] | None = None, title: str = '') -> str:
  """Writes the JSON, figures and text report; returns the JSON's path."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'classification_report.txt'), 'w') as f:
    f.write(f'{title}\n\n{report}' if title else report)
  path = os.path.join(out_dir, f'{split}_metrics.json')
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(metrics, f, indent=2)
  os.replace(tmp, path)
  cm = metrics['confusion_matrix']
  plot_confusion_matrix(np.array(cm['counts']), cm['class_names'],
                        os.path.join(out_dir, 'confusion_matrix.png'), title)
  if history:
    plot_learning_curves(history, os.path.join(out_dir, 'learning_curves.png'),
                         title.split(' - ')[0])  # The config name; the curves have no split.
  return path


def format_metrics(metrics: dict[str, Any]) -> str:
  """One line for the console."""
  return (f"accuracy {metrics['accuracy']:.4f}  precision {metrics['precision_macro']:.4f}  "
          f"recall {metrics['recall_macro']:.4f}  f1 {metrics['f1_macro']:.4f}  "
          f"ece {metrics['ece']:.4f}  (n={metrics['num_examples']})")
