"""bcjax.results: the results tables of docs/results.md, from workdirs."""

import json

from bcjax import results


def _run(tmp_path, name, seed, accuracy, seconds=(1800.0, 1800.0)):
  workdir = tmp_path / f'{name}_{seed}'
  (workdir / 'report').mkdir(parents=True)
  metrics = {'config_name': name, 'seed': seed, 'accuracy': accuracy,
             'precision_macro': accuracy, 'recall_macro': accuracy, 'f1_macro': accuracy,
             'ece': 0.05, 'num_examples': 1542, 'workdir': str(workdir)}
  (workdir / 'report' / 'test_metrics.json').write_text(json.dumps(metrics))
  (workdir / 'history.json').write_text(json.dumps([{'seconds': s} for s in seconds]))
  return str(workdir)


def test_table_groups_seeds_into_mean_and_sd(tmp_path, capsys):
  paths = [_run(tmp_path, 'cnn', 0, 0.70), _run(tmp_path, 'cnn', 1, 0.80),
           _run(tmp_path, 'cnn_lstm', 0, 0.95)]
  assert results.main(paths) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines[0].startswith('| config | accuracy % |')
  assert lines[2].startswith('| cnn | 75.00 ± 7.07 |')  # sd with ddof=1.
  assert lines[2].endswith('| 2 | 1542 | 2 | 1.00 |')
  assert lines[3].startswith('| cnn_lstm | 95.00 | 95.00 | 95.00 | 95.00 | 0.050 | 1 |')


def test_missing_report_is_a_one_line_error(tmp_path, capsys):
  assert results.main([str(tmp_path)]) == 2
  assert capsys.readouterr().err.startswith('error: no test metrics at')


def test_by_splits_rows_on_a_config_field(tmp_path, capsys):
  paths = []
  for seed, (scheme, accuracy) in enumerate([('keras', 0.7), ('torch', 0.8), ('keras', 0.9)]):
    paths.append(_run(tmp_path, 'cnn', seed, accuracy))
    (tmp_path / f'cnn_{seed}' / 'config.json').write_text(
        json.dumps({'name': 'cnn', 'model': {'initializers': scheme}}))
  paths.append(_run(tmp_path, 'old', 0, 0.5))  # No config.json: the value is unknown.
  assert results.main(paths + ['--by', 'model.initializers']) == 0
  rows = [l.split(' | ')[:2] for l in capsys.readouterr().out.strip().splitlines()[2:]]
  assert rows == [['| cnn (initializers=keras)', '80.00 ± 14.14'],
                  ['| cnn (initializers=torch)', '80.00'], ['| old (initializers=None)', '50.00']]


def test_curves_draws_every_run(tmp_path, capsys):
  paths = [_run(tmp_path, 'cnn', seed, 0.7) for seed in (0, 1)]
  for p in paths:
    (tmp_path / p / 'history.json').write_text(json.dumps(
        [{'epoch': e, 'val_accuracy': 0.5 + 0.1 * e, 'train_loss': 1.0 / e, 'seconds': 1.0}
         for e in (1, 2, 3)]))
  out = tmp_path / 'curves.png'
  assert results.main(paths + ['--curves', str(out)]) == 0
  assert out.stat().st_size > 10_000  # A drawn figure, not an empty canvas.


def test_runs_table_shows_each_seed_and_the_classes_it_never_predicts(tmp_path, capsys):
  paths = [_run(tmp_path, 'cnn', seed, 0.7) for seed in (0, 1)]
  names = ['basophil', 'eosinophil', 'ig']
  for p, column in zip(paths, ([0, 5, 5], [1, 5, 4])):  # Seed 0 never predicts basophil.
    metrics = json.loads((tmp_path / p / 'report' / 'test_metrics.json').read_text())
    metrics['confusion_matrix'] = {'class_names': names, 'counts': [column, [0, 0, 0], [0, 0, 0]]}
    (tmp_path / p / 'report' / 'test_metrics.json').write_text(json.dumps(metrics))
    (tmp_path / p / 'history.json').write_text(json.dumps(
        [{'epoch': e, 'val_accuracy': v, 'train_loss': 2.0 - e, 'seconds': 1.0}
         for e, v in ((1, 0.5), (2, 0.9), (3, 0.8))]))
  assert results.main(paths + ['--runs']) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-2] == '| cnn | 0 | 70.00 | 70.00 | 0.9000 (2) | 0.5000 - 0.9000 | -1.0000 | 1 (basophil) |'
  assert out[-1] == '| cnn | 1 | 70.00 | 70.00 | 0.9000 (2) | 0.5000 - 0.9000 | -1.0000 | none |'


def test_validation_table_never_reads_a_test_report(tmp_path, capsys):
  curves = {0: [0.5, 0.90, 0.80, 0.86, 0.84, 0.88, 0.82],  # Best 0.90, then swings.
            1: [0.6, 0.70, 0.80, 0.84, 0.85, 0.86, 0.85]}
  paths = []
  for seed, vals in curves.items():
    workdir = tmp_path / f'run_{seed}'
    workdir.mkdir()
    (workdir / 'config.json').write_text(json.dumps({'name': 'cnn', 'seed': seed}))
    (workdir / 'history.json').write_text(json.dumps(
        [{'epoch': e + 1, 'val_accuracy': v} for e, v in enumerate(vals)]))
    (workdir / 'report').mkdir()
    (workdir / 'report' / 'test_metrics.json').write_text('not json: must not be read')
    paths.append(str(workdir))
  assert results.main(paths + ['--validation']) == 0
  out = capsys.readouterr().out.strip().splitlines()
  assert len(out) == 3  # The one table: no test metrics, no medical table.
  # Best: 0.90 and 0.86; last five: mean 0.84 both, swings of 8 and 6 points.
  assert out[2] == '| cnn | 88.00 ± 2.83 | 84.00 ± 0.00 | 7.0 ± 1.4 | 2 | 7 |'


def test_validation_scores_an_ema_run_by_the_better_of_its_two_validations(tmp_path, capsys):
  workdir = tmp_path / 'ema_run'
  workdir.mkdir()
  (workdir / 'config.json').write_text(json.dumps({'name': 'attn', 'seed': 0}))
  raw, ema = [0.80, 0.85, 0.70, 0.90], [0.82, 0.84, 0.88, 0.89]
  (workdir / 'history.json').write_text(json.dumps(
      [{'epoch': e + 1, 'val_accuracy': r, 'val_accuracy_ema': m}
       for e, (r, m) in enumerate(zip(raw, ema))]))
  assert results.main([str(workdir), '--validation']) == 0
  # Scores 0.82, 0.85, 0.88, 0.90: best 0.90, mean 0.8625, swing 8 points (raw alone: 20).
  assert capsys.readouterr().out.strip().splitlines()[2] == '| attn | 90.00 | 86.25 | 8.0 | 1 | 4 |'


def test_validation_of_a_run_without_history_is_a_one_line_error(tmp_path, capsys):
  assert results.main([str(tmp_path), '--validation']) == 2
  assert capsys.readouterr().err.startswith('error: no history.json in')


def _other_lab_eval(tmp_path, workdir, accuracy, restricted, name='eval'):
  out = tmp_path / name
  out.mkdir()
  metrics = {'split': 'all', 'workdir': workdir, 'data_path': '/data/other_labs/chula_wbc/',
             'num_examples': 511, 'accuracy': accuracy, 'tta': False,
             'per_class': {c: {} for c in 'abcdefgh'},
             'present_classes': ['a', 'b', 'c', 'd', 'e'], 'absent_classes': ['f', 'g', 'h'],
             'accuracy_present_all_argmax': accuracy,
             'accuracy_present_restricted_argmax': restricted,
             'balanced_accuracy_present_all_argmax': accuracy - 0.01,
             'balanced_accuracy_present_restricted_argmax': restricted - 0.01}
  (out / 'all_metrics.json').write_text(json.dumps(metrics))
  return str(out)


def test_other_lab_evals_sit_beside_their_runs(tmp_path, capsys):
  paths = [_run(tmp_path, 'cnn', 0, 0.90), _run(tmp_path, 'cnn', 1, 0.92),
           _run(tmp_path, 'attn', 0, 0.95)]
  evals = [_other_lab_eval(tmp_path, paths[0], 0.40, 0.50, 'e0'),
           _other_lab_eval(tmp_path, paths[1], 0.50, 0.60, 'e1'),
           _other_lab_eval(tmp_path, paths[2], 0.30, 0.70, 'e2')]
  args = paths + [a for e in evals for a in ('--other-lab', e)]
  assert results.main(args) == 0
  out = capsys.readouterr().out.strip().split('\n\n')[-1].splitlines()
  assert out[0].startswith('| config | PBC test accuracy % | other lab | images | accuracy, '
                           'predicted over all classes % |')
  assert out[2] == ('| cnn | 91.00 ± 1.41 | chula_wbc | 511 | 45.00 ± 7.07 (8) | '
                    '55.00 ± 7.07 (5) | 44.00 ± 7.07 / 54.00 ± 7.07 | f, g, h | 2 |')
  assert out[3] == ('| attn | 95.00 | chula_wbc | 511 | 30.00 (8) | 70.00 (5) | '
                    '29.00 / 69.00 | f, g, h | 1 |')


def test_an_other_lab_eval_of_a_run_not_given_is_a_one_line_error(tmp_path, capsys):
  run = _run(tmp_path, 'cnn', 0, 0.9)
  stray = _other_lab_eval(tmp_path, str(tmp_path / 'elsewhere'), 0.4, 0.5)
  assert results.main([run, '--other-lab', stray]) == 2
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'not among the runs given' in err
  assert results.main([run, '--other-lab', str(tmp_path / 'missing')]) == 2
  assert 'no other-lab metrics at' in capsys.readouterr().err
