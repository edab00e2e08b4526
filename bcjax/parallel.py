"""Two thin wrappers that map the per-device steps of bcjax/steps.py over devices.

``config.parallel`` picks one; both run the same per-device code and give the
same numbers::

    runner = parallel.make_runner(config, model)      # model built with axis_name=steps.AXIS
    state = runner.put_state(host_state)             # replicated on every device
    state, metrics = runner.train_step(state, runner.put_batch(batch), rng)
    host_metrics = runner.get_metrics(metrics)       # only when logging

* ``pmap``: ``jax.pmap`` over every device; each process's host batches
  ``[D, b, ...]`` (D local devices) go in as they are, the state is
  replicated with a leading local-device axis. With several processes, pmap
  is given the same device list on every process (JAX requires it) and its
  collectives span all of them.
* ``shard_map``: ``jax.jit`` over ``jax.shard_map`` on a one-axis mesh, the
  successor JAX recommends (pmap is in maintenance mode since JAX 0.8). Each
  process's ``[D, b, ...]`` batch becomes its part of one global array,
  sharded over the mesh axis (``jax.make_array_from_process_local_data``), so
  several processes each feed their own shard without a rewrite.

``check_vma=False`` in the shard_map wrapper is deliberate: with the check on,
JAX transposes the implicit broadcast of the replicated parameters into a
``psum``, so ``jax.grad`` inside the step would already return the *sum* of
the per-device gradients and the step's explicit ``lax.pmean`` would be a
no-op - the update would be ``D`` times too large. Off, the step has pmap's
semantics, and the collective stays visible in steps.py
(tests/test_parallel.py checks both wrappers against one device).

Both wrappers donate the state: a step updates the parameters in place.

The training split can also live on the devices (bcjax/data/resident.py):
``put_resident`` places this process's uint8 shard on every local device
once, and ``gather`` turns a host array of row indices ``[D, b]`` into a
batch there, in the layout ``train_step`` takes (no pixels cross the host).

Several processes (bcjax/distributed.py): both wrappers order the devices by
process (:func:`global_devices`), so each process's rows of a global batch
are one contiguous block, the same rows a single process with all the devices
would give those devices.
"""

import collections
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bcjax import augment, steps
from bcjax.errors import UserError

DEVICE_KEYS = ('image', 'label', 'mask')  # Batch entries that go to devices.
# A resident split's arrays, in order: distillation adds the teacher rows.
RESIDENT_KEYS = ('image', 'label', 'teacher')


def per_device_batch(global_batch: int, device_count: int, what: str = 'config.batch_size') -> int:
  """The per-device batch, or a one-line error when it does not divide."""
  if global_batch <= 0 or global_batch % device_count:
    raise UserError(f'{what}={global_batch} does not divide evenly over {device_count} '
                    f'devices; use a multiple of {device_count}')
  return global_batch // device_count


def host_metrics(metrics: Sequence[dict[str, Any]]) -> list[dict[str, float]]:
  """Several steps' summed metrics as host numbers, in one device sync.

  Both wrappers return a step's metrics as one value per name, repeated per
  device (pmap) or replicated (shard_map): the first element is the total.
  """
  return [{k: np.asarray(v).reshape(-1)[0].item() for k, v in m.items()}
          for m in jax.device_get(list(metrics))]


def global_devices() -> list[jax.Device]:
  """Every process's devices, process by process (the order pmap uses)."""
  return [d for p in range(jax.process_count()) for d in jax.local_devices(process_index=p)]


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded output, in its input order."""
  if x.is_fully_addressable:
    return np.asarray(x)
  shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
  return np.concatenate([np.asarray(s.data) for s in shards])


class Runner:
  """Shared interface; subclasses say how to place data and map the steps."""
  name: str
  devices: Sequence[jax.Device]

  def __init__(self, model: nn.Module, *, label_smoothing: float = 0.0,
               microbatch_size: int = 0, tta: bool = False,
               augmentation: augment.StepAugment = augment.StepAugment(),
               distill_weight: float = 0.0, devices: Sequence[jax.Device] | None = None):
    self.train_fn = functools.partial(steps.train_step, model=model,
                                      label_smoothing=label_smoothing,
                                      microbatch_size=microbatch_size, augmentation=augmentation,
                                      distill_weight=distill_weight)
    self.eval_fn = functools.partial(steps.eval_step, model=model, tta=tta)
    self._setup(devices)

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  def _device_batch(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
    batch = {k: v for k, v in batch.items() if k in DEVICE_KEYS}
    d = next(iter(batch.values())).shape[0]
    if d != len(self.local_devices):
      raise ValueError(f'batch has {d} device rows, expected {len(self.local_devices)}')
    return batch

  def _per_device(self, host: np.ndarray) -> list[jax.Array]:
    """One copy of ``host`` (with a leading axis of 1) on each local device."""
    return [jax.device_put(host[None], d) for d in self.local_devices]

  def gather(self, resident, index: np.ndarray) -> dict[str, jax.Array]:
    """Rows ``index`` [D, b] of the resident split, on the devices.

    ``{'image': uint8, 'label'}``, and ``'teacher'`` (distillation targets)
    when the split holds a third array (in RESIDENT_KEYS order).
    """
    if index.shape[0] != len(self.local_devices):
      raise ValueError(f'index has {index.shape[0]} device rows, expected {len(self.local_devices)}')
    rows = self._gather(len(resident))(*resident, self._put_index(index.astype(np.int32)))
    return dict(zip(RESIDENT_KEYS, rows))

  @staticmethod
  def get_metrics(metrics) -> dict[str, float]:
    """Pulls one step's summed metrics to the host (a device sync: call when logging)."""
    return host_metrics([metrics])[0]


class PmapRunner(Runner):
  name = 'pmap'

  def _setup(self, devices):
    self.devices = list(devices or global_devices())
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    # Arrays with a leading local-device axis, one row per device (what pmap
    # eats); pmap itself makes them parts of global arrays across processes.
    self.stacked = NamedSharding(Mesh(np.array(self.local_devices), (steps.AXIS,)),
                                 P(steps.AXIS))
    pmap = functools.partial(jax.pmap, axis_name=steps.AXIS, devices=self.devices)
    self.train_step = pmap(self.train_fn, in_axes=(0, 0, None), donate_argnums=(0,))
    self.eval_step = pmap(self.eval_fn, in_axes=(0, 0))
    self._gather = functools.cache(lambda k: pmap(_gather_rows))

  def put_resident(self, *arrays: np.ndarray):
    """This process's split (images, labels[, teacher rows]), whole on each local device: ``[D, n, ...]``."""
    d = len(self.local_devices)
    return tuple(jax.make_array_from_single_device_arrays((d, *x.shape), self.stacked,
                                                          self._per_device(x))
                 for x in arrays)

  def _put_index(self, index):
    return jax.device_put(index, self.stacked)

  def put_state(self, state):
    n = len(self.local_devices)
    state = jax.device_get(state)
    return jax.device_put(
        jax.tree.map(lambda x: np.broadcast_to(x, (n, *np.shape(x))), state), self.stacked)

  def get_state(self, state):
    # The first device's copy, copied as it is: ``x[0]`` would be a device
    # computation, which with several processes can wait forever on the others.
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))[0], state)

  def put_batch(self, batch):
    batch = self._device_batch(batch)
    return jax.device_put(batch, self.stacked)

  @staticmethod
  def get_rows(x) -> np.ndarray:
    x = np.asarray(x)
    return x.reshape(-1, *x.shape[2:])


class ShardMapRunner(Runner):
  name = 'shard_map'

  def _setup(self, devices):
    self.devices = list(devices or global_devices())
    self.local_devices = [d for d in self.devices if d.process_index == jax.process_index()]
    self.mesh = Mesh(np.array(self.devices), (steps.AXIS,))
    self.replicated = NamedSharding(self.mesh, P())
    self.sharded = NamedSharding(self.mesh, P(steps.AXIS))
    smap = functools.partial(jax.shard_map, mesh=self.mesh, check_vma=False)
    self.train_step = jax.jit(
        smap(self.train_fn, in_specs=(P(), P(steps.AXIS), P()), out_specs=(P(), P())),
        donate_argnums=(0,))
    self.eval_step = jax.jit(
        smap(self.eval_fn, in_specs=(P(), P(steps.AXIS)), out_specs=(P(), P(steps.AXIS))))
    rows = P(steps.AXIS)
    self._gather = functools.cache(lambda k: jax.jit(smap(
        lambda *xs: _gather_rows(*(x[0] for x in xs[:-1]), xs[-1]),
        in_specs=(rows,) * (k + 1), out_specs=(rows,) * k)))

  def put_resident(self, *arrays: np.ndarray):
    """Every device's block of a global ``[devices, n, ...]`` array is its process's split.

    Processes' shards differ by at most one example; ``images`` arrive
    padded to the longest (bcjax/data/resident.py), so the blocks match.
    """
    n = len(self.devices)
    return tuple(jax.make_array_from_single_device_arrays((n, *x.shape), self.sharded,
                                                          self._per_device(x))
                 for x in arrays)

  def _put_index(self, index):
    return jax.make_array_from_process_local_data(self.sharded, index.reshape(-1))

  def put_state(self, state):
    # From host arrays: with several processes a device array (a restored
    # checkpoint) would be a cross-host transfer, which CPU and GPU lack;
    # host arrays are placed by each process on its own devices (JAX checks
    # they are equal on every process).
    return jax.device_put(jax.device_get(state), self.replicated)

  def get_state(self, state):
    return jax.device_get(state)

  def put_batch(self, batch):
    batch = self._device_batch(batch)
    return {k: jax.make_array_from_process_local_data(
                self.sharded, v.reshape(-1, *v.shape[2:]))
            for k, v in batch.items()}

  @staticmethod
  def get_rows(x) -> np.ndarray:
    return _local_rows(x)


def _gather_rows(*arrays_then_index: jax.Array):
  """One device's batch: rows ``index`` (the last argument) of its copy of each resident array."""
  *arrays, index = arrays_then_index
  return tuple(a[index] for a in arrays)


RUNNERS: dict[str, Callable[..., Runner]] = {
    'pmap': PmapRunner,
    'shard_map': ShardMapRunner,
}


def make_runner(config: ml_collections.ConfigDict, model: nn.Module,
                devices: Sequence[jax.Device] | None = None) -> Runner:
  """The wrapper ``config.parallel`` names, around ``model`` (axis_name=steps.AXIS)."""
  if config.parallel not in RUNNERS:
    raise UserError(f'unknown config.parallel {config.parallel!r}; '
                    f'known: {", ".join(sorted(RUNNERS))}')
  # Runners are memoised: flax modules compare by their fields, so a second
  # run in the same process (a test, a notebook, train -> test) reuses the
  # compiled steps instead of compiling identical programs again.
  augmentation = augment.StepAugment.from_config(config)
  distill_weight = float(config.distill.weight) if 'distill' in config else 0.0
  key = (config.parallel, model, float(config.label_smoothing), int(config.microbatch_size),
         bool(config.tta), augmentation, distill_weight,
         tuple(devices) if devices is not None else None)
  if key not in _runners:
    _runners[key] = RUNNERS[config.parallel](
        model, label_smoothing=config.label_smoothing,
        microbatch_size=config.microbatch_size, tta=config.tta, augmentation=augmentation,
        distill_weight=distill_weight, devices=devices)
    while len(_runners) > 8:
      _runners.popitem(last=False)
  _runners.move_to_end(key)
  return _runners[key]


_runners: 'collections.OrderedDict[tuple, Runner]' = collections.OrderedDict()
