"""Smoke tests of the benchmarks: tiny sizes, JSON schema, every figure positive.

No assertion on speed: the benchmarks report figures, tests only check that
they are produced and well formed. The PyTorch peer's parts run where the
optional extra ``[bench]`` is installed and are skipped elsewhere.
"""

import importlib.util
import json
import numbers

import pytest

from bcjax.onednn.build import available as onednn_available
from benchmarks import throughput
from configs import cnn, cnn_lstm

pytestmark = pytest.mark.slow  # Compiles every model and lowering: `pytest -m slow`.

HAVE_TORCH = importlib.util.find_spec('torch') is not None
needs_torch = pytest.mark.skipif(not HAVE_TORCH,
                                 reason='the PyTorch peer needs the optional extra [bench]')

FIGURE_KEYS = {'images_per_s_per_device', 'images_per_s_total', 'flops_per_image',
               'achieved_flops_per_s'}


def _numbers(tree, path=''):
  """Every number in a JSON tree (bools and counts included) with its path."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _numbers(v, f'{path}.{k}')
  elif isinstance(tree, list):
    for i, v in enumerate(tree):
      yield from _numbers(v, f'{path}[{i}]')
  elif isinstance(tree, numbers.Number) and not isinstance(tree, bool):
    yield path, tree


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp('bench') / 'report.json'
  throughput.main(['--tiny', '--e2e', '--json', str(out)] + (['--peer', 'torch'] if HAVE_TORCH else []))
  with open(out) as f:
    return json.load(f)


def test_report_schema(report):
  env = report['environment']
  for key in ('device_kind', 'platform', 'device_count', 'jax', 'jaxlib', 'flax'):
    assert env[key], key
  assert {r['model'] for r in report['results']} == {'cnn', 'cnn_lstm'}
  for row in report['results']:
    assert set(row['wrappers']) == {'pmap', 'shard_map'}
    for entry in row['wrappers'].values():
      assert set(entry['compile_s']) == {'train', 'eval'}
      for phase in ('train', 'eval'):
        fig = entry[phase]
        assert FIGURE_KEYS <= set(fig), (row['model'], phase, fig.keys())
        assert set(fig['images_per_s_per_device']) >= {'median', 'min', 'max', 'repeats'}
        assert ('ratio_vs_torch' in fig) == HAVE_TORCH
        if 'fraction_of_peak' in fig:
          assert row['peak_source']
    if HAVE_TORCH:
      assert set(row['torch']) >= {'train', 'eval', 'threads', 'version'}
    assert set(row['e2e']) >= {'images_per_s', 'ratio_to_step_rate', 'starved'}


def test_every_figure_is_a_positive_number(report):
  figures = list(_numbers(report['results']))
  assert len(figures) > 50
  bad = [(p, v) for p, v in figures if not v > 0]
  assert not bad, bad


def test_markdown_table_has_ratio_column(report):
  table = throughput.markdown(report)
  assert 'bcjax / PyTorch' in table
  assert table.count('| train |') == 4 and table.count('| eval |') == 4


def test_microbatched_rows_count_the_whole_step_flops(report, tmp_path):
  out = tmp_path / 'mb.json'
  throughput.main(['--tiny', '--models', 'cnn', '--parallel', 'pmap', '--microbatch_size', '2',
                   '--json', str(out)])
  with open(out) as f:
    mb_report = json.load(f)
  (row,) = mb_report['results']
  assert row['microbatch_size'] == 2 and row['batch_size'] == 4
  assert all(v > 0 for _, v in _numbers(row))
  whole = next(r for r in report['results'] if r['model'] == 'cnn')
  # XLA's cost analysis counts a loop body once; the row counts the one-pass step.
  got = row['wrappers']['pmap']['train']['flops_per_image']
  want = whole['wrappers']['pmap']['train']['flops_per_image']
  assert abs(got / want - 1) < 0.05
  assert 'mb2' in throughput.markdown(mb_report)


@needs_torch
@pytest.mark.parametrize('module', [cnn, cnn_lstm])
@pytest.mark.parametrize('variant', ['', 'tiny'])
def test_torch_peer_has_the_flax_parameter_counts(module, variant):
  from benchmarks import torch_reference
  import jax
  import jax.numpy as jnp
  from bcjax import models
  config = module.get_config(variant)
  model = models.build_model(config)
  x = jnp.zeros((1, config.image_size, config.image_size, 3))
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  params, stats = torch_reference.check_param_counts(config, variables)
  if module is cnn and not variant:
    assert params == 822_792
  peer = torch_reference.build(config)
  images, _ = torch_reference.synthetic_batch(config, 2)
  assert tuple(peer(images).shape) == (2, config.num_classes)


def test_onednn_rows_count_the_flops_of_the_same_function_lowered_by_xla(report):
  """XLA's cost analysis sees no FLOPs inside FFI calls: rows count the matmul twin."""
  from bcjax.models import layers
  row = next(r for r in report['results'] if r['model'] == 'cnn')
  assert row['conv_impl'] == layers.resolve_impl('auto')
  config = throughput.make_config('cnn', 4, True, 'pmap')
  config.model.conv_impl = 'matmul'
  assert throughput.countable_twin(config) is None
  built = throughput.build_steps(config)
  for phase in ('train', 'eval'):
    want = built['flops_per_call'][phase] / built['per_device']
    got = row['wrappers']['pmap'][phase]['flops_per_image']
    assert abs(got / want - 1) < 1e-6, (phase, got, want)
  assert f"({row['conv_impl']})" in throughput.markdown(report)


def test_train_step_ab_times_every_variant():
  from benchmarks import train_step_ab
  rates = train_step_ab.main(['--tiny', '--no_peer', '--batch_size', '4', '--rounds', '2',
                              'bits', 'flax:dropout=flax', 'mb:microbatch=2', 'xla:conv=matmul'])
  assert set(rates) == {'bits', 'flax', 'mb', 'xla'}
  assert all(r['median'] > 0 and r['repeats'] == 2 for r in rates.values())
  with pytest.raises(SystemExit, match='bad variant'):
    train_step_ab.parse_variant('x:microbatch')
  with pytest.raises(SystemExit, match='conv is one of'):
    train_step_ab.parse_variant('x:conv=winograd')


def test_conv_layers_finds_every_conv_and_times_each_lowering(tmp_path):
  from benchmarks import conv_layers
  calls = conv_layers.conv_calls(cnn_lstm.get_config())
  assert [c['name'] for c in calls] == [f'extractor/conv{i}' for i in range(1, 6)] + [
      'head/conv1d_1', 'head/conv1d_2']
  assert calls[0]['input'] == (1, 224, 224, 3) and calls[-1]['input'] == (1, 23, 64)
  out = tmp_path / 'conv.json'
  impls = ['matmul'] + (['onednn'] if onednn_available() else [])
  report = conv_layers.main(['--tiny', '--no_peer', '--batch_size', '2', '--repeats', '1',
                             '--impls', ','.join(impls), '--json', str(out)])
  assert json.loads(out.read_text())['layers'] == json.loads(json.dumps(report['layers']))
  assert len(report['layers']) == 4  # The tiny hybrid: two 2-D and two 1-D convolutions.
  for layer in report['layers']:
    for phase in ('forward', 'forward+backward'):
      assert set(layer['ms'][phase]) == set(impls)
      assert all(v > 0 for v in layer['ms'][phase].values())
  with pytest.raises(SystemExit, match='unknown --impls'):
    conv_layers.main(['--tiny', '--impls', 'winograd'])


@needs_torch
@pytest.mark.slow  # torch.compile generates and compiles C++: about a minute per shape on a CPU.
def test_torch_compile_peer_reports_its_compile_time_and_the_faster_peer(tmp_path):
  out = tmp_path / 'tc.json'
  throughput.main(['--tiny', '--models', 'cnn', '--parallel', 'shard_map',
                   '--peer', 'torch,torch_compile', '--json', str(out)])
  (row,) = json.loads(out.read_text())['results']
  assert set(row['torch_compile']['compile_s']) == {'train', 'eval'}
  for phase in ('train', 'eval'):
    fig = row['wrappers']['shard_map'][phase]
    faster = max(('torch', 'torch_compile'), key=lambda x: row[x][phase]['images_per_s']['median'])
    assert fig['faster_peer'] == faster
    assert fig['ratio_vs_faster_peer'] == fig[f'ratio_vs_{faster}']
  assert 'bcjax / torch.compile' in throughput.markdown(json.loads(out.read_text()))


def test_e2e_names_its_input_path_and_labels_synthetic_data(report):
  for row in report['results']:
    (run,) = row['e2e']['runs']
    assert run['path'] in ('device', 'stream') and run['input'].startswith('input: ')
    assert len(run['epochs']) == 2 and run['first_epoch_ratio'] > 0
  assert '(not real data)' in throughput.markdown(report)


def test_e2e_on_real_data_needs_a_path_and_unknown_peers_are_named():
  with pytest.raises(SystemExit):
    throughput.main(['--tiny', '--e2e', '--e2e_source', 'pbc'])
  with pytest.raises(SystemExit):
    throughput.main(['--tiny', '--peer', 'tensorflow'])
