"""The training split resident on the devices: batches gathered there, not streamed.

The streamers (tf.data, bcjax/data/pipeline.py; NumPy,
bcjax/data/packed.py) make every training batch on the host: gather the
uint8 pixels, copy them to the device. A GPU step of the paper's hybrid
takes a few milliseconds, and every streamed batch waits on the host's work
and on its copy. So when the split fits (``config.data.placement``,
``config.data.device_memory_mb``) the trainer instead::

    pixels = data.train_pixels(config)                # decoded once: uint8 [n, S, S, 3]
    feed = resident.ResidentTrain(config, runner, *pixels, total=info.split_sizes['train'],
                                  process_count=jax.process_count())
    for batch in feed.batches(epoch, start=skip):     # on the devices: uint8 + labels
      state, metrics = runner.train_step(state, batch, rng)   # augments + scales in the step

* Decoding happens once: the pixels come from the tf.data cache or the
  packed file (both hold the decoded, resized uint8 images).
* Each process keeps its own shard (every ``process_count``-th example, as
  the streamers read), whole on each of its local devices, so a
  batch row is gathered where it is used and nothing crosses devices.
* The epoch's order is the NumPy streamer's permutation of the shard from
  ``(config.seed, epoch)``: only row indices (``int32 [D, b]``) go to the
  devices each step. The device path yields exactly the packed streamer's
  batches (uint8, unaugmented), and the step flips, rotates and scales both
  alike (bcjax/augment.py), from the step's key. A resumed epoch that skips
  ``start`` batches replays the rest exactly.
"""

import dataclasses
from typing import Iterator

import numpy as np

from bcjax.data import spec
from bcjax.errors import UserError

PLACEMENTS = ('auto', 'device', 'stream')


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where the training batches come from, and why (the trainer logs ``describe()``)."""
  kind: str  # 'device' or 'stream': the mode config.data.placement resolved to
  megabytes: float  # The resident split's size per device.
  reason: str

  def describe(self, streamer_name: str) -> str:
    if self.kind == 'device':
      return (f'input: train split resident on the devices as uint8 ({self.megabytes:.0f} MB '
              f'per device; {self.reason}); batches gathered, augmented and scaled in the step')
    streamer = 'tf.data' if streamer_name == 'pipeline' else 'NumPy (packed file)'
    return f'input: train batches streamed from the host by {streamer} ({self.reason})'


def resident_bytes(train_examples: int, image_size: int, process_count: int) -> int:
  """Bytes one device holds for the device path: its process's largest shard, pixels + labels."""
  rows = spec.shard_size(train_examples, 0, process_count)
  return rows * (image_size * image_size * 3 + 4)


def choose(config, train_examples: int, process_count: int) -> Placement:
  """The input path ``config.data.placement`` asks for (``auto``: by the memory budget)."""
  placement = config.data.placement
  if placement not in PLACEMENTS:
    raise UserError(f'config.data.placement={placement!r} is not known; allowed: '
                    f'{", ".join(PLACEMENTS)}')
  megabytes = resident_bytes(train_examples, config.image_size, process_count) / 2**20
  budget = float(config.data.device_memory_mb)
  if placement != 'auto':
    return Placement(placement, megabytes, f'placement={placement}')
  fits = megabytes <= budget
  return Placement('device' if fits else 'stream', megabytes,
                   f"placement=auto: {megabytes:.0f} MB {'<=' if fits else '>'} "
                   f'data.device_memory_mb={budget:g}')


def epoch_order(config, shard_examples: int, epoch: int) -> np.ndarray:
  """Positions in this process's shard in the order of ``epoch``: a pure function of (seed, epoch).

  The NumPy streamer's permutation (bcjax/data/packed.py), so both paths see
  the same batches.
  """
  return np.random.default_rng([int(config.seed), epoch, 0]).permutation(shard_examples)


class ResidentTrain:
  """This process's training shard on its devices, and the epochs' batches gathered there.

  ``runner`` is a bcjax.parallel Runner: it knows how its mapping lays out
  arrays (``put_resident``) and gathers a batch (``gather``).
  """

  def __init__(self, config, runner, images: np.ndarray, labels: np.ndarray, *, total: int,
               process_count: int, teacher: np.ndarray | None = None):
    """``teacher``: distillation targets, a probability row per image (bcjax/distill.py)."""
    if images.dtype != np.uint8:
      raise ValueError(f'resident images must be uint8, got {images.dtype}')
    self.config = config
    self.runner = runner
    self.shard_examples = len(labels)
    self.steps = spec.train_steps(total, config.batch_size)
    devices = len(runner.local_devices)
    self.per_process, self.per_device = spec.batch_geometry(
        config.batch_size, process_count, devices, 'config.batch_size')
    # Every process's block has the longest shard's length (a global array's
    # blocks are equal); the padding rows are never indexed.
    rows = spec.shard_size(total, 0, process_count)
    pad = rows - len(labels)
    arrays = [images, np.asarray(labels, np.int32)]
    if teacher is not None:
      if teacher.shape[0] != len(labels):
        raise ValueError(f'{teacher.shape[0]} teacher rows for {len(labels)} images')
      arrays.append(np.asarray(teacher, np.float32))
    if pad:
      arrays = [np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)]) for a in arrays]
    self.arrays = runner.put_resident(*arrays)
    self.devices = devices

  def _rows(self, order: np.ndarray, step: int) -> np.ndarray:
    rows = order[step * self.per_process:(step + 1) * self.per_process]
    return rows.reshape(self.devices, self.per_device).astype(np.int32)

  def indices(self, epoch: int, step: int) -> np.ndarray:
    """Row indices ``int32 [D, b]`` of the epoch's batch ``step`` (0-based)."""
    return self._rows(epoch_order(self.config, self.shard_examples, epoch), step)

  def batches(self, epoch: int, start: int = 0) -> Iterator[dict]:
    """The epoch's batches from ``start`` on, as the step takes them (device arrays, uint8)."""
    order = epoch_order(self.config, self.shard_examples, epoch)
    for s in range(start, self.steps):
      yield self.runner.gather(self.arrays, self._rows(order, s))
