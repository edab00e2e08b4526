"""Every config file and variant loads and passes the config checks; best.py keeps its promises."""

import pytest

from bcjax import config_checks
from configs import best, cnn, cnn_attention, cnn_lstm, robust

VARIANTS = [(cnn, v) for v in ('', 'tiny')] + [
    (m, v) for m in (cnn_lstm, cnn_attention) for v in ('', 'cpu', 'tiny')] + [
    (best, v) for v in best.VARIANTS] + [(robust, v) for v in robust.VARIANTS]


@pytest.mark.parametrize('module,variant', VARIANTS,
                         ids=[f'{m.__name__}:{v}' for m, v in VARIANTS])
def test_every_variant_loads_and_checks(module, variant):
  config_checks.check(module.get_config(variant))


def test_best_is_the_recipe_on_its_models():
  recipe = {'data.augment.flips': True, 'data.augment.rot90': True, 'data.augment.stain': 0.0,
            'optimizer.name': 'adamw', 'schedule.name': 'warmup_cosine',
            'label_smoothing': 0.1, 'ema_decay': 0.99}

  def field(c, dotted):
    for part in dotted.split('.'):
      c = c[part]
    return c

  for variant in best.VARIANTS:
    c = best.get_config(variant)
    assert {k: field(c, k) for k in recipe} == recipe, variant
  # The hybrid variants are the paper's Table 2 network, at the paper's and the CPU size.
  for variant, paper in (('hybrid', cnn_lstm.get_config()),
                         ('hybrid_cpu', cnn_lstm.get_config('cpu'))):
    c = best.get_config(variant)
    assert c.model.to_dict() == paper.model.to_dict() and c.image_size == paper.image_size
    assert c.num_epochs == paper.num_epochs
  assert best.get_config('').model.to_dict() == cnn_attention.get_config().model.to_dict()
  assert best.get_config('cpu').image_size == 112
  with pytest.raises(ValueError, match="unknown variant 'huge' of configs/best.py"):
    best.get_config('huge')


def test_robust_is_best_plus_lab_to_lab_training():
  """robust.py changes only the augmentation and normalisation fields of best.py's variant."""
  for variant, base in (('', 'hybrid'), ('cpu', 'hybrid_cpu')):
    r, b = robust.get_config(variant).to_dict(), best.get_config(base).to_dict()
    changed = {k for k in r if r[k] != b[k]}
    assert changed <= {'name', 'data', 'model'}, changed
    assert {k for k in r['model'] if r['model'][k] != b['model'][k]} <= {
        'norm', 'input_norm', 'head_norm'}
    assert r['data']['augment']['zoom'] != (1.0, 1.0) and r['model']['input_norm'] == 'channels'
  assert robust.get_config('cpu').image_size == 112 and robust.get_config('').image_size == 224
  assert robust.get_config('tiny').model.name == 'cnn_lstm'
  with pytest.raises(ValueError, match="unknown variant 'huge' of configs/robust.py"):
    robust.get_config('huge')
