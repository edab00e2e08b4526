"""The reports medical imaging expects: ROC AUC, kappa, balanced accuracy, bootstrap CIs."""

import json
import os

import numpy as np
import pytest
from sklearn import metrics as skm

from bcjax import results
from bcjax import metrics as metrics_lib

NAMES = ('a', 'b', 'c', 'd')


def _predictions(n=300, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, len(NAMES), n)
  logits = rng.normal(size=(n, len(NAMES))) + 2.0 * np.eye(len(NAMES))[labels]
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  return labels, probs


def test_auc_kappa_balanced_accuracy_match_sklearn():
  labels, probs = _predictions()
  m, text = metrics_lib.classification_metrics(labels, probs, NAMES)
  preds = probs.argmax(-1)
  assert m['roc_auc_macro'] == pytest.approx(
      skm.roc_auc_score(labels, probs, multi_class='ovr', average='macro'), abs=1e-12)
  for c, name in enumerate(NAMES):
    assert m['roc_auc_per_class'][name] == pytest.approx(
        skm.roc_auc_score(labels == c, probs[:, c]), abs=1e-12)
  assert m['cohen_kappa'] == pytest.approx(skm.cohen_kappa_score(labels, preds))
  assert m['balanced_accuracy'] == pytest.approx(skm.balanced_accuracy_score(labels, preds))
  assert "Cohen's kappa" in text and 'ROC AUC (one-vs-rest): macro' in text
  assert '95% CI' in text and 'numpy seed 0' in text
  json.dumps(m, allow_nan=False)  # Strict JSON: no NaN anywhere.


def test_auc_of_a_class_missing_from_the_labels_is_none():
  labels, probs = _predictions()
  keep = labels != 3  # Class 'd' never occurs: no AUC, left out of the mean.
  m, text = metrics_lib.classification_metrics(labels[keep], probs[keep], NAMES)
  assert m['roc_auc_per_class']['d'] is None
  known = [m['roc_auc_per_class'][n] for n in NAMES[:3]]
  assert m['roc_auc_macro'] == pytest.approx(np.mean(known))
  assert 'n/a' in text
  json.dumps(m, allow_nan=False)


def test_bootstrap_matches_a_loop_over_sklearn_and_is_seeded():
  labels, probs = _predictions(n=120)
  preds = probs.argmax(-1)
  samples, seed = 64, 7
  got = metrics_lib.bootstrap_ci(labels, preds, len(NAMES), samples=samples, seed=seed)
  idx = np.random.default_rng(seed).integers(0, len(labels), size=(samples, len(labels)))
  acc = [skm.accuracy_score(labels[i], preds[i]) for i in idx]
  f1 = [skm.f1_score(labels[i], preds[i], labels=range(len(NAMES)), average='macro',
                     zero_division=0) for i in idx]
  np.testing.assert_allclose(got['accuracy'], np.percentile(acc, [2.5, 97.5]), atol=1e-12)
  np.testing.assert_allclose(got['f1_macro'], np.percentile(f1, [2.5, 97.5]), atol=1e-12)
  assert got == metrics_lib.bootstrap_ci(labels, preds, len(NAMES), samples=samples, seed=seed)
  assert got != metrics_lib.bootstrap_ci(labels, preds, len(NAMES), samples=samples, seed=8)
  m, _ = metrics_lib.classification_metrics(labels, probs, NAMES)
  lo, hi = m['accuracy_ci95']
  assert lo <= m['accuracy'] <= hi and hi - lo > 0.05  # 120 examples: a wide interval.
  assert m['bootstrap'] == {'samples': metrics_lib.BOOTSTRAP_SAMPLES,
                            'seed': metrics_lib.BOOTSTRAP_SEED, 'method': 'percentile'}
  perfect = metrics_lib.bootstrap_ci(labels, labels, len(NAMES))
  assert perfect == {'accuracy': [1.0, 1.0], 'f1_macro': [1.0, 1.0]}


def test_reliability_bins_are_the_ece_bins():
  labels, probs = _predictions()
  m, _ = metrics_lib.classification_metrics(labels, probs, NAMES)
  r = m['reliability']
  assert r['bins'] == metrics_lib.ECE_BINS and sum(r['count']) == len(labels)
  n = len(labels)
  ece = sum(c / n * abs(a - f) for c, a, f in zip(r['count'], r['accuracy'], r['confidence'])
            if c)
  assert ece == pytest.approx(m['ece'])


@pytest.mark.slow
def test_report_writes_roc_and_reliability_figures(tmp_path):
  labels, probs = _predictions()
  m, text = metrics_lib.classification_metrics(labels, probs, NAMES)
  metrics_lib.write_report(str(tmp_path), m, text, title='t', labels=labels, probs=probs)
  for name in ('confusion_matrix.png', 'reliability_diagram.png', 'roc_curves.png'):
    assert os.path.getsize(tmp_path / name) > 0
  assert "Cohen's kappa" in (tmp_path / 'classification_report.txt').read_text()
  line = metrics_lib.format_metrics(m)
  assert ' auc ' in line and ' kappa ' in line and '95% CI' in line


def test_results_medical_table(tmp_path, capsys):
  labels, probs = _predictions()
  paths = []
  for seed, name in ((0, 'x'), (1, 'x'), (0, 'y')):
    m, _ = metrics_lib.classification_metrics(labels, np.roll(probs, seed, axis=0), NAMES)
    m.update(config_name=name, seed=seed)
    path = tmp_path / f'{name}{seed}.json'
    path.write_text(json.dumps(m))
    paths.append(str(path))
  assert results.main(paths) == 0
  out = capsys.readouterr().out
  medical = out.split('\n\n')[1].splitlines()
  assert medical[0].startswith("| config | ROC AUC (macro) | Cohen's kappa |")
  assert medical[2].startswith('| x | ') and ' ± ' in medical[2]
  assert medical[2].endswith('|  |  | 2 |')  # Two seeds: their spread, no interval.
  lo, hi = m['accuracy_ci95']
  assert medical[3].endswith(f'| {100 * lo:.2f} - {100 * hi:.2f} | '
                             f"{100 * m['f1_macro_ci95'][0]:.2f} - "
                             f"{100 * m['f1_macro_ci95'][1]:.2f} | 1 |")
  # Older reports without these fields: the first table only.
  old = tmp_path / 'old.json'
  old.write_text(json.dumps({k: m[k] for k in ('accuracy', 'precision_macro', 'recall_macro',
                                                 'f1_macro', 'ece', 'num_examples')}))
  assert results.main([str(old)]) == 0
  assert "kappa" not in capsys.readouterr().out
