"""Saliency maps (bcjax/explain.py): each method against what it must equal, and --mode=explain."""

import importlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax import explain, models
from bcjax.models import layers


class GapModel(nn.Module):
  """Conv -> ReLU -> global average pool -> Dense: the model CAM was defined for."""
  num_classes: int = 3

  @nn.compact
  def __call__(self, x, *, train=False):
    x = nn.relu(nn.Conv(6, (3, 3), strides=(2, 2))(x))
    seq = layers.RasterSequence()(x)  # Where Grad-CAM reads the map.
    return nn.Dense(self.num_classes, name='classifier')(seq.mean(axis=1))


class OnePatch(nn.Module):
  """A logit that depends only on the mean brightness of one cell of the 7x7 grid."""
  patch: int

  @nn.compact
  def __call__(self, x, *, train=False):
    n, h, w, c = x.shape
    cells = x.reshape(n, 7, h // 7, 7, w // 7, c).mean(axis=(2, 4))
    seq = layers.RasterSequence()(cells)
    logit = 20.0 * (seq[:, self.patch].mean(-1) - 0.6)
    return jnp.stack([logit, -logit], axis=-1)


def _tiny(name, seed=0):
  """A registered model (tiny config, XLA's own lowering) with random variables.

  Shapes from ``jax.eval_shape``, values drawn here: compiling each model's
  initialiser would take much of this file's time on a small CPU.
  """
  config = explain.explain_config(importlib.import_module(f'configs.{name}').get_config('tiny'))
  model = models.build_model(config)
  x = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  rng = np.random.default_rng(seed)

  def fill(path, a):
    if str(path[-1]) == "['var']":
      return np.ones(a.shape, np.float32)
    fan_in = np.prod(a.shape[:-1]) if len(a.shape) >= 2 else 100.0
    return rng.normal(0, 1 / np.sqrt(fan_in), a.shape).astype(np.float32)
  return config, model, jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.mark.slow
def test_grad_cam_is_cam_on_a_global_average_pool_model():
  model = GapModel()
  images = jax.random.uniform(jax.random.key(1), (4, 14, 14, 3))
  variables = model.init(jax.random.key(0), images)
  classes = jnp.array([0, 1, 2, 1])
  cam_grad = jax.jit(lambda v, x, c: explain.grad_cam(model, v, x, c))(variables, images, classes)
  # CAM (Zhou et al.): the class's classifier weights over the feature map. Grad-CAM's
  # weights are those divided by h * w, the pooling's own constant.
  fmap = nn.relu(nn.Conv(6, (3, 3), strides=(2, 2)).apply(
      {'params': variables['params']['Conv_0']}, images))
  w = variables['params']['classifier']['kernel'][:, classes].T  # (N, K)
  h, wd = fmap.shape[1:3]
  cam = jax.nn.relu(jnp.einsum('nhwk,nk->nhw', fmap, w)) / (h * wd)
  assert cam_grad.shape == (4, h, wd)
  np.testing.assert_allclose(cam_grad, cam, rtol=1e-6, atol=1e-7)
  assert float(cam.max()) > 0


@pytest.mark.slow
def test_integrated_gradients_completeness_at_128_steps():
  _, model, variables = _tiny('cnn')
  images = jax.random.uniform(jax.random.key(2), (2, 32, 32, 3))
  baseline = explain.baseline_of(images)
  logits = model.apply(variables, images, train=False)
  classes = logits.argmax(-1)
  attr = jax.jit(lambda v, x, c, b: explain.integrated_gradients(model, v, x, c, b, steps=128))(
      variables, images, classes, baseline)
  want = (logits - model.apply(variables, baseline, train=False))[jnp.arange(2), classes]
  got = attr.sum(axis=(1, 2, 3))
  assert np.all(np.abs(np.asarray(want)) > 1e-3)
  np.testing.assert_allclose(got, want, rtol=0.02)


def test_smoothgrad_without_noise_is_the_gradient():
  model = GapModel()  # Small: this test is about SmoothGrad, not the models.
  images = jax.random.uniform(jax.random.key(3), (2, 14, 14, 3))
  variables = model.init(jax.random.key(0), images)
  classes = jnp.array([1, 2])
  grad = jax.jit(lambda v, x, c: explain.input_gradients(model, v, x, c))(
      variables, images, classes)
  smooth = jax.jit(lambda v, x, c, k, sigma: explain.smoothgrad(
      model, v, x, c, k, samples=8, sigma=sigma))
  np.testing.assert_allclose(smooth(variables, images, classes, jax.random.key(0), 0.0), grad,
                             rtol=1e-6, atol=1e-9)
  noisy = smooth(variables, images, classes, jax.random.key(0), 0.15)
  assert not np.allclose(noisy, grad)
  again = smooth(variables, images, classes, jax.random.key(0), 0.15)
  np.testing.assert_array_equal(noisy, again)  # An explicit key: the same noise.


def test_attention_rollout_rows_sum_to_one():
  config, model, variables = _tiny('cnn_attention')
  images = jax.random.uniform(jax.random.key(4), (3, 28, 28, 3))
  weights = jax.jit(lambda v, x: explain.attention_weights(model, v, x))(variables, images)
  assert [w.shape[-2:] for w in weights] == [(49, 49), (49, 49), (1, 49)]  # 2 blocks + pool.
  r, flat = explain.rollout(weights)
  np.testing.assert_allclose(r.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(flat.sum(-1), 1.0, atol=1e-5)
  assert not np.allclose(flat, 1 / 49)  # Not uniform: the weights mattered.
  maps = jax.eval_shape(lambda v, x: explain.attention_rollout(model, v, x), variables, images)
  assert maps.shape == (3, 7, 7)
  assert 'rollout' in explain.available_methods(model, variables, 28)
  _, cnn, cnn_variables = _tiny('cnn')
  assert 'rollout' not in explain.available_methods(cnn, cnn_variables, 32)


def test_known_patch_ranks_first_and_beats_random_deletion():
  patch = 23
  model, variables = OnePatch(patch), {}
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 0.5, (2, 28, 28, 3)).astype(np.float32)
  cell = explain._cell_of_pixel(28, 7) == patch
  images[:, cell] = 1.0  # The patch is bright: the class-0 logit is high.
  out = explain.explain(model, variables, images, jax.random.key(0),
                        methods=('gradcam', 'integrated_gradients', 'smoothgrad'))
  assert list(out.classes) == [0, 0] and out.probs[:, 0].min() > 0.99
  for method in ('gradcam', 'integrated_gradients', 'smoothgrad'):
    scores = explain.cell_scores(jnp.asarray(out.maps[method]))
    assert list(np.asarray(scores).argmax(-1)) == [patch, patch], method
    deletion = explain.auc(out.deletion[method])
    assert np.all(deletion < explain.auc(out.deletion['random'])), method
    assert np.all(explain.auc(out.insertion[method]) > explain.auc(out.insertion['random']))
    assert out.deletion[method][0, 1] < 0.01  # Gone after the first cell.


def test_auc_and_cells():
  assert explain.auc(np.array([1.0, 1.0, 1.0])) == pytest.approx(1.0)
  assert explain.auc(np.array([1.0, 0.0, 0.0])) == pytest.approx(0.25)
  idx = explain._cell_of_pixel(64, 7)  # Not a multiple of 7: cells of 9 or 10 pixels.
  assert idx.shape == (64, 64) and set(np.unique(idx)) == set(range(49))
  ranks = explain.ranks_of(jnp.array([[0.1, 0.9, 0.5]]))
  assert ranks.tolist() == [[2, 0, 1]]


def test_explain_workdir_on_a_labelled_folder(tmp_path, capsys):
  """--mode=explain end to end: a checkpoint, a class-named folder, PNGs, JSON, the table."""
  import optax
  from PIL import Image
  from bcjax import checkpointing, train_state
  from bcjax.errors import UserError
  config, _, variables = _tiny('cnn')
  names = ['basophil', 'eosinophil', 'erythroblast', 'ig', 'lymphocyte', 'monocyte',
           'neutrophil', 'platelet']
  state = train_state.TrainState.create(apply_fn=None, params=variables['params'],
                                        tx=optax.identity(), batch_stats={})
  ckpts = checkpointing.Checkpoints(str(tmp_path / 'run'))
  ckpts.save('best', 3, state, {'class_names': names})
  ckpts.close()
  rng = np.random.default_rng(0)
  for folder in ('MONOCYTES', 'unlabelled'):
    (tmp_path / 'cells' / folder).mkdir(parents=True)
    for i in range(2):
      Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(
          tmp_path / 'cells' / folder / f'{i}.png')
  (tmp_path / 'cells' / 'MONOCYTES' / 'broken.jpg').write_bytes(b'not an image')
  out = tmp_path / 'explain'
  result = explain.explain_workdir(config, str(tmp_path / 'run'), [str(tmp_path / 'cells')],
                                   str(out), methods=('gradcam',), batch_size=4)
  printed = capsys.readouterr().out
  assert 'skipped: cannot read image' in printed and 'deletion AUC' in printed
  assert result['images'] == 4 and result['checkpoint_step'] == 3
  assert result['conv_impl'] in ('matmul', 'native')  # Never the oneDNN FFI kernels.
  records = result['per_image']
  assert [r['true_class'] for r in records] == ['monocyte', 'monocyte', '', '']
  assert result['absent_classes'] == [n for n in names if n != 'monocyte']
  assert 'classes with no labelled image here: basophil, eosinophil, erythroblast' in printed
  assert all(r['predicted_class'] in names for r in records)
  assert set(records[0]['auc']) == {'gradcam', 'random'}
  assert len(result['mean_curves']['gradcam']['deletion']) == explain.GRID ** 2 + 1
  with open(out / 'faithfulness.json') as f:
    assert json.load(f)['mean_auc'] == result['mean_auc']
  assert len(os.listdir(out / 'images')) == 4
  for name in ('faithfulness.png', 'examples.png'):
    assert os.path.getsize(out / name) > 0
  # Without image paths: the first images of config.data.split (labelled; synthetic here).
  split = explain.explain_workdir(config, str(tmp_path / 'run'), [], str(tmp_path / 'split'),
                                  methods=('gradcam',), batch_size=4, max_images=5)
  assert split['images'] == 5 and 'the test split' in split['source']
  assert all(r['true_class'] in names for r in split['per_image'])
  # Another lab's folder as the split 'all': its class folders only (the unlabelled one out).
  import shutil
  shutil.rmtree(tmp_path / 'cells' / 'unlabelled')
  lab = config.copy_and_resolve_references()
  lab.data.split, lab.data.path = 'all', str(tmp_path / 'cells')
  other = explain.explain_workdir(lab, str(tmp_path / 'run'), [], str(tmp_path / 'lab'),
                                  methods=('gradcam',), batch_size=4)
  assert other['images'] == 2 and [r['true_class'] for r in other['per_image']] == \
      ['monocyte', 'monocyte']
  with pytest.raises(UserError, match="usable: gradcam, integrated_gradients, smoothgrad$"):
    explain.explain_workdir(config, str(tmp_path / 'run'), [str(tmp_path / 'cells')],
                            str(out), methods=('rollout',))
