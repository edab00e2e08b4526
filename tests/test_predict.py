"""``predict_files``: a CSV row per image, errors in their row, the run goes on."""

import csv

import numpy as np
import pytest
from PIL import Image

from bcjax import predict, train
from bcjax.errors import UserError


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  from configs import cnn
  config = cnn.get_config('tiny')
  workdir = str(tmp_path_factory.mktemp('run'))
  train.train_and_evaluate(config, workdir)
  return config, workdir


def _images(root, n):
  (root / 'sub').mkdir(parents=True)
  rng = np.random.default_rng(0)
  for i in range(n):
    Image.fromarray(rng.integers(0, 255, (40, 44, 3), np.uint8)).save(root / 'sub' / f'{i}.png')
  (root / 'broken.jpg').write_bytes(b'not a jpeg')
  (root / 'notes.txt').write_text('ignored: not an image name')
  (root / '._0.png').write_bytes(b'macOS metadata')


def test_predict_folder_and_files(trained, tmp_path):
  config, workdir = trained
  config = config.copy_and_resolve_references()
  config.eval_batch_size = 4  # 5 readable images: one full batch and a padded one.
  _images(tmp_path / 'imgs', 5)
  missing = str(tmp_path / 'missing.png')
  out = predict.predict_files(config, workdir, [str(tmp_path / 'imgs'), missing],
                              out_csv=str(tmp_path / 'out' / 'pred.csv'))
  with open(out) as f:
    rows = list(csv.DictReader(f))
  from bcjax import data
  assert [k for k in rows[0] if k.startswith('p_')] == [f'p_{c}' for c in data.CLASS_NAMES]
  assert len(rows) == 7  # 5 images, the broken one, the missing one.
  by_path = {r['path']: r for r in rows}
  assert by_path[missing]['error'] and not by_path[missing]['predicted_class']
  assert by_path[str(tmp_path / 'imgs' / 'broken.jpg')]['error']
  good = [r for r in rows if not r['error']]
  assert len(good) == 5
  for r in good:
    p = np.array([float(r[f'p_{c}']) for c in data.CLASS_NAMES])
    assert abs(p.sum() - 1) < 1e-4
    assert r['predicted_class'] == data.CLASS_NAMES[int(p.argmax())]


def test_predict_matches_eval_pipeline(trained, tmp_path):
  # A single file predicted alone and inside a batch gives the same numbers.
  config, workdir = trained
  _images(tmp_path / 'imgs', 3)
  one = str(tmp_path / 'imgs' / 'sub' / '1.png')
  a = predict.predict_files(config, workdir, [one], out_csv=str(tmp_path / 'a.csv'))
  b = predict.predict_files(config, workdir, [str(tmp_path / 'imgs')],
                            out_csv=str(tmp_path / 'b.csv'))
  with open(a) as fa, open(b) as fb:
    ra = list(csv.DictReader(fa))[0]
    rb = {r['path']: r for r in csv.DictReader(fb)}[one]
  assert ra == rb


def test_empty_folder_is_user_error(trained, tmp_path):
  config, workdir = trained
  (tmp_path / 'empty').mkdir()
  with pytest.raises(UserError, match='no image files'):
    predict.predict_files(config, workdir, [str(tmp_path / 'empty')],
                          out_csv=str(tmp_path / 'p.csv'))
