"""Adapting a trained model to a new lab (bcjax/adapt.py): tiny models, synthetic images.

The source workdirs are written from freshly initialised variables (no
training), so every test takes seconds.
"""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from bcjax import adapt, checkpointing, evaluate, models, train_state
from bcjax.errors import UserError
from configs import cnn_lstm

import data_fixtures


def _config(**adapt_fields):
  c = cnn_lstm.get_config('tiny')
  c.data.augment.flips = c.data.augment.rot90 = True
  for k, v in adapt_fields.items():
    c.adapt[k] = v
  return c


def _pixels(n=10, size=28, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _source_workdir(path, config) -> str:
  """A workdir as training leaves it: config.json and a best checkpoint."""
  variables = train_state.init_variables(config, jax.random.key(0))
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort())
  ckpts = checkpointing.Checkpoints(path)
  ckpts.save('best', 7, {'params': variables['params'], 'batch_stats': variables['batch_stats'],
                         'step': np.asarray(7)}, {'history': [], 'class_names': None})
  ckpts.close()
  return str(path)


def _flat(tree):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_adabn_statistics_are_the_exact_moments_of_each_norm_input():
  config = _config()
  model = models.build_model(config)
  variables = train_state.init_variables(config, jax.random.key(0))
  pixels = _pixels(10)
  # Batches of 4: two full ones and a padded one, combined across batches.
  adapted = adapt.adabn(model, variables, pixels, batch_size=4)
  _, inter = model.apply(adapted, pixels.astype(np.float32) / 255, train=False,
                         capture_intermediates=True, mutable=['intermediates'])
  inter = inter['intermediates']
  # Each BatchNorm's input is the output of the convolution before it (the
  # extractor's fused BatchNormReluPool and the head's flax BatchNorm).
  pairs = [('extractor', 'bn1', 'conv1'), ('extractor', 'bn2', 'conv2'),
           ('head', 'bn1', 'conv1d_1'), ('head', 'bn2', 'conv1d_2')]
  for part, bn, conv in pairs:
    h = np.asarray(inter[part][conv]['__call__'][0], np.float64)
    axes = tuple(range(h.ndim - 1))
    stats = adapted['batch_stats'][part][bn]
    np.testing.assert_allclose(stats['mean'], h.mean(axes), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats['var'], h.var(axes), rtol=1e-4, atol=1e-6)
  # Only the statistics change.
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables['params']),
                                                  jax.tree.leaves(adapted['params'])))


def test_tent_lowers_the_entropy_and_changes_only_norm_scale_and_shift():
  config = _config(method='tent', tent_steps=8, tent_learning_rate=0.05, batch_size=8)
  model = models.build_model(config)
  variables = train_state.init_variables(config, jax.random.key(1))
  pixels = _pixels(16, seed=1)

  def entropy(v):
    return float(adapt.mean_entropy(model.apply(v, pixels.astype(np.float32) / 255,
                                                train=False)))

  start = adapt.adabn(model, variables, pixels)
  adapted = adapt.adapt_variables(config, variables, unlabelled=pixels, say=lambda _: None)
  assert entropy(adapted) < entropy(start)
  before, after = _flat(variables['params']), _flat(adapted['params'])
  changed = {k for k in before if not np.array_equal(before[k], after[k])}
  assert changed, 'TENT changed nothing'
  assert all(k.endswith(("['scale']", "['bias']")) for k in changed), changed
  assert not any("conv" in k or "lstm" in k or "logits" in k for k in changed), changed


def test_finetune_of_the_head_leaves_the_extractor_unchanged():
  config = _config(method='finetune', trainable='head', steps=3, finetune_batch_size=8,
                   adabn=False)
  variables = train_state.init_variables(config, jax.random.key(2))
  labelled = adapt.Images(_pixels(8, seed=2), [f'x{i}' for i in range(8)], ['0'] * 8,
                          np.arange(8, dtype=np.int32) % 5)
  adapted = adapt.adapt_variables(config, variables, unlabelled=labelled.pixels,
                                  labelled=labelled, say=lambda _: None)
  for a, b in zip(jax.tree.leaves(variables['params']['extractor']),
                  jax.tree.leaves(adapted['params']['extractor'])):
    np.testing.assert_array_equal(a, b)
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(variables['params']['head']), jax.tree.leaves(adapted['params']['head'])))


@pytest.fixture(scope='module')
def lab(tmp_path_factory):
  """A tiny source workdir and a lab: unlabelled images and a labelled folder of 3 classes."""
  root = tmp_path_factory.mktemp('adapt')
  config = _config()
  source = _source_workdir(str(root / 'source'), config)
  images = data_fixtures.make_pbc_folder(str(root / 'lab'), per_class=2, junk=False)
  labelled = root / 'labelled'
  for name in ('Basophil', 'lymphocyte', 'monocyte'):  # Any letter case, any subset.
    shutil.copytree(os.path.join(images, name.lower()), labelled / name)
  return config, source, images, str(labelled), root


def test_adapted_workdir_is_evaluated_like_a_trained_one(lab, tmp_path):
  config, source, images, _, _ = lab
  before = sorted(os.walk(source))
  config = config.copy_and_resolve_references()
  config.adapt.method, config.adapt.images = 'adabn', images
  out = str(tmp_path / 'adapted')
  record = adapt.adapt_workdir(config, source, out)
  assert sorted(os.walk(source)) == before  # The source is never changed.
  with open(os.path.join(out, 'config.json')) as f:
    recorded = json.load(f)['adaptation']
  assert recorded == json.loads(json.dumps(record))
  with open(os.path.join(out, 'config.json')) as f:
    whole = json.load(f)
  source_name = json.load(open(os.path.join(source, 'config.json'))).get('name', config.name)
  assert whole['name'] == f'{source_name}+adabn'  # Results label it by its source run.
  assert recorded['source_workdir'] == os.path.abspath(source)
  assert recorded['source_checkpoint'] == {'kind': 'best', 'step': 7}
  assert recorded['method'] == 'adabn' and recorded['adabn']
  assert recorded['unlabelled_images']['count'] == 16 and 'labelled_images' not in recorded
  assert len(recorded['unlabelled_images']['sha256']) == 64
  eval_config = config.copy_and_resolve_references()
  eval_config.data.path, eval_config.data.split = images, 'all'
  m = evaluate.evaluate_workdir(eval_config, out, out_dir=str(tmp_path / 'report'))
  assert m['num_examples'] == 16 and m['checkpoint_step'] == 0
  assert m['config_name'] == f'{source_name}+adabn'


def test_labelled_folder_is_read_with_the_models_class_indices(lab):
  config, _, _, labelled, _ = lab
  found = adapt.read_labelled(labelled, config, train_state.trained_class_names({}))
  assert sorted(set(found.labels.tolist())) == [0, 4, 5]  # basophil, lymphocyte, monocyte
  assert len(found.paths) == 6 and found.pixels.shape == (6, 28, 28, 3)


def test_user_errors_are_one_line(lab, tmp_path):
  config, source, images, labelled, root = lab
  config = config.copy_and_resolve_references()
  config.adapt.method, config.adapt.images = 'finetune', images

  def fails(match, labelled_dir, out=None):
    config.adapt.labelled = str(labelled_dir)
    with pytest.raises(UserError, match=match) as e:
      adapt.adapt_workdir(config, source, out or str(tmp_path / 'out'))
    assert '\n' not in str(e.value)

  unknown = tmp_path / 'unknown'
  shutil.copytree(labelled, unknown)
  os.makedirs(unknown / 'blast')
  fails("does not know class 'blast'", unknown)

  unreadable = tmp_path / 'unreadable'
  shutil.copytree(labelled, unreadable)
  for name in os.listdir(unreadable / 'monocyte'):
    with open(unreadable / 'monocyte' / name, 'wb') as f:
      f.write(b'not an image')
  fails('monocyte has no readable image', unreadable)

  gray = tmp_path / 'gray'
  shutil.copytree(labelled, gray)
  Image.fromarray(_pixels(1, 40)[0, ..., 0]).save(gray / 'Basophil' / 'g.png')
  fails('grayscale image', gray)

  field = tmp_path / 'field'
  shutil.copytree(labelled, field)
  Image.fromarray(np.zeros((900, 1440, 3), np.uint8)).save(field / 'Basophil' / 'f.jpg')
  fails('is 1440x900 px', field)

  fails('is the source workdir itself', labelled, out=source)
