"""A/B of train-step variants of one model, alternated call by call, with the PyTorch peer.

Where ``throughput.py`` times the configs as they are, this compares variants
of one train step in one process (batch 128, pmap, synthetic data on the
device), so small differences show through the machine's drift::

    python benchmarks/train_step_ab.py --model cnn --rounds 10 \
        base flax_dropout:dropout=flax mb32:microbatch=32 mb16:microbatch=16
    python benchmarks/train_step_ab.py --model cnn_lstm --rounds 3 base mb32:microbatch=32

A variant is ``NAME[:microbatch=N][:dropout=bits|flax][:conv=IMPL]``: ``microbatch``
sets ``config.microbatch_size``; ``conv`` sets ``config.model.conv_impl`` (``onednn``,
``matmul``, ``native``); ``dropout=flax`` builds the step with
``jax.random.bernoulli`` masks (flax's, 32 random bits per element) in place
of :func:`bcjax.models.layers.dropout_keep_mask`, to measure what the bit-sliced
mask saves. Prints median images/s [min-max] and the ratio to PyTorch.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bcjax import process_setup  # noqa: F401  pylint: disable=unused-import,wrong-import-position
import jax  # pylint: disable=wrong-import-position

from bcjax.models import layers  # pylint: disable=wrong-import-position
from benchmarks import throughput  # pylint: disable=wrong-import-position


VARIANT_SYNTAX = 'NAME[:microbatch=N][:dropout=bits|flax][:conv=IMPL]'


def _flax_mask(rng, rate, shape):
  return jax.random.bernoulli(rng, 1.0 - rate, tuple(shape))


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
  name, *fields = spec.split(':')
  options = {}
  for field in fields:
    key, _, value = field.partition('=')
    if key not in ('microbatch', 'dropout', 'conv') or not value:
      raise SystemExit(f'bad variant {spec!r}: use {VARIANT_SYNTAX}')
    options[key] = value
  if options.get('dropout', 'bits') not in ('bits', 'flax'):
    raise SystemExit(f'bad variant {spec!r}: dropout is bits or flax')
  if options.get('conv', 'auto') not in layers.IMPLS:
    raise SystemExit(f'bad variant {spec!r}: conv is one of {", ".join(layers.IMPLS)}')
  return name, options


def build_variant(model: str, batch_size: int, options: dict[str, str], tiny: bool):
  config = throughput.make_config(model, batch_size, tiny, 'pmap',
                                  microbatch_size=int(options.get('microbatch', 0)))
  config.model.conv_impl = options.get('conv', config.model.conv_impl)
  flax_masks = options.get('dropout') == 'flax'
  with (mock.patch.object(layers, 'dropout_keep_mask', _flax_mask) if flax_masks
        else contextlib.nullcontext()):  # Traced and compiled inside build_steps.
    return throughput.build_steps(config)['train']


def main(argv=None) -> dict[str, dict[str, float]]:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('variants', nargs='+', help=VARIANT_SYNTAX)
  p.add_argument('--model', default='cnn', choices=sorted(throughput.CONFIGS))
  p.add_argument('--batch_size', type=int, default=128)
  p.add_argument('--rounds', type=int, default=5, help='timed calls per variant')
  p.add_argument('--no_peer', action='store_true', help='leave PyTorch out')
  p.add_argument('--tiny', action='store_true', help="the config's tiny variant (smoke test)")
  args = p.parse_args(argv)
  fns = {}
  for spec in args.variants:
    name, options = parse_variant(spec)
    fns[name] = build_variant(args.model, args.batch_size, options, args.tiny)
  if not args.no_peer:
    config = throughput.make_config(args.model, args.batch_size, args.tiny, 'pmap')
    fns['torch'] = throughput.build_torch(config)['train']
  for fn in fns.values():  # Warm-up.
    jax.block_until_ready(fn())
  times = throughput._time_round_robin(fns, args.rounds)  # pylint: disable=protected-access
  rates = {k: throughput._spread(v, args.batch_size)  # pylint: disable=protected-access
           for k, v in times.items()}
  peer = rates.get('torch', {}).get('median')
  for name, r in rates.items():
    ratio = f'  bcjax / PyTorch {r["median"] / peer:.2f}' if peer and name != 'torch' else ''
    print(f'{args.model} {name:>14}: {r["median"]:8.1f} img/s [{r["min"]:.0f}-{r["max"]:.0f}]'
          + ratio)
  return rates


if __name__ == '__main__':
  main()
