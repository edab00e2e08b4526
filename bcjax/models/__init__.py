"""Model registry: every model bcjax can train, looked up by name.

Adding a model never touches the trainer::

    # bcjax/models/my_model.py
    class MyModel(nn.Module):
      num_classes: int = 8
      width: int = 32
      dtype: jnp.dtype = jnp.float32
      @nn.compact
      def __call__(self, x, *, train): ...

    # here
    MODELS['my_model'] = my_model.MyModel

    # configs/my_model.py: get_config(variant) from configs/default.py, with a 'tiny' variant

Then ``--config.model.name=my_model --config.model.width=64`` trains it: the
fields of ``config.model`` other than ``name`` are the constructor arguments.
A model maps images ``(N, H, W, 3)`` in [0, 1] to float32 logits
``(N, num_classes)``; ``train`` switches dropout and BatchNorm.

Two settings reach only the models that declare them as fields
(:data:`OPTIONAL`): ``axis_name``, the device axis that BatchNorm must average
its statistics over inside a mapped step (a model with BatchNorm declares it
and passes it to every BatchNorm; tests/test_parallel.py checks every
registered model against one device), and ``conv_impl``, the convolution and
pooling lowering of bcjax/models/layers.py (the same function either way).
"""

import dataclasses
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


# Settings of a layer, not of an experiment: passed only to a model whose
# dataclass declares them, so a model without BatchNorm need not take a device
# axis, nor one that never convolves a lowering.
OPTIONAL = ('axis_name', 'conv_impl')


def declares(model_class: Callable[..., nn.Module], field: str) -> bool:
  """Whether the model's dataclass has ``field`` (e.g. ``axis_name``)."""
  return any(f.name == field for f in dataclasses.fields(model_class))


def build_model(config: ml_collections.ConfigDict, *,
                axis_name: str | None = None) -> nn.Module:
  """Instantiates ``config.model.name`` with the config's arguments.

  ``axis_name`` names the device axis BatchNorm averages its statistics over
  when the model runs inside a mapped step (bcjax/parallel.py); it and
  ``config.model.conv_impl`` go only to models that declare them.
  """
  name = config.model.name
  if name not in MODELS:
    raise UnknownModelError(
        f'unknown model {name!r}; known models: {", ".join(sorted(MODELS))}')
  model_class = MODELS[name]
  kwargs = dict(model_kwargs(config), axis_name=axis_name)
  kwargs = {k: v for k, v in kwargs.items()
            if k not in OPTIONAL or declares(model_class, k)}
  try:
    return model_class(**kwargs)
  except TypeError as e:
    raise UserError(f'config.model does not fit model {name!r}: {e}') from None
