"""Layer tables like the paper's Tables 1 and 2 (``--mode=summary``).

Shapes come from ``jax.eval_shape`` (nothing is computed or allocated) and
layers from :func:`flax.linen.intercept_methods`, so the table lists exactly
the modules the model calls, in call order. ``Param #`` counts ``params``
plus ``batch_stats`` per layer, as Keras (and so the paper) does; every group
ends in a line ``params: N  batch_stats: M  total: T``.

For ``cnn_lstm`` the top-level submodules (``extractor``, ``head``) form two
groups with their own subtotals, followed by the model's total.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from bcjax import models

# Layers whose inner modules are an implementation detail (an LSTM's cell).
_OPAQUE = ('LSTM',)


@dataclasses.dataclass
class Row:
  path: tuple[str, ...]
  kind: str
  shape: tuple[Any, ...]
  params: int = 0
  batch_stats: int = 0


def _count(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))


def _subtree(tree: dict, path: tuple[str, ...]) -> Any:
  for p in path:
    if not isinstance(tree, dict) or p not in tree:
      return {}
    tree = tree[p]
  return tree


def layer_rows(config: ml_collections.ConfigDict) -> tuple[list[Row], dict]:
  """Returns the called leaf layers in call order and the variable shapes."""
  model = models.build_model(config)
  x = jax.ShapeDtypeStruct((1, config.image_size, config.image_size, 3), jnp.float32)
  calls: list[tuple[tuple[str, ...], str, Any]] = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == '__call__':
      calls.append((tuple(context.module.path), type(context.module).__name__, out))
    return out

  def init(x):
    with nn.intercept_methods(interceptor):
      return model.init({'params': jax.random.key(0), 'dropout': jax.random.key(0)},
                        x, train=False)

  variables = jax.eval_shape(init, x)
  calls = list({path: (path, kind, out) for path, kind, out in calls}.values())
  opaque = [p for p, kind, _ in calls if kind in _OPAQUE]
  paths = [p for p, _, _ in calls]
  rows = []
  for path, kind, out in calls:
    if not path:
      continue  # The model itself.
    if any(path[:len(o)] == o and path != o for o in opaque):
      continue  # Inside an LSTM.
    if kind not in _OPAQUE and any(q[:len(path)] == path and q != path for q in paths):
      continue  # A container of other rows (extractor, head).
    rows.append(Row(path, kind, (None,) + tuple(out.shape[1:]),
                    _count(_subtree(variables.get('params', {}), path)),
                    _count(_subtree(variables.get('batch_stats', {}), path))))
  return rows, variables


def _totals_line(params: int, batch_stats: int) -> str:
  return f'params: {params:,}  batch_stats: {batch_stats:,}  total: {params + batch_stats:,}'


def format_summary(config: ml_collections.ConfigDict) -> str:
  """The model's layer table as text, grouped by top-level submodule."""
  rows, variables = layer_rows(config)
  groups: dict[str, list[Row]] = {}
  for r in rows:
    groups.setdefault(r.path[0] if len(r.path) > 1 else '', []).append(r)
  name_w = max(len('/'.join(r.path)) for r in rows) + 2
  kind_w = max(len(r.kind) for r in rows) + 2
  shape_w = max(len(str(r.shape)) for r in rows) + 2
  width = name_w + kind_w + shape_w + 10
  lines = [f'Model: {config.model.name}  (input {config.image_size}x{config.image_size}x3, '
           f'{config.num_classes} classes)', '=' * width,
           f'{"Layer":<{name_w}}{"Type":<{kind_w}}{"Output shape":<{shape_w}}{"Param #":>10}',
           '=' * width]
  for group, group_rows in groups.items():
    if group and len(groups) > 1:
      lines.append(f'[{group}]')
    for r in group_rows:
      lines.append(f'{"/".join(r.path):<{name_w}}{r.kind:<{kind_w}}{str(r.shape):<{shape_w}}'
                   f'{r.params + r.batch_stats:>10,}')
    if group and len(groups) > 1:
      p = _count(variables.get('params', {}).get(group, {}))
      b = _count(variables.get('batch_stats', {}).get(group, {}))
      lines += [f'{group} ' + _totals_line(p, b), '-' * width]
  lines.append(_totals_line(_count(variables.get('params', {})),
                            _count(variables.get('batch_stats', {}))))
  return '\n'.join(lines)
