"""launch.py: summary tables and one-line errors for user mistakes."""

import subprocess
import sys

import pytest

from bcjax import summary
from conftest import ROOT
from configs import cnn, cnn_lstm


def _launch(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, 'launch.py', *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)


def test_cnn_summary_is_table1():
  text = summary.format_summary(cnn.get_config())
  assert text.splitlines()[-1] == 'params: 822,792  batch_stats: 0  total: 822,792'
  assert '(None, 12544)' in text  # Flatten.
  for row in ('conv1', 'pool1', 'conv2', 'pool2', 'flatten', 'dense1', 'logits'):
    assert row in text


def test_cnn_lstm_summary_groups_extractor_and_head():
  text = summary.format_summary(cnn_lstm.get_config())
  lines = text.splitlines()
  assert 'head params: 159,648  batch_stats: 384  total: 160,032' in lines
  assert any(l.startswith('extractor params: ') for l in lines)
  assert lines[-1].startswith('params: ')
  assert '(None, 49, 64)' in text  # The extractor's 7x7x64 map as a sequence.
  assert '(None, 10, 128)' in text
  assert '(None, 50)' in text


@pytest.mark.parametrize('config_module', [cnn, cnn_lstm], ids=['cnn', 'cnn_lstm'])
def test_readme_layer_tables_are_what_summary_prints(config_module):
  """docs/models.md shows each paper model's --mode=summary table verbatim; this keeps it so."""
  text = summary.format_summary(config_module.get_config()).rstrip('\n')
  readme = (ROOT / 'docs' / 'models.md').read_text()
  assert '```\n' + text + '\n```' in readme


def test_launch_summary_mode():
  result = _launch('--config', 'configs/cnn_lstm.py', '--mode=summary')
  assert result.returncode == 0, result.stderr
  assert 'head params: 159,648  batch_stats: 384  total: 160,032' in result.stdout


@pytest.mark.parametrize('args,message', [
    (['--config', 'configs/cnn.py', '--config.batch_sise=3'],
     "error: unknown config field 'batch_sise' (did you mean 'batch_size'?)"),
    (['--config', 'configs/missing.py'], 'error: config file not found: configs/missing.py'),
    (['--config', 'configs/cnn.py:huge'], "error: unknown variant 'huge' of configs/cnn.py"),
    (['--config', 'configs/cnn.py', '--config.model.name=vgg'],
     "error: unknown model 'vgg'; known models: cnn, cnn_attention, cnn_lstm"),
    (['--config', 'configs/cnn.py', '--mode=train'], 'error: --mode=train needs --workdir'),
])
def test_user_mistakes_are_one_line_errors(args, message):
  result = _launch(*args, *([] if any('--mode' in a for a in args) else ['--mode=summary']))
  assert result.returncode == 2
  lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1 and lines[0].startswith(message), result.stderr
  assert 'Traceback' not in result.stderr
