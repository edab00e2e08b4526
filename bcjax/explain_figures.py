"""The figures of ``--mode=explain``: one per image, the faithfulness curves, a grid of examples.

Host-side matplotlib over what :mod:`bcjax.explain` computed; nothing here
touches a device. Maps are drawn as coloured overlays, each normalised to its
own range (the methods' units differ), upsampled bilinearly to the image.
"""

import os
from typing import Any

import matplotlib

matplotlib.use('Agg')  # Files only; never a display.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
import numpy as np

TITLES = {'gradcam': 'Grad-CAM', 'integrated_gradients': 'integrated gradients',
          'smoothgrad': 'SmoothGrad', 'rollout': 'attention rollout', 'random': 'random order'}


def upsample(m: np.ndarray, size: int) -> np.ndarray:
  """A (h, w) map bilinearly resized to (size, size), its range stretched to [0, 1].

  Min to max, not 0 to max: a rollout map is nearly uniform, and what it shows
  is where it differs.
  """
  m = np.asarray(m, np.float64)
  h, w = m.shape
  ys = np.clip((np.arange(size) + 0.5) * h / size - 0.5, 0, h - 1)
  xs = np.clip((np.arange(size) + 0.5) * w / size - 0.5, 0, w - 1)
  y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
  y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
  fy, fx = (ys - y0)[:, None], (xs - x0)[None, :]
  top = m[y0][:, x0] * (1 - fx) + m[y0][:, x1] * fx
  bottom = m[y1][:, x0] * (1 - fx) + m[y1][:, x1] * fx
  out = top * (1 - fy) + bottom * fy
  low, span = out.min(), out.max() - out.min()
  return (out - low) / span if span > 0 else np.zeros_like(out)


def _overlay(ax, image: np.ndarray, m: np.ndarray) -> None:
  ax.imshow(image)
  ax.imshow(upsample(m, image.shape[0]), cmap='jet', alpha=0.45, vmin=0, vmax=1)
  ax.set_xticks([])
  ax.set_yticks([])


def _caption(record: dict[str, Any]) -> tuple[str, str]:
  text = f"predicted: {record['predicted_class']} ({record['probability']:.3f})"
  color = 'black'
  if record.get('true_class'):
    text += f"\ntrue: {record['true_class']}"
    color = 'tab:green' if record['true_class'] == record['predicted_class'] else 'tab:red'
  return text, color


def plot_image(image: np.ndarray, maps: dict[str, np.ndarray], record: dict[str, Any],
               path: str) -> None:
  """The image with its prediction, then each method's map over it with its AUCs."""
  methods = list(maps)
  fig, axes = plt.subplots(1, 1 + len(methods), figsize=(2.6 * (1 + len(methods)), 3.2))
  axes = np.atleast_1d(axes)
  axes[0].imshow(image)
  axes[0].set_xticks([])
  axes[0].set_yticks([])
  text, color = _caption(record)
  axes[0].set_title(text, fontsize=8, color=color)
  for ax, method in zip(axes[1:], methods):
    _overlay(ax, image, maps[method])
    auc = record['auc'][method]
    ax.set_title(f"{TITLES.get(method, method)}\ndeletion {auc['deletion']:.2f}  "
                 f"insertion {auc['insertion']:.2f}", fontsize=8)
  fig.suptitle(os.path.basename(record['file']), fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_curves(mean_curves: dict[str, dict[str, list[float]]],
                mean_auc: dict[str, dict[str, float]], path: str, title: str = '') -> None:
  """Mean deletion and insertion curves per method, the random order dashed."""
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, kind, better in ((axes[0], 'deletion', 'lower'), (axes[1], 'insertion', 'higher')):
    for method, curves in mean_curves.items():
      y = np.asarray(curves[kind])
      x = np.linspace(0, 1, len(y))
      ax.plot(x, y, '--' if method == 'random' else '-', color='gray' if method == 'random'
              else None, label=f"{TITLES.get(method, method)} (AUC {mean_auc[method][kind]:.3f})")
    ax.set_xlabel('fraction of grid cells ' + ('removed' if kind == 'deletion' else 'restored'))
    ax.set_ylabel('probability of the predicted class')
    ax.set_title(f'{kind} ({better} AUC is better)')
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_examples(examples: dict[tuple[str, bool], tuple[np.ndarray, np.ndarray, dict[str, Any]]],
                  method: str, path: str) -> None:
  """One row per true class: a correctly and a wrongly classified image, each beside its map.

  ``examples`` maps (true class, correct?) to (image, ``method``'s map, record);
  a class with no wrong (or no right) example leaves that pair blank.
  """
  classes = sorted({c for c, _ in examples})
  fig, axes = plt.subplots(len(classes), 4, figsize=(9, 2.5 * len(classes)), squeeze=False)
  for ax in axes.ravel():
    ax.axis('off')
  for row, cls in enumerate(classes):
    for pair, correct in enumerate((True, False)):
      if (cls, correct) not in examples:
        continue
      image, m, record = examples[(cls, correct)]
      left, right = axes[row, 2 * pair], axes[row, 2 * pair + 1]
      left.imshow(image)
      text, color = _caption(record)
      left.set_title(text, fontsize=7, color=color)
      _overlay(right, image, m)
      right.set_title(TITLES.get(method, method), fontsize=7)
  fig.suptitle('correct (left pair) and wrong (right pair), one row per true class', fontsize=9)
  fig.tight_layout(rect=(0, 0, 1, 1 - 0.25 / len(classes)))  # Room for the title.
  fig.savefig(path, dpi=100)
  plt.close(fig)
