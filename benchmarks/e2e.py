"""What a user waits for: real training epochs against the pure step rate.

``benchmarks/throughput.py --e2e`` calls :func:`measure` per model; it is
also usable alone::

    from benchmarks import e2e
    out = e2e.measure(config, epochs=3)   # config.data: source, path, placement, augment
    out['epochs'][1]['ratio']             # images/s of epoch 2 / pure step rate

It trains ``epochs`` epochs of ``config`` with the trainer's own pieces (its
input path, chosen by ``config.data.placement`` exactly as bcjax/train.py
chooses it, its runner and step) and, after each epoch, times the same
compiled step on one batch already on the devices: the pure step rate
measured beside each epoch, so a machine whose load changes (a shared CPU)
changes both. Not timed: the step's compile (reported apart). Timed apart:
decoding the split and placing it on the devices (the device path does it
before its first epoch; the streaming path decodes during its first epoch,
tf.data caches the pixels for the next). No validation, checkpoints or logs:
those are in a whole run's wall time (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import jax
import numpy as np

from bcjax import data, models, optim, parallel, steps, train_state
from bcjax.data import resident


def _prefetch(batches, put, size):
  from bcjax.train import _prefetch as trainers  # pylint: disable=g-import-not-at-top
  return trainers(batches, put, size)


def _zero_batch(config, runner, uint8: bool) -> dict[str, Any]:
  d = len(runner.local_devices)
  b = config.batch_size // jax.process_count() // d
  s = config.image_size
  return runner.put_batch({'image': np.zeros((d, b, s, s, 3), np.uint8 if uint8 else np.float32),
                           'label': np.zeros((d, b), np.int32)})


def measure(config, *, epochs: int = 2, pure_steps: int = 10, seed: int = 0) -> dict[str, Any]:
  """Times ``epochs`` training epochs of ``config`` and the pure step rate beside each."""
  if epochs < 1:
    raise ValueError('epochs must be >= 1')
  info = data.prepare(config, print_summary=False)
  per_epoch = data.steps_per_epoch(config, info)
  runner = parallel.make_runner(config, models.build_model(config, axis_name=steps.AXIS))
  tx, _ = optim.make(config, per_epoch)
  state = runner.put_state(train_state.create(config, jax.random.key(seed), tx))
  rng = jax.random.key(seed + 1)
  placement = resident.choose(config, info.split_sizes['train'], jax.process_count())
  out: dict[str, Any] = {'input': placement.describe(data.streamer_name(config)),
                         'path': placement.kind, 'source': config.data.source,
                         'image_size': config.image_size, 'batch_size': config.batch_size,
                         'dtype': config.dtype, 'steps_per_epoch': per_epoch,
                         'augment': bool(config.data.augment.flips or config.data.augment.rot90)}
  feed = None
  if placement.kind == 'device':
    t = time.perf_counter()
    feed = resident.ResidentTrain(config, runner, *data.train_pixels(config),
                                  total=info.split_sizes['train'],
                                  process_count=jax.process_count())
    jax.block_until_ready(feed.arrays)
    out['decode_and_place_s'] = time.perf_counter() - t

  # Compile both programs up front: the epoch's input (uint8 on either path,
  # augmented and scaled in the step) and the pure step's (a float batch
  # already on the devices).
  pure_batch = _zero_batch(config, runner, uint8=False)
  t = time.perf_counter()
  for batch in (pure_batch, _zero_batch(config, runner, uint8=True)):
    state, metrics = runner.train_step(state, batch, rng)
    jax.block_until_ready(metrics)
  out['compile_s'] = time.perf_counter() - t

  rows = []
  for epoch in range(epochs):
    t = time.perf_counter()
    if feed is not None:
      batches = feed.batches(epoch)
    else:
      host = data.make_train_dataset(config, epoch=epoch).as_numpy_iterator()
      batches = _prefetch(host, runner.put_batch, config.data.prefetch)
    n = 0
    for batch in batches:
      state, metrics = runner.train_step(state, batch, rng)
      n += 1
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(pure_steps):
      state, metrics = runner.train_step(state, pure_batch, rng)
    jax.block_until_ready(metrics)
    pure = pure_steps * config.batch_size / (time.perf_counter() - t)
    ips = n * config.batch_size / seconds
    rows.append({'epoch': epoch + 1, 'seconds': seconds, 'images_per_s': ips,
                 'pure_images_per_s': pure, 'ratio': ips / pure})
  out['epochs'] = rows
  later = rows[1:] or rows
  out['images_per_s'] = statistics.median(r['images_per_s'] for r in later)
  out['ratio_to_step_rate'] = statistics.median(r['ratio'] for r in later)
  first = rows[0]
  first_s = first['seconds'] + out.get('decode_and_place_s', 0.0)
  out['first_epoch_images_per_s'] = per_epoch * config.batch_size / first_s
  out['first_epoch_ratio'] = out['first_epoch_images_per_s'] / first['pure_images_per_s']
  return out
