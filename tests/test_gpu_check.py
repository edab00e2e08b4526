"""benchmarks/gpu_check.py in its small form: the GPU loan's one command works before a GPU is at hand.

``--tiny`` runs every part (a packed file made without TensorFlow, a whole
training run through the trainer on the device path, the throughput rows,
the PyTorch peer where PyTorch is installed) on tiny data on the CPU, and
writes the JSON and markdown the full form writes.
"""

import json

import pytest

from benchmarks import gpu_check, throughput


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp('gpu_check')
  result = gpu_check.main(['--tiny', '--out', str(out)])
  return out, result


@pytest.mark.slow  # About 45 s on a loaded 2-core CPU: the compiles of a run and a row.
def test_tiny_gpu_check_writes_the_run_and_the_table(report):
  out, result = report
  saved = json.loads((out / 'results.json').read_text())
  assert saved['train']['epochs'] == 2 and len(saved['train']['epoch_seconds']) == 2
  assert saved['train']['wall_s'] > sum(saved['train']['epoch_seconds'])
  phases = saved['train']['phases_s']  # The trainer's wall_time.json, inside gpu_check's wall.
  assert 0 < phases['compile'] and phases['total'] <= saved['train']['wall_s']
  assert saved['train']['e2e_over_step'] > 0
  assert 'device' in saved['train']['input']
  rows = saved['table']['results']
  assert [(r['model'], r['dtype']) for r in rows] == [('cnn', 'float32')]
  for row in rows:
    assert ('torch' in row) == throughput.have_torch()  # Skipped cleanly without PyTorch.
  text = (out / 'results.md').read_text()
  assert 'e2e/step' in text and '| cnn 32px' in text and 'wall time' in text
  assert result['total_s'] > 0


def test_the_table_skips_rows_past_the_budget(tmp_path):
  result = gpu_check.main(['--tiny', '--out', str(tmp_path), '--skip', 'train',
                           '--budget_s', '0'])
  assert result['table']['results'] == []
  assert result['table']['skipped'] == ['cnn float32 batch 4']
  assert 'Skipped (time budget)' in (tmp_path / 'results.md').read_text()
