"""Metrics, report files and ``evaluate_workdir`` (a split, and a labelled folder)."""

import json
import os

import numpy as np
import pytest

from bcjax import evaluate, train
from bcjax import metrics as metrics_lib
from bcjax.errors import UserError

NAMES = ('a', 'b', 'c')


def test_metrics_of_known_predictions():
  labels = np.array([0, 0, 1, 1, 2, 2])
  preds = np.array([0, 1, 1, 1, 2, 0])
  probs = np.eye(3)[preds] * 0.7 + 0.1  # Confidence 0.8 on the predicted class.
  m, text = metrics_lib.classification_metrics(labels, probs, NAMES)
  assert m['num_examples'] == 6
  assert m['accuracy'] == pytest.approx(4 / 6)
  assert m['confusion_matrix']['counts'] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
  assert m['per_class']['b'] == {'precision': pytest.approx(2 / 3), 'recall': 1.0,
                                 'f1': pytest.approx(0.8), 'support': 2}
  assert m['recall_macro'] == pytest.approx((0.5 + 1 + 0.5) / 3)
  assert m['precision_macro'] == pytest.approx((0.5 + 2 / 3 + 1) / 3)
  # One bin (confidence 0.8), accuracy 4/6 there.
  assert m['ece'] == pytest.approx(abs(0.8 - 4 / 6))
  assert m['mean_confidence'] == pytest.approx(0.8)  # Over-confident: accuracy is 4/6.
  assert 'precision' in text and 'b' in text


PBC = ('basophil', 'eosinophil', 'erythroblast', 'ig', 'lymphocyte', 'monocyte', 'neutrophil',
       'platelet')


def test_absent_classes_are_named_and_left_out_of_macro_averages():
  # Ten neutrophils (class 6), six recognised, two called ig, two lymphocyte: recall 0.60.
  labels = np.full(10, 6)
  preds = np.array([6] * 6 + [3] * 2 + [4] * 2)
  probs = np.eye(8)[preds] * 0.5 + 0.5 / 8
  m, text = metrics_lib.classification_metrics(labels, probs, PBC)
  assert m['recall_macro'] == pytest.approx(0.60)  # Not 0.60 / 8 = 0.075.
  assert m['precision_macro'] == 1.0 and m['f1_macro'] == pytest.approx(0.75)
  assert m['balanced_accuracy'] == pytest.approx(0.60)
  assert m['present_classes'] == ['neutrophil']
  assert m['absent_classes'] == [n for n in PBC if n != 'neutrophil']
  assert m['predicted_as_absent'] == 4
  assert m['f1_macro_ci95'][1] <= 1.0 and m['f1_macro_ci95'][0] > 0.3  # Also over 'present'.
  assert 'absent classes (no image): basophil, eosinophil, erythroblast, ig, lymphocyte, ' \
         'monocyte, platelet' in text
  assert '\n    basophil ' not in text.split('ROC AUC')[0]  # The table: present classes only.
  assert 'absent classes: basophil' in metrics_lib.format_metrics(m)


def test_present_class_metrics_all_and_restricted_argmax():
  """Hand-made probabilities; the exact numbers worked out by hand."""
  names = ('a', 'b', 'c', 'd')  # 'c' and 'd' never occur.
  labels = np.array([0, 0, 0, 0, 1, 1])
  probs = np.array([
      [0.6, 0.1, 0.2, 0.1],   # a -> a (both)
      [0.3, 0.2, 0.4, 0.1],   # a -> c over all; a over {a, b} (0.3 > 0.2)
      [0.1, 0.3, 0.5, 0.1],   # a -> c over all; b restricted: wrong both ways
      [0.2, 0.1, 0.1, 0.6],   # a -> d over all; a restricted
      [0.1, 0.7, 0.1, 0.1],   # b -> b (both)
      [0.05, 0.15, 0.0, 0.8],  # b -> d over all; b restricted (0.15 > 0.05)
  ])
  m = metrics_lib.present_class_metrics(labels, probs, names)
  assert m['present_classes'] == ['a', 'b'] and m['absent_classes'] == ['c', 'd']
  assert m['accuracy_present_all_argmax'] == pytest.approx(2 / 6)
  assert m['balanced_accuracy_present_all_argmax'] == pytest.approx((1 / 4 + 1 / 2) / 2)
  assert m['accuracy_present_restricted_argmax'] == pytest.approx(5 / 6)
  assert m['balanced_accuracy_present_restricted_argmax'] == pytest.approx((3 / 4 + 1) / 2)
  assert m['predicted_as_absent'] == 4
  assert m['confusion_present_vs_all']['row_names'] == ['a', 'b']
  assert m['confusion_present_vs_all']['column_names'] == list(names)
  assert m['confusion_present_vs_all']['counts'] == [[1, 0, 2, 1], [0, 1, 0, 1]]
  np.testing.assert_allclose(metrics_lib.restrict(probs, [0, 1])[1], [0.6, 0.4, 0, 0])
  # Every class present: one prediction, the plain metrics.
  full, _ = metrics_lib.classification_metrics(np.array([0, 1, 2, 3]), np.eye(4)[[0, 1, 3, 3]],
                                               names)
  assert full['absent_classes'] == [] and full['predicted_as_absent'] == 0
  assert full['accuracy_present_all_argmax'] == full['accuracy_present_restricted_argmax'] \
      == full['accuracy'] == 0.75
  assert full['recall_macro'] == full['balanced_accuracy'] == 0.75
  json.dumps(m, allow_nan=False)


def test_ece_zero_when_calibrated_and_uses_15_bins():
  labels = np.array([0, 0, 0, 0, 1])
  probs = np.array([[0.8, 0.2]] * 5)  # Right 4 of 5 times at confidence 0.8.
  assert metrics_lib.expected_calibration_error(labels, probs) == pytest.approx(0.0)
  # Confidences 0.62 and 0.65 share bin (8/15, 9/15]; 0.7 is in the next one.
  probs = np.array([[0.62, 0.38], [0.65, 0.35], [0.3, 0.7]])
  labels = np.array([0, 1, 1])
  expected = (2 / 3) * abs(0.5 - 0.635) + (1 / 3) * abs(1 - 0.7)
  assert metrics_lib.expected_calibration_error(labels, probs) == pytest.approx(expected)


def test_write_report_files(tmp_path):
  labels = np.array([0, 1, 2, 2])
  probs = np.eye(3)[[0, 1, 2, 1]]
  m, text = metrics_lib.classification_metrics(labels, probs, NAMES)
  history = [{'epoch': 1, 'train_loss': 1.0, 'train_accuracy': 0.5, 'val_loss': 1.1,
              'val_accuracy': 0.4},
             {'epoch': 2, 'train_loss': 0.5, 'train_accuracy': 0.7, 'val_loss': None,
              'val_accuracy': None}]
  path = metrics_lib.write_report(str(tmp_path), m, text, history=history, title='t')
  assert os.path.basename(path) == 'test_metrics.json'
  with open(path) as f:
    assert json.load(f)['num_examples'] == 4
  for name in ('confusion_matrix.png', 'learning_curves.png', 'classification_report.txt'):
    assert os.path.getsize(tmp_path / name) > 0


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  from configs import cnn
  config = cnn.get_config('tiny')
  workdir = str(tmp_path_factory.mktemp('run'))
  return config, workdir, train.train_and_evaluate(config, workdir)


def test_evaluate_workdir_reproduces_training_report(trained, tmp_path):
  config, workdir, test_metrics = trained
  m = evaluate.evaluate_workdir(config, workdir, split='test', out_dir=str(tmp_path))
  skip = {'workdir', 'data_path', 'best_val_accuracy'}
  assert {k: v for k, v in m.items() if k not in skip} == \
      {k: v for k, v in test_metrics.items() if k not in skip}
  assert os.path.exists(tmp_path / 'test_metrics.json')
  assert os.path.exists(tmp_path / 'confusion_matrix.png')


def test_an_eval_reports_the_runs_own_name_and_seed(trained, tmp_path):
  config, workdir, _ = trained
  other = config.copy_and_resolve_references()
  other.name, other.seed = 'evaluating config', config.seed + 7
  m = evaluate.evaluate_workdir(other, workdir, split='test', out_dir=str(tmp_path))
  assert (m['config_name'], m['seed']) == (config.name, config.seed)


def test_evaluate_labelled_folder_split_all(trained, tmp_path):
  import data_fixtures
  config, workdir, _ = trained
  folder = data_fixtures.make_pbc_folder(str(tmp_path / 'lab'), per_class=3)
  config = config.copy_and_resolve_references()
  config.data.path = folder
  config.data.split = 'all'
  out = tmp_path / 'report'
  m = evaluate.evaluate_workdir(config, workdir, checkpoint='latest', out_dir=str(out))
  # 8 classes x 3 images + the readable odd images; the junk files are skipped.
  assert m['num_examples'] == 8 * 3 + len(data_fixtures.ODD_IMAGES) + 1  # + the duplicate
  assert m['split'] == 'all' and m['checkpoint'] == 'latest'
  with open(out / 'all_metrics.json') as f:
    assert json.load(f)['num_examples'] == m['num_examples']
  with open(out / 'all_predictions.csv') as f:
    assert len(f.read().strip().splitlines()) == m['num_examples'] + 1


def test_evaluate_another_labs_partial_folder(trained, tmp_path):
  """Three classes under plural / upper-case names; a run trained on a packed file too."""
  import csv
  import data_fixtures
  config, workdir, _ = trained
  folder = data_fixtures.make_lab_folder(
      str(tmp_path / 'lab'), [('NEUTROPHILS', 6), ('Lymphocytes', 4), ('eosinophil', 1)],
      per_class=3)
  packed = config.copy_and_resolve_references()
  packed.data.source, packed.data.path = 'packed', str(tmp_path / 'none.npz')
  out = tmp_path / 'report'
  m = evaluate.evaluate_other_lab(packed, workdir, folder, checkpoint='latest',
                                  out_dir=str(out))
  assert m['num_examples'] == 9 and m['split'] == 'all' and m['data_path'] == folder
  assert m['present_classes'] == ['eosinophil', 'lymphocyte', 'neutrophil']
  assert m['absent_classes'] == ['basophil', 'erythroblast', 'ig', 'monocyte', 'platelet']
  recalls = [m['per_class'][c]['recall'] for c in m['present_classes']]
  assert m['recall_macro'] == pytest.approx(np.mean(recalls))
  assert m['balanced_accuracy_present_all_argmax'] == pytest.approx(np.mean(recalls))
  assert m['accuracy_present_all_argmax'] == m['accuracy']
  # The restricted prediction, recomputed from the saved probabilities.
  with open(out / 'all_predictions.csv') as f:
    rows = list(csv.DictReader(f))
  assert {r['true_class'] for r in rows} == set(m['present_classes'])
  restricted = [max(m['present_classes'], key=lambda c: float(r[f'p_{c}'])) for r in rows]
  assert m['accuracy_present_restricted_argmax'] == pytest.approx(
      np.mean([p == r['true_class'] for p, r in zip(restricted, rows)]))
  counts = np.array(m['confusion_present_vs_all']['counts'])
  assert counts.shape == (3, 8) and counts.sum() == 9
  assert m['predicted_as_absent'] == sum(r['predicted_class'] in m['absent_classes']
                                         for r in rows)
  with open(out / 'all_metrics.json') as f:
    assert json.load(f)['absent_classes'] == m['absent_classes']
  assert 'absent classes (no image): basophil, erythroblast, ig, monocyte, platelet' in \
      (out / 'classification_report.txt').read_text()


@pytest.mark.real_data
def test_evaluate_on_the_other_labs_real_folder(other_lab, trained, tmp_path):
  config, workdir, _ = trained  # (other_lab first: skipped before training when absent.)
  m = evaluate.evaluate_other_lab(config, workdir, str(other_lab), checkpoint='latest',
                                  out_dir=str(tmp_path))
  assert m['num_examples'] == 511
  assert m['present_classes'] == ['basophil', 'eosinophil', 'lymphocyte', 'monocyte',
                                  'neutrophil']
  assert m['absent_classes'] == ['erythroblast', 'ig', 'platelet']
  assert [m['per_class'][c]['support'] for c in m['present_classes']] == [100, 100, 111, 88, 112]


def test_evaluate_errors_are_user_errors(trained, tmp_path):
  config, workdir, _ = trained
  with pytest.raises(UserError, match='no checkpoints in'):
    evaluate.evaluate_workdir(config, str(tmp_path))
  with pytest.raises(UserError, match='no checkpoint at step 999'):
    evaluate.evaluate_workdir(config, workdir, checkpoint='999')
  other = config.copy_and_resolve_references()
  other.model.dense_features = 16
  with pytest.raises(UserError, match='does not fit'):
    evaluate.evaluate_workdir(other, workdir)


def test_ensemble_of_one_model_twice_equals_the_model(trained, tmp_path):
  """Two members with the same weights (a copy: naming one workdir twice is refused)."""
  import shutil
  config, workdir, _ = trained
  twin = str(tmp_path / 'twin')
  shutil.copytree(workdir, twin, ignore=shutil.ignore_patterns('eval_*'))
  single = evaluate.evaluate_workdir(config, workdir, split='test', out_dir=str(tmp_path / 'a'))
  both = evaluate.evaluate_workdir(config, workdir, split='test', out_dir=str(tmp_path / 'b'),
                                   ensemble=[twin])
  for key in ('accuracy', 'f1_macro', 'precision_macro', 'num_examples', 'confusion_matrix'):
    assert both[key] == single[key]
  assert both['ensemble'] == [os.path.abspath(workdir), os.path.abspath(twin)]


def test_ensemble_member_takes_its_own_model_fields(tmp_path):
  from bcjax import ensemble_members
  from configs import cnn, cnn_lstm
  trained_cfg = cnn_lstm.get_config('tiny')
  (tmp_path / 'config.json').write_text(trained_cfg.to_json_best_effort())
  cli = cnn.get_config('tiny')
  cli.data.split = 'all'
  cli.tta = True
  member = ensemble_members.member_config(cli, str(tmp_path))
  assert member.model.name == 'cnn_lstm' and member.image_size == trained_cfg.image_size
  # A run recorded when config.model held the trainer's extractor fields still rebuilds.
  recorded = trained_cfg.to_dict()
  recorded['model'].update(extractor_checkpoint='', freeze_extractor=False)
  (tmp_path / 'config.json').write_text(json.dumps(recorded))
  from bcjax import models
  assert models.build_model(ensemble_members.member_config(cli, str(tmp_path))).extractor_features
  assert member.data.split == 'all' and member.tta  # The command line's data and eval choices.
  with pytest.raises(UserError, match='no config.json'):
    ensemble_members.member_config(cli, str(tmp_path / 'nothing'))


def test_ensemble_average_checks_alignment():
  import numpy as np
  from bcjax import ensemble_members
  a, b = np.array([[0.2, 0.8], [1.0, 0.0]]), np.array([[0.6, 0.4], [0.0, 1.0]])
  np.testing.assert_allclose(ensemble_members.average([a, b], [None, None]),
                             [[0.4, 0.6], [0.5, 0.5]])
  with pytest.raises(RuntimeError, match='different orders'):
    ensemble_members.average([a, b], [np.array([0, 1]), np.array([1, 0])])


def test_ensemble_of_saved_predictions_matches_the_live_ensemble(trained, tmp_path):
  """Averaging two evals' CSVs gives the metrics of averaging their probabilities live."""
  from bcjax import ensemble
  config, workdir, _ = trained
  tta = config.copy_and_resolve_references()
  tta.tta = True
  evaluate.evaluate_workdir(config, workdir, split='test', out_dir=str(tmp_path / 'plain'))
  evaluate.evaluate_workdir(tta, workdir, split='test', out_dir=str(tmp_path / 'tta'))
  csvs = [str(tmp_path / d / 'test_predictions.csv') for d in ('plain', 'tta')]
  got = ensemble.ensemble_predictions(csvs, str(tmp_path / 'offline'))
  live = [evaluate.collect_workdir(c, workdir, split='test')[0] for c in (config, tta)]
  assert not np.allclose(live[0].probs, live[1].probs)  # Two different members.
  want, _ = metrics_lib.classification_metrics(
      live[0].labels, (live[0].probs + live[1].probs) / 2, list(got['per_class']))
  assert got['confusion_matrix'] == want['confusion_matrix']
  for key in ('accuracy', 'f1_macro', 'ece', 'loss'):
    assert got[key] == pytest.approx(want[key], abs=1e-5)
  with open(tmp_path / 'offline' / 'test_predictions.csv') as f:
    rows = f.read().splitlines()
  with open(csvs[0]) as f:
    member_rows = f.read().splitlines()
  assert len(rows) == len(member_rows) == got['num_examples'] + 1
  assert [r.split(',')[:2] for r in rows] == [r.split(',')[:2] for r in member_rows]
  assert got['tta'] is False and got['config_name'] == config.name
  assert got['ensemble'] == [os.path.abspath(workdir)] * 2
  # Misaligned members are a one-line user error.
  with open(csvs[1]) as f:
    lines = f.read().splitlines()
  bad = tmp_path / 'bad.csv'
  bad.write_text('\n'.join([lines[0]] + lines[1:][::-1]) + '\n')
  with pytest.raises(UserError, match='same examples'):
    ensemble.ensemble_predictions([csvs[0], str(bad)], str(tmp_path / 'x'))
  with pytest.raises(UserError, match='no predictions file'):
    ensemble.ensemble_predictions([str(tmp_path / 'none.csv')], str(tmp_path / 'x'))
