"""Everything a short GPU loan should measure, in one command of at most 8 minutes.

    # where TensorFlow runs: pack the 224 px train and validation splits (about 33 MiB)
    python launch.py --config configs/cnn_lstm.py --mode=pack --out pbc224.npz \\
        --config.data.path=../shared/data/PBC_dataset_normal_DIB --pack_splits=train,validation
    # on the GPU host (no TensorFlow needed)
    python -m benchmarks.gpu_check --packed pbc224.npz --out gpu_check_out
    # anywhere, in seconds: the same script on tiny synthetic data (tests/test_gpu_check.py)
    python -m benchmarks.gpu_check --tiny --out /tmp/gpu_check_tiny

What it does, most important first, writing ``results.json`` and
``results.md`` under ``--out`` after every part (a run cut short keeps what
it finished):

``--tiny`` shrinks both parts (the tiny CNN, 16 px, 2 epochs; one float32
CNN row at batch 4, eager PyTorch only) so that tests/test_gpu_check.py runs the same
code in seconds.

1. ``train``: one whole default ``cnn_lstm`` run (30 epochs at 224 px, batch
   64) from the packed file on the device path, through
   ``train.train_and_evaluate`` as ``launch.py`` runs it: wall time
   (compile, every epoch, validation, checkpoints), each epoch's seconds, and
   images/s of the later epochs over the pure step rate at the same batch.
   The goal on one H100-class GPU: <= 60 s wall, e2e >= 0.9 of the step rate.
2. ``table``: benchmarks/throughput.py's rows for ``cnn`` and ``cnn_lstm``,
   float32 and bfloat16, batch 128 and 1024, with the PyTorch peers (eager and
   ``torch.compile``) where PyTorch sees the GPU. Rows that would start after
   ``--budget_s`` are skipped and listed as such.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import throughput  # pylint: disable=g-import-not-at-top  (process settings)

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from bcjax import profiling  # pylint: disable=g-import-not-at-top

GOAL_WALL_S = 60.0
GOAL_RATIO = 0.9


def tiny_packed(path: str, image_size: int = 16) -> str:
  """A small packed file of synthetic pixels (no TensorFlow): 48 train, 16 validation."""
  from bcjax.data import packed, spec  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  splits = {name: (rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8),
                   rng.integers(0, len(spec.CLASS_NAMES), n).astype(np.int32))
            for name, n in (('train', 48), ('validation', 16))}
  packed.write_arrays(path, splits, spec.CLASS_NAMES, provenance={'source': 'gpu_check --tiny'})
  return path


def train_config(packed_path: str, tiny: bool, epochs: int | None):
  """The default cnn_lstm run from the packed file; tiny: the tiny CNN at 16 px, 2 epochs."""
  from configs import cnn, cnn_lstm  # pylint: disable=g-import-not-at-top
  config = cnn.get_config('tiny') if tiny else cnn_lstm.get_config()
  if tiny:
    config.image_size = 16
    config.num_epochs = 2
  config.data.source = 'packed'
  config.data.path = packed_path
  config.data.placement = 'device'
  if epochs:
    config.num_epochs = epochs
  return config


def pure_step_rate(config, repeats: int) -> float:
  """images/s of the trainer's step alone at ``config.batch_size`` (a float32 batch on the devices).

  The same runner the run used (bcjax.parallel memoises it), fed one batch
  placed once: what the step costs when nothing else does.
  """
  from bcjax import models, optim, parallel, steps, train_state  # pylint: disable=g-import-not-at-top
  runner = parallel.make_runner(config, models.build_model(config, axis_name=steps.AXIS))
  tx, _ = optim.make(config, steps_per_epoch=100)
  state = runner.put_state(train_state.create(config, jax.random.key(0), tx))
  d = len(runner.local_devices)
  b, s = config.batch_size // jax.process_count() // d, config.image_size
  batch = runner.put_batch({'image': np.random.default_rng(0).random((d, b, s, s, 3), np.float32),
                            'label': np.zeros((d, b), np.int32)})
  rng = jax.random.key(1)
  for _ in range(2):
    state, metrics = runner.train_step(state, batch, rng)
  jax.block_until_ready(metrics)
  t = time.perf_counter()
  for _ in range(repeats):
    state, metrics = runner.train_step(state, batch, rng)
  jax.block_until_ready(metrics)
  return repeats * config.batch_size / (time.perf_counter() - t)


def run_training(config, workdir: str, repeats: int) -> dict[str, Any]:
  """One whole run through the trainer; its wall time, epochs and e2e/step ratio."""
  from bcjax import data, train  # pylint: disable=g-import-not-at-top
  t = time.perf_counter()
  train.train_and_evaluate(config, workdir)
  wall = time.perf_counter() - t
  with open(os.path.join(workdir, 'history.json')) as f:
    history = json.load(f)
  seconds = [h['seconds'] for h in history]
  with open(os.path.join(workdir, 'wall_time.json')) as f:
    phases = json.load(f)[-1]['seconds']  # The trainer's own tally of this run (one process).
  images = data.steps_per_epoch(config, data.prepare(config)) * config.batch_size
  later = seconds[1:] or seconds
  e2e = images / statistics.median(later)
  pure = pure_step_rate(config, repeats)
  return {'model': config.model.name, 'image_size': config.image_size,
          'batch_size': config.batch_size, 'epochs': len(history), 'dtype': config.dtype,
          'input': 'device (packed file, uint8 resident, augmentation in the step)',
          'wall_s': wall, 'epoch_seconds': seconds, 'first_epoch_s': seconds[0],
          'later_epoch_median_s': statistics.median(later),
          'images_per_s_later_epochs': e2e, 'pure_step_images_per_s': pure,
          'e2e_over_step': e2e / pure,
          'phases_s': phases,
          'final_val_accuracy': history[-1].get('val_accuracy'),
          'goal': {'wall_s': GOAL_WALL_S, 'e2e_over_step': GOAL_RATIO,
                   'met': wall <= GOAL_WALL_S and e2e / pure >= GOAL_RATIO}}


def _peers(tiny: bool, requested: str | None) -> tuple[str, str]:
  """The PyTorch peers this host can run, and why others are left out."""
  if requested is not None:
    return requested, ''
  if not throughput.have_torch():
    return '', 'PyTorch not installed: no peers'
  import torch  # pylint: disable=g-import-not-at-top
  if jax.devices()[0].platform == 'gpu' and not torch.cuda.is_available():
    return '', 'PyTorch sees no CUDA device: no peers'
  # torch.compile compiles C++ on a CPU for a minute per shape: not in the smoke run.
  return ('torch', 'tiny: torch.compile left out') if tiny else ('torch,torch_compile', '')


def run_table(tiny: bool, peers: str, deadline: float, repeats: int, log) -> dict[str, Any]:
  """Rows in order of interest; tiny: one CNN row, batch 4, no FLOP count (seconds on a CPU)."""
  rows, skipped = [], []
  batches = [4] if tiny else [128, 1024]
  for dtype in ('float32',) if tiny else ('float32', 'bfloat16'):
    for model in ('cnn',) if tiny else ('cnn_lstm', 'cnn'):
      for batch in batches:
        if time.time() > deadline:
          skipped.append(f'{model} {dtype} batch {batch}')
          continue
        part = throughput.run([model], [batch], ['shard_map'], repeats=repeats,
                              warmup=0 if tiny else 2, peer=peers, tiny=tiny, e2e=False,
                              e2e_examples=0, dtype=dtype, count_flops=not tiny, log=log)
        rows += part['results']
  return {'results': rows, 'skipped': skipped}


def markdown(report: dict[str, Any]) -> str:
  lines = [f"# gpu_check: {report['environment']['device_kind']} "
           f"({report['environment']['platform']})", '']
  t = report.get('train')
  if t:
    lines += ['## One whole training run (trainer, packed file, device path)', '',
              f"{t['model']} at {t['image_size']} px, batch {t['batch_size']}, {t['epochs']} "
              f"epochs: **{t['wall_s']:.1f} s wall** (compile, every epoch, validation, "
              f"checkpoints); first epoch {t['first_epoch_s']:.2f} s, later epochs median "
              f"{t['later_epoch_median_s']:.2f} s; {t['images_per_s_later_epochs']:.0f} img/s "
              f"over a pure step rate of {t['pure_step_images_per_s']:.0f}: "
              f"**e2e/step {t['e2e_over_step']:.2f}**. Goal (<= {GOAL_WALL_S:.0f} s, >= "
              f"{GOAL_RATIO}): {'met' if t['goal']['met'] else 'NOT met'}.", '',
              'The trainer\'s ' + profiling.WallClock.describe(t['phases_s']) + '.', '',
              'Epoch seconds: ' + ', '.join(f'{s:.2f}' for s in t['epoch_seconds']), '']
  table = report.get('table')
  if table and table['results']:
    lines += ['## Step throughput', '',
              throughput.markdown({'environment': report['environment'],
                                   'settings': {'repeats': report['settings']['repeats']},
                                   'results': table['results']}), '']
  if table and table['skipped']:
    lines += ['Skipped (time budget): ' + ', '.join(table['skipped']), '']
  for note in report.get('notes', []):
    lines.append(f'- {note}')
  return '\n'.join(lines) + '\n'


def _write(out: str, report: dict[str, Any]) -> None:
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(report, f, indent=2)
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write(markdown(report))


def main(argv=None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--packed', default='', help='packed train+validation file (--mode=pack)')
  p.add_argument('--out', required=True, help='folder for results.json, results.md, the run')
  p.add_argument('--tiny', action='store_true', help='tiny synthetic data and configs: seconds')
  p.add_argument('--budget_s', type=float, default=450.0,
                 help='no table row starts after this many seconds (default 450: under 8 min)')
  p.add_argument('--epochs', type=int, default=None, help='override the run\'s 30 epochs')
  p.add_argument('--peer', default=None, help='override the peers (default: what is installed)')
  p.add_argument('--skip', default='', help='comma-separated parts to leave out: train,table')
  args = p.parse_args(argv)
  start = time.time()
  os.makedirs(args.out, exist_ok=True)
  log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
  packed_path = args.packed
  if args.tiny and not packed_path:
    packed_path = tiny_packed(os.path.join(args.out, 'tiny16.npz'))
  if not packed_path and 'train' not in args.skip:
    p.error('--packed is required (or --tiny)')
  repeats = 1 if args.tiny else 5
  report: dict[str, Any] = {'environment': throughput.environment(),
                            'settings': {'tiny': args.tiny, 'packed': packed_path,
                                         'budget_s': args.budget_s, 'repeats': repeats},
                            'notes': []}
  if 'train' not in args.skip:
    log('gpu_check: the training run ...')
    config = train_config(packed_path, args.tiny, args.epochs)
    report['train'] = run_training(config, os.path.join(args.out, 'train_run'),
                                   repeats=2 if args.tiny else 20)
    _write(args.out, report)
  if 'table' not in args.skip:
    peers, why = _peers(args.tiny, args.peer)
    if why:
      report['notes'].append(why)
    log(f'gpu_check: the throughput table (peers: {peers or "none"}) ...')
    report['table'] = run_table(args.tiny, peers, start + args.budget_s, repeats, log)
  report['total_s'] = time.time() - start
  _write(args.out, report)
  print(markdown(report))
  return report


if __name__ == '__main__':
  main()
