"""Model registry: every model bcjax can train, looked up by name.

Adding a model never touches the trainer::

    # bcjax/models/my_model.py
    class MyModel(nn.Module):
      num_classes: int = 8
      width: int = 32
      dtype: jnp.dtype = jnp.float32
      axis_name: str | None = None   # for BatchNorm across devices
      @nn.compact
      def __call__(self, x, *, train): ...

    # here
    MODELS['my_model'] = my_model.MyModel

Then ``--config.model.name=my_model --config.model.width=64`` trains it: the
fields of ``config.model`` other than ``name`` are the constructor arguments.
A model maps images ``(N, H, W, 3)`` in [0, 1] to float32 logits
``(N, num_classes)``; ``train`` switches dropout and BatchNorm.
"""

from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from bcjax.errors import UserError
from bcjax.models import initializers

from bcjax.models.cnn import CNN
from bcjax.models.cnn_attention import CNNAttention
from bcjax.models.cnn_lstm import CNNLSTM

MODELS: dict[str, Callable[..., nn.Module]] = {
    'cnn': CNN,
    'cnn_lstm': CNNLSTM,
    'cnn_attention': CNNAttention,
}

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


class UnknownModelError(UserError):
  pass


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Constructor arguments for ``config.model.name`` from the config."""
  kwargs = {k: v for k, v in config.model.to_dict().items() if k != 'name'}
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
  if 'initializers' in kwargs:
    initializers.check(kwargs['initializers'])
  kwargs['num_classes'] = config.num_classes
  if config.dtype not in DTYPES:
    raise UserError(f'unknown dtype {config.dtype!r}; known: {", ".join(DTYPES)}')
  kwargs['dtype'] = DTYPES[config.dtype]
  return kwargs


def build_model(config: ml_collections.ConfigDict, *,
                axis_name: str | None = None) -> nn.Module:
  """Instantiates ``config.model.name`` with the config's arguments.

  ``axis_name`` names the device axis BatchNorm averages its statistics over
  when the model runs inside a mapped step (bcjax/parallel.py).
  """
  name = config.model.name
  if name not in MODELS:
    raise UnknownModelError(
        f'unknown model {name!r}; known models: {", ".join(sorted(MODELS))}')
  kwargs = model_kwargs(config)
  kwargs = {k: v for k, v in kwargs.items() if k not in ('extractor_checkpoint', 'freeze_extractor')}
  try:
    return MODELS[name](axis_name=axis_name, **kwargs)
  except TypeError as e:
    raise UserError(f'config.model does not fit model {name!r}: {e}') from None
