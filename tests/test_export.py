"""--mode=export: a jax.export artifact of every registered model, run without flax or bcjax."""

import importlib
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bcjax import export, models

LOADER = os.path.join(os.path.dirname(export.__file__), 'export_loader_example.py')
BATCHES = (1, 3)

# Runs in a fresh interpreter where importing flax or bcjax fails outright.
_STANDALONE = r'''
import importlib.util, sys
sys.modules['flax'] = None
sys.modules['bcjax'] = None
spec = importlib.util.spec_from_file_location('loader', sys.argv[1])
loader = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loader)
import numpy as np
inputs = np.load(sys.argv[2])
out = {}
for name in sys.argv[3:]:
  directory, key = name.split('=')
  forward, meta = loader.load(directory)
  for b in (1, 3):
    out[f'{key}_{b}'] = np.asarray(forward(inputs[f'{key}_{b}']))
  out[f'{key}_classes'] = np.array(meta['class_names'])
np.savez(sys.argv[2].replace('.npz', '_out.npz'), **out)
leaked = sorted(m for m, v in sys.modules.items()
                if v is not None and m.split('.')[0] in ('flax', 'bcjax'))
print('LEAKED', leaked)
'''


def _config(name):
  return importlib.import_module(f'configs.{name}').get_config('tiny')


def _variables(config, seed):
  """Random variables of the model's shapes (BatchNorm variances positive).

  Shapes from ``jax.eval_shape``: compiling each model's initialiser would
  take most of this file's time on a small CPU.
  """
  model = models.build_model(export.export_config(config))
  x = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), np.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  rng = np.random.default_rng(seed)

  def fill(path, a):
    name = str(path[-1])
    if name == "['var']":
      value = rng.uniform(0.5, 2.0, a.shape)
    elif len(a.shape) >= 2:  # Kernels: fan-in scaled, so the logits stay O(1).
      value = rng.normal(0, 1 / np.sqrt(np.prod(a.shape[:-1])), a.shape)
    else:
      value = (name == "['scale']") + rng.normal(0, 0.1, a.shape)
    return value.astype(np.float32)
  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """Every registered model, exported from its tiny config into its own directory."""
  root = tmp_path_factory.mktemp('export')
  out = {}
  for seed, name in enumerate(sorted(models.MODELS)):
    config = _config(name)
    variables = _variables(config, seed)
    exp = export.export_forward(config, variables)
    meta = export.metadata(config, [f'class{i}' for i in range(config.num_classes)],
                           checkpoint='init', step=0, exported=exp)
    export.write(str(root / name), exp, meta)
    out[name] = (config, variables, exp, str(root / name))
  return root, out


def test_every_registered_model_has_a_tiny_config():
  for name in models.MODELS:
    assert _config(name).model.name == name


def test_exported_module_has_no_custom_calls(exported):
  _, out = exported
  for name, (_, _, exp, directory) in out.items():
    # jax.export's own `b >= 1` check of the symbolic batch is the only one.
    assert export.custom_call_targets(exp) <= {'shape_assertion'}, name
    assert exp.platforms == ('cpu', 'cuda')
    assert 'b' in str(exp.in_avals[0].shape[0])  # Symbolic batch.
    with open(os.path.join(directory, 'model.json')) as f:
      meta = json.load(f)
    assert meta['image_size'] == out[name][0].image_size
    assert meta['checkpoint_step'] == 0 and meta['platforms'] == ['cpu', 'cuda']
    assert meta['input']['scaling'].startswith('pixel / 255')


@pytest.mark.slow
def test_standalone_loader_matches_model_apply(exported, tmp_path):
  """Deserialized where flax and bcjax cannot be imported: model.apply's logits within 1e-5."""
  _, out = exported
  rng = np.random.default_rng(0)
  inputs = {}
  for name, (config, *_rest) in out.items():
    s = config.image_size
    for b in BATCHES:
      inputs[f'{name}_{b}'] = rng.uniform(0, 1, (b, s, s, 3)).astype(np.float32)
  path = str(tmp_path / 'inputs.npz')
  np.savez(path, **inputs)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-c', _STANDALONE, LOADER, path,
       *[f'{d}={n}' for n, (_, _, _, d) in out.items()]],
      cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'LEAKED []' in result.stdout
  got = np.load(str(tmp_path / 'inputs_out.npz'))
  for name, (config, variables, _, _) in out.items():
    native = models.build_model(export.export_config(config))
    apply = jax.jit(lambda v, x, model=native: model.apply(v, x, train=False))
    for b in BATCHES:
      want = np.asarray(apply(variables, inputs[f'{name}_{b}']))
      assert got[f'{name}_{b}'].shape == (b, config.num_classes)
      np.testing.assert_allclose(got[f'{name}_{b}'], want, atol=1e-5, rtol=0, err_msg=name)
    # And what --mode=eval computes (conv_impl='auto': oneDNN's kernels on CPU where
    # they build): the same function, other round-off.
    default = models.build_model(config)
    np.testing.assert_allclose(
        got[f'{name}_3'], np.asarray(default.apply(variables, inputs[f'{name}_3'], train=False)),
        atol=1e-4, rtol=0, err_msg=name)
    assert list(got[f'{name}_classes']) == [f'class{i}' for i in range(config.num_classes)]


def test_loader_reads_image_files_like_the_pipeline(exported, tmp_path):
  from PIL import Image
  from bcjax import data
  loader = importlib.import_module('bcjax.export_loader_example')
  rng = np.random.default_rng(1)
  # A smooth image (cells are): the two resizers agree to about a grey level.
  yy, xx = np.mgrid[0:90, 0:120]
  image = np.stack([127 + 100 * np.sin(xx / 9 + c) * np.cos(yy / 13) for c in range(3)], -1)
  image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
  Image.fromarray(image).save(tmp_path / 'cell.png')
  ours = loader.read_image(str(tmp_path / 'cell.png'), 32)
  pipeline = data.preprocess(data.read_image(str(tmp_path / 'cell.png')), 32)
  assert ours.shape == pipeline.shape == (32, 32, 3) and ours.dtype == np.float32
  assert np.abs(ours - pipeline).max() <= 2 / 255


def test_export_workdir_end_to_end(tmp_path, capsys):
  """From a workdir's best checkpoint (saved here directly: training adds nothing to test)."""
  import optax
  from bcjax import checkpointing, train_state
  from bcjax.errors import UserError
  config = _config('cnn')
  workdir = str(tmp_path / 'run')
  variables = _variables(config, 0)
  state = train_state.TrainState.create(apply_fn=None, params=variables['params'],
                                        tx=optax.identity(), batch_stats={})
  names = [f'cell{i}' for i in range(8)]
  ckpts = checkpointing.Checkpoints(workdir)
  ckpts.save('best', 7, state, {'class_names': names})
  ckpts.close()
  meta = export.export_workdir(config, workdir, str(tmp_path / 'exp'))
  assert meta['checkpoint'] == 'best' and meta['checkpoint_step'] == 7
  assert meta['config_name'] == 'cnn:tiny' and meta['class_names'] == names
  assert 'exported the best checkpoint' in capsys.readouterr().out
  forward, loaded = importlib.import_module('bcjax.export_loader_example').load(
      str(tmp_path / 'exp'))
  assert loaded == meta
  x = np.zeros((2, 32, 32, 3), np.float32)
  assert np.asarray(forward(x)).shape == (2, 8)
  with pytest.raises(UserError, match='needs --out'):
    export.export_workdir(config, workdir, '')
