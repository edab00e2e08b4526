"""Per-layer convolution times: each lowering of ``layers.Conv`` against PyTorch, on a model's own shapes.

    python benchmarks/conv_layers.py                      # cnn_lstm (224 px), batch 128
    python benchmarks/conv_layers.py --model cnn --impls matmul,onednn

Finds every ``layers.Conv`` the model calls (with its input shape, from one
traced forward pass), then times each on random data, alternating call by call
between the lowerings and PyTorch (``channels_last``, the threads it picks): the
forward pass, and forward + backward (kernel and bias gradients, plus the input
gradient for every layer but the first, as in training). Prints median
milliseconds; ``--json`` writes them. This is where the CPU train steps' time
goes (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bcjax import process_setup  # noqa: F401  pylint: disable=unused-import,wrong-import-position
import flax.linen as nn  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from bcjax import models  # pylint: disable=wrong-import-position
from bcjax.models import layers  # pylint: disable=wrong-import-position
from benchmarks import throughput  # pylint: disable=wrong-import-position


def conv_calls(config) -> list[dict]:
  """Name, input shape (batch 1), kernel size, features and padding of each Conv the model runs."""
  model = models.build_model(config)
  found = []

  def record(next_fun, args, kwargs, context):
    m = context.module
    if isinstance(m, layers.Conv) and context.method_name == '__call__':
      found.append({'name': '/'.join(m.scope.path), 'input': tuple(args[0].shape),
                    'kernel_size': tuple(m.kernel_size), 'features': m.features,
                    'padding': m.padding})
    return next_fun(*args, **kwargs)

  x = jnp.zeros((1, config.image_size, config.image_size, 3))
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
  return found


def _jax_fns(layer: dict, batch: int, impl: str, input_grad: bool):
  shape = (batch,) + layer['input'][1:]
  x = jax.random.normal(jax.random.key(0), shape)
  conv = layers.Conv(layer['features'], layer['kernel_size'], padding=layer['padding'], impl=impl)
  params = conv.init(jax.random.key(1), x)
  fwd = jax.jit(conv.apply)
  y = fwd(params, x)
  g = jax.random.normal(jax.random.key(2), y.shape)
  grad = jax.jit(jax.grad(lambda p, x: jnp.sum(conv.apply(p, x) * g),
                          argnums=(0, 1) if input_grad else 0))
  return {'forward': lambda: jax.block_until_ready(fwd(params, x)),
          'forward+backward': lambda: jax.block_until_ready(grad(params, x))}


def _torch_fns(layer: dict, batch: int, input_grad: bool):
  import torch  # pylint: disable=g-import-not-at-top
  nd = len(layer['kernel_size'])
  c, f = layer['input'][-1], layer['features']
  conv_cls = torch.nn.Conv2d if nd == 2 else torch.nn.Conv1d
  conv = conv_cls(c, f, layer['kernel_size'], padding=layer['padding'].lower())
  x = torch.randn((batch, c) + layer['input'][1:-1])
  if nd == 2:
    conv = conv.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
  x.requires_grad_(input_grad)
  with torch.no_grad():
    g = torch.randn_like(conv(x))

  def forward():
    with torch.inference_mode():
      conv(x)

  def forward_backward():
    conv.zero_grad(set_to_none=True)
    x.grad = None
    conv(x).backward(g)

  return {'forward': forward, 'forward+backward': forward_backward}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n', maxsplit=1)[0])
  p.add_argument('--model', default='cnn_lstm', choices=sorted(throughput.CONFIGS))
  p.add_argument('--batch_size', type=int, default=128)
  p.add_argument('--impls', default='matmul,onednn', help=f'of {",".join(layers.IMPLS[1:])}')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--no_peer', action='store_true', help='leave PyTorch out')
  p.add_argument('--tiny', action='store_true', help="the config's tiny variant (smoke test)")
  p.add_argument('--json', help='write the figures here')
  args = p.parse_args(argv)
  impls = [i for i in args.impls.split(',') if i]
  for impl in impls:
    if impl not in layers.IMPLS[1:]:
      raise SystemExit(f'unknown --impls entry {impl!r}; known: {", ".join(layers.IMPLS[1:])}')
    layers.resolve_impl(impl)  # One error line if 'onednn' cannot run here.
  config = throughput.CONFIGS[args.model].get_config('tiny' if args.tiny else '')
  report = {'model': args.model, 'batch_size': args.batch_size,
            'environment': throughput.environment(), 'layers': []}
  print('| layer | input | pass | ' + ' | '.join(f'{i} ms' for i in impls)
        + ('' if args.no_peer else ' | PyTorch ms') + ' |')
  print('| --- | --- | --- |' + ' ---: |' * (len(impls) + (0 if args.no_peer else 1)))
  for index, layer in enumerate(conv_calls(config)):
    candidates = {impl: _jax_fns(layer, args.batch_size, impl, index > 0) for impl in impls}
    if not args.no_peer:
      candidates['torch'] = _torch_fns(layer, args.batch_size, index > 0)
    entry = {**layer, 'ms': {}}
    for phase in ('forward', 'forward+backward'):
      fns = {name: c[phase] for name, c in candidates.items()}
      for fn in fns.values():
        fn()  # Compile / warm up.
      times = throughput._time_round_robin(fns, args.repeats)  # pylint: disable=protected-access
      entry['ms'][phase] = {k: statistics.median(v) * 1e3 for k, v in times.items()}
      shape = 'x'.join(map(str, (args.batch_size,) + layer['input'][1:]))
      print(f"| {layer['name']} | {shape} | {phase} | "
            + ' | '.join(f"{entry['ms'][phase][k]:.1f}" for k in fns) + ' |', flush=True)
    report['layers'].append(entry)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(report, f, indent=1, default=str)
  return report


if __name__ == '__main__':
  main()
