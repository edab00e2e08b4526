"""The paper's metrics, figures and reports, from labels and probabilities.

Usage (imported as ``from bcjax import metrics as metrics_lib``: callers
name the dict it returns ``metrics``)::

    metrics, text = metrics_lib.classification_metrics(labels, probs, class_names)
    metrics_lib.write_report(out_dir, metrics, text, history=history)

writes into ``out_dir``:

* ``test_metrics.json`` (or ``<split>_metrics.json``): accuracy and the
  macro precision / recall / F1 of the paper's Table 3, weighted variants,
  per-class precision / recall / F1 / support, the confusion matrix with
  class names, ``ece`` (expected calibration error, 15 equal-width bins)
  with its ``reliability`` bins and the ``num_examples``; and what medical
  imaging papers report beside them: one-vs-rest ``roc_auc_macro`` and
  ``roc_auc_per_class`` (MedMNIST's headline metric next to accuracy),
  ``cohen_kappa``, ``balanced_accuracy`` and bootstrap 95% intervals
  ``accuracy_ci95`` / ``f1_macro_ci95`` (a test set of 1,542 images moves
  0.065 points per image: readers should see the interval).
  Callers add checkpoint step, config name and seed.

  Macro averages (precision, recall, F1, balanced accuracy, the F1 interval)
  are over the classes present, those with at least one image: another lab's
  folder may lack some of PBC's classes, and averaging their zeros in would
  report one class's recall of 0.60 as a macro recall of 0.075 over eight.
  ``present_classes`` and ``absent_classes`` name them, and a block says how
  a model does on those classes alone (:func:`present_class_metrics`):
  ``accuracy_present_all_argmax`` and ``balanced_accuracy_present_all_argmax``
  (the prediction over every class: an image called an absent class is
  wrong), the same ``..._restricted_argmax`` (the prediction over the present
  classes only, from the saved probabilities renormalised over them),
  ``predicted_as_absent`` (images given an absent class) and
  ``confusion_present_vs_all`` (present true classes against every predicted
  class). With every class present the two predictions are one.
* ``confusion_matrix.png``: counts and row-normalised, like the paper's
  Figures 6 and 8; ``reliability_diagram.png`` beside it (accuracy against
  confidence per ECE bin) and, when the caller passes the probabilities,
  ``roc_curves.png`` (one-vs-rest, per class);
* ``learning_curves.png``: train / validation loss and accuracy per epoch
  (Figures 5 and 7), when a history is given;
* ``classification_report.txt``: scikit-learn's plain-text report over the
  classes present, and a line naming the absent ones.

Everything here is host-side numpy; nothing touches a device.
"""

import os
from typing import Any, Sequence

import matplotlib

matplotlib.use('Agg')  # Files only; never a display.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np
from sklearn import metrics as skm

from bcjax import files

ECE_BINS = 15
# The bootstrap's resamples and its seed: fixed, so a report is reproducible
# and an evaluation repeated on the same predictions gives the same interval.
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0


def expected_calibration_error(labels: np.ndarray, probs: np.ndarray,
                               num_bins: int = ECE_BINS) -> float:
  """ECE: |accuracy - confidence| per equal-width confidence bin, weighted by size.

  Summed over :func:`reliability_bins`, so the diagram shows the gaps the ECE sums.
  """
  bins = reliability_bins(labels, probs, num_bins)
  ece = 0.0
  for count, confidence, accuracy in zip(bins['count'], bins['confidence'], bins['accuracy']):
    if count:
      ece += count / len(labels) * abs(accuracy - confidence)
  return float(ece)


def reliability_bins(labels: np.ndarray, probs: np.ndarray,
                     num_bins: int = ECE_BINS) -> dict[str, Any]:
  """Per ECE bin: examples, mean confidence and accuracy (None where a bin is empty)."""
  confidence = probs.max(-1) if len(labels) else np.zeros(0)
  correct = probs.argmax(-1) == labels if len(labels) else np.zeros(0, bool)
  # Bin i holds confidences in (i/n, (i+1)/n]; a confidence of 0 joins bin 0.
  bins = np.clip(np.ceil(confidence * num_bins).astype(int) - 1, 0, num_bins - 1)
  out: dict[str, Any] = {'bins': num_bins, 'count': [], 'confidence': [], 'accuracy': []}
  for b in range(num_bins):
    in_bin = bins == b
    out['count'].append(int(in_bin.sum()))
    out['confidence'].append(float(confidence[in_bin].mean()) if in_bin.any() else None)
    out['accuracy'].append(float(correct[in_bin].mean()) if in_bin.any() else None)
  return out


def one_vs_rest_auc(labels: np.ndarray, probs: np.ndarray,
                    num_classes: int) -> tuple[list[float | None], float | None]:
  """ROC AUC of each class against the rest, and their mean (the macro AUC).

  A class with no positive or no negative example has no AUC (None) and is
  left out of the mean; with every class present the mean is scikit-learn's
  ``roc_auc_score(..., multi_class='ovr', average='macro')``, which refuses
  such a split outright.
  """
  per_class: list[float | None] = []
  for c in range(num_classes):
    positive = labels == c
    if positive.all() or not positive.any():
      per_class.append(None)
    else:
      per_class.append(float(skm.roc_auc_score(positive, probs[:, c])))
  known = [a for a in per_class if a is not None]
  return per_class, (float(np.mean(known)) if known else None)


def bootstrap_ci(labels: np.ndarray, preds: np.ndarray, num_classes: int, *,
                 samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = 0.95,
                 classes: Sequence[int] | None = None) -> dict[str, list[float]]:
  """Percentile bootstrap intervals of accuracy and macro F1 over the examples.

  Each resample draws ``len(labels)`` examples with replacement from an
  explicitly seeded ``numpy.random.Generator``. The macro F1 of a resample is
  computed from its confusion matrix exactly as
  ``precision_recall_fscore_support(..., labels=classes, average='macro',
  zero_division=0)`` (tested), all resamples at once; ``classes`` defaults to
  all ``num_classes``.
  """
  n, k = len(labels), num_classes
  if n == 0:
    return {'accuracy': [0.0, 0.0], 'f1_macro': [0.0, 0.0]}
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, n, size=(samples, n))
  cell = labels[idx] * k + preds[idx] + (np.arange(samples) * k * k)[:, None]
  cm = np.bincount(cell.reshape(-1), minlength=samples * k * k).reshape(samples, k, k)
  tp = np.einsum('bii->bi', cm).astype(float)
  accuracy = tp.sum(-1) / n
  denominator = cm.sum(1) + cm.sum(2)  # 2 tp + fp + fn per class.
  f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
  if classes is not None:
    f1 = f1[:, list(classes)]
  tail = 100 * (1 - level) / 2
  return {name: [float(v) for v in np.percentile(values, [tail, 100 - tail])]
          for name, values in (('accuracy', accuracy), ('f1_macro', f1.mean(-1)))}


def restrict(probs: np.ndarray, classes: Sequence[int]) -> np.ndarray:
  """``probs`` renormalised over ``classes`` (the other columns 0): the prediction among them.

  A row with no mass on ``classes`` becomes uniform over them.
  """
  probs = np.asarray(probs, np.float64)
  out = np.zeros_like(probs)
  kept = probs[:, list(classes)]
  total = kept.sum(-1, keepdims=True)
  out[:, list(classes)] = np.divide(kept, total, out=np.full_like(kept, 1 / max(len(classes), 1)),
                                    where=total > 0)
  return out


def _mean_recall(labels: np.ndarray, preds: np.ndarray, classes: Sequence[int]) -> float:
  """Balanced accuracy: the mean over ``classes`` of each one's recall (0 when none)."""
  if not len(classes):
    return 0.0
  return float(np.mean([(preds[labels == c] == c).mean() for c in classes]))


def present_class_metrics(labels: np.ndarray, probs: np.ndarray,
                          class_names: Sequence[str]) -> dict[str, Any]:
  """Accuracy on the classes present, predicting over all classes and over those present.

  The classes present are those with at least one label. "all argmax" takes
  the most probable of every class (an image called an absent class is
  wrong); "restricted argmax" the most probable of the present classes
  (:func:`restrict`), what the model would say if told which classes can
  occur. Both come from the same probabilities: nothing is run again.
  """
  labels = np.asarray(labels)
  probs = np.asarray(probs, np.float64)
  ids = range(len(class_names))
  present = [c for c in ids if (labels == c).any()]
  absent = [c for c in ids if c not in present]
  out: dict[str, Any] = {'present_classes': [class_names[c] for c in present],
                         'absent_classes': [class_names[c] for c in absent]}
  n = len(labels)
  for name, p in (('all_argmax', probs), ('restricted_argmax', restrict(probs, present))):
    preds = p.argmax(-1) if n else np.zeros(0, int)
    out[f'accuracy_present_{name}'] = float((preds == labels).mean()) if n else 0.0
    out[f'balanced_accuracy_present_{name}'] = _mean_recall(labels, preds, present)
  preds = probs.argmax(-1) if n else np.zeros(0, int)
  out['predicted_as_absent'] = int(np.isin(preds, absent).sum())
  out['confusion_present_vs_all'] = {
      'rows': 'true class (present classes)', 'columns': 'predicted class (all classes)',
      'row_names': out['present_classes'], 'column_names': list(class_names),
      'counts': (skm.confusion_matrix(labels, preds, labels=list(ids))[present].tolist()
                 if n else [])}
  return out


def _present_text(out: dict[str, Any]) -> str:
  """The report's lines on absent classes and the prediction restricted to the present ones."""
  if not out['absent_classes']:
    return ''
  n, k = out['num_examples'], len(out['present_classes'])
  return (f"absent classes (no image): {', '.join(out['absent_classes'])}; the table and the "
          f"macro averages are over the classes present ({k})\n"
          f"{out['predicted_as_absent']} of {n} images predicted as an absent class\n"
          f"over the classes present: accuracy {out['accuracy_present_all_argmax']:.4f}, "
          f"balanced accuracy {out['balanced_accuracy_present_all_argmax']:.4f} "
          f"(prediction over all {len(out['per_class'])} classes); "
          f"accuracy {out['accuracy_present_restricted_argmax']:.4f}, "
          f"balanced accuracy {out['balanced_accuracy_present_restricted_argmax']:.4f} "
          f"(prediction restricted to the {k} present)\n")


def _medical_text(out: dict[str, Any], class_names: Sequence[str]) -> str:
  """The report's lines beyond scikit-learn's table: AUC, kappa, intervals."""
  def num(v):
    return 'n/a' if v is None else f'{v:.4f}'
  lines = [f"ROC AUC (one-vs-rest): macro {num(out['roc_auc_macro'])}"]
  lines += [f'  {name:>14} {num(out["roc_auc_per_class"][name])}' for name in class_names]
  lines.append(f"Cohen's kappa {num(out['cohen_kappa'])}   "
               f"balanced accuracy {num(out['balanced_accuracy'])}")
  b = out['bootstrap']
  for key, name in (('accuracy', 'accuracy'), ('f1_macro', 'macro F1')):
    lo, hi = out[f'{key}_ci95']
    lines.append(f'{name} {out[key]:.4f}, 95% CI [{lo:.4f}, {hi:.4f}]')
  lines.append(f"  (percentile bootstrap: {b['samples']} resamples of the "
               f"{out['num_examples']} examples, numpy seed {b['seed']})")
  return '\n'.join(lines) + '\n'


def nll(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
  """Each example's negative log-likelihood of its label (probabilities floored at 1e-12)."""
  return -np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))


def classification_metrics(labels: np.ndarray, probs: np.ndarray,
                           class_names: Sequence[str]) -> tuple[dict[str, Any], str]:
  """The metrics dict of ``test_metrics.json`` (JSON-ready) and the text report."""
  labels = np.asarray(labels)
  probs = np.asarray(probs, np.float64)
  preds = probs.argmax(-1)
  ids = list(range(len(class_names)))
  present = sorted(set(labels.tolist())) or ids  # Macro averages: over the classes present.
  out: dict[str, Any] = {
      'num_examples': int(len(labels)),
      'accuracy': float(skm.accuracy_score(labels, preds)) if len(labels) else 0.0,
  }
  for avg in ('macro', 'weighted'):
    p, r, f, _ = skm.precision_recall_fscore_support(
        labels, preds, labels=present, average=avg, zero_division=0)
    out.update({f'precision_{avg}': float(p), f'recall_{avg}': float(r), f'f1_{avg}': float(f)})
  out['ece'] = expected_calibration_error(labels, probs)
  if len(labels):
    # Beside the accuracy, says which way a miscalibration goes (below: under-confident).
    out['mean_confidence'] = float(probs.max(-1).mean())
    out['loss'] = float(nll(labels, probs).mean())
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
  out['reliability'] = reliability_bins(labels, probs)
  aucs, out['roc_auc_macro'] = (one_vs_rest_auc(labels, probs, len(ids)) if len(labels)
                                else ([None] * len(ids), None))
  out['roc_auc_per_class'] = dict(zip(class_names, aucs))
  kappa = skm.cohen_kappa_score(labels, preds, labels=ids) if len(labels) else np.nan
  out['cohen_kappa'] = None if np.isnan(kappa) else float(kappa)  # JSON has no NaN.
  # scikit-learn's balanced accuracy, over the classes present (without its warning).
  out['balanced_accuracy'] = _mean_recall(labels, preds, present if len(labels) else [])
  out.update(present_class_metrics(labels, probs, class_names))
  ci = bootstrap_ci(labels, preds, len(ids), classes=present)
  out['accuracy_ci95'], out['f1_macro_ci95'] = ci['accuracy'], ci['f1_macro']
  out['bootstrap'] = {'samples': BOOTSTRAP_SAMPLES, 'seed': BOOTSTRAP_SEED,
                      'method': 'percentile'}
  text = skm.classification_report(
      labels, preds, labels=present, target_names=[class_names[c] for c in present], digits=4,
      zero_division=0)
  return out, text + '\n' + _present_text(out) + _medical_text(out, class_names)


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


def plot_reliability(reliability: dict[str, Any], ece: float, path: str,
                     title: str = '') -> None:
  """Accuracy against confidence per ECE bin (top), examples per bin (bottom)."""
  n = reliability['bins']
  edges = np.linspace(0, 1, n + 1)
  centres, width = (edges[:-1] + edges[1:]) / 2, 1 / n
  fig, (ax, hist) = plt.subplots(2, 1, figsize=(5.5, 6.5), sharex=True,
                                 gridspec_kw={'height_ratios': (3, 1)})
  ax.plot([0, 1], [0, 1], '--', color='gray', label='perfect calibration')
  filled = [i for i in range(n) if reliability['count'][i]]
  acc = [reliability['accuracy'][i] for i in filled]
  conf = [reliability['confidence'][i] for i in filled]
  ax.bar(centres[filled], acc, width=width, edgecolor='black', color='tab:blue',
         label='accuracy')
  ax.bar(centres[filled], np.subtract(conf, acc), bottom=acc, width=width, color='tab:red',
         alpha=0.3, edgecolor='tab:red', label='gap to mean confidence')
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_ylabel('accuracy')
  ax.set_title(f'{title}\nECE {ece:.4f} ({n} bins)' if title else f'ECE {ece:.4f} ({n} bins)')
  ax.legend(loc='upper left')
  hist.bar(centres, reliability['count'], width=width, edgecolor='black', color='gray')
  hist.set_yscale('symlog')
  hist.set_xlabel('confidence (top-class probability)')
  hist.set_ylabel('examples')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_roc_curves(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str],
                    path: str, title: str = '') -> None:
  """One-vs-rest ROC curve of each class, its AUC in the legend."""
  fig, ax = plt.subplots(figsize=(6.5, 6))
  ax.plot([0, 1], [0, 1], '--', color='gray', lw=1)
  aucs, macro = one_vs_rest_auc(labels, probs, len(class_names))
  for c, (name, auc) in enumerate(zip(class_names, aucs)):
    if auc is None:
      continue
    fpr, tpr, _ = skm.roc_curve(labels == c, probs[:, c])
    ax.plot(fpr, tpr, lw=1.5, label=f'{name} (AUC {auc:.4f})')
  ax.set_xlabel('false positive rate (1 - specificity)')
  ax.set_ylabel('true positive rate (sensitivity)')
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.01)
  macro_text = 'n/a' if macro is None else f'{macro:.4f}'
  ax.set_title((f'{title}\n' if title else '') + f'one-vs-rest ROC, macro AUC {macro_text}')
  ax.legend(loc='lower right', fontsize=8)
  ax.grid(alpha=0.3)
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


def plot_compared_curves(curves: dict[str, Sequence[dict[str, Any]]], path: str,
                         title: str = '') -> None:
  """Validation accuracy and training loss per epoch of several runs, one line each.

  ``curves`` maps a label (e.g. ``cnn (initializers=keras) seed 0``) to that
  run's ``history.json``: how differently configured runs learn, in one figure.
  """
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, key, label in ((axes[0], 'val_accuracy', 'validation accuracy'),
                         (axes[1], 'train_loss', 'training loss')):
    for name, history in curves.items():
      pts = [(h['epoch'], h[key]) for h in history if h.get(key) is not None]
      if pts:
        ax.plot(*zip(*pts), 'o-', markersize=3, label=name)
    ax.set_xlabel('epoch')
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_report(out_dir: str, metrics: dict[str, Any], report: str, *, split: str = 'test',
                 history: Sequence[dict[str, Any]] | None = None, title: str = '',
                 labels: np.ndarray | None = None, probs: np.ndarray | None = None) -> str:
  """Writes the JSON, figures and text report; returns the JSON's path.

  ``labels`` and ``probs`` (the examples behind ``metrics``) add the ROC curves.
  """
  # Every file whole or not at all (bcjax/files.py): a killed report breaks no later reader.
  os.makedirs(out_dir, exist_ok=True)
  files.write_text(os.path.join(out_dir, 'classification_report.txt'),
                   f'{title}\n\n{report}' if title else report)
  path = os.path.join(out_dir, f'{split}_metrics.json')
  files.write_json(path, metrics)
  cm = metrics['confusion_matrix']
  with files.atomic_path(os.path.join(out_dir, 'confusion_matrix.png')) as tmp:
    plot_confusion_matrix(np.array(cm['counts']), cm['class_names'], tmp, title)
  if 'reliability' in metrics:
    with files.atomic_path(os.path.join(out_dir, 'reliability_diagram.png')) as tmp:
      plot_reliability(metrics['reliability'], metrics['ece'], tmp, title)
  if labels is not None and probs is not None and len(labels):
    with files.atomic_path(os.path.join(out_dir, 'roc_curves.png')) as tmp:
      plot_roc_curves(np.asarray(labels), np.asarray(probs), cm['class_names'], tmp, title)
  if history:
    with files.atomic_path(os.path.join(out_dir, 'learning_curves.png')) as tmp:
      plot_learning_curves(history, tmp,
                           title.split(' - ')[0])  # The config name; the curves have no split.
  return path


def format_metrics(metrics: dict[str, Any]) -> str:
  """One line for the console; a second on absent classes when some are."""
  line = (f"accuracy {metrics['accuracy']:.4f}  precision {metrics['precision_macro']:.4f}  "
          f"recall {metrics['recall_macro']:.4f}  f1 {metrics['f1_macro']:.4f}  "
          f"ece {metrics['ece']:.4f}" + _auc_kappa(metrics) + f"  (n={metrics['num_examples']})")
  if metrics.get('absent_classes'):
    present = metrics['present_classes']
    line += (f"\n  absent classes: {', '.join(metrics['absent_classes'])} (macro averages over "
             f"the {len(present)} present: {', '.join(present)}); "
             f"{metrics['predicted_as_absent']} images predicted as an absent class; "
             f"prediction restricted to the {len(present)} present: accuracy "
             f"{metrics['accuracy_present_restricted_argmax']:.4f}, balanced accuracy "
             f"{metrics['balanced_accuracy_present_restricted_argmax']:.4f} (over all "
             f"{len(metrics['per_class'])}: {metrics['accuracy_present_all_argmax']:.4f}, "
             f"{metrics['balanced_accuracy_present_all_argmax']:.4f})")
  return line


def _auc_kappa(metrics: dict[str, Any]) -> str:
  parts = [f'  {name} {metrics[key]:.4f}' for key, name in
           (('roc_auc_macro', 'auc'), ('cohen_kappa', 'kappa')) if metrics.get(key) is not None]
  if metrics.get('accuracy_ci95'):
    lo, hi = metrics['accuracy_ci95']
    parts.append(f'  accuracy 95% CI [{lo:.4f}, {hi:.4f}]')
  return ''.join(parts)
