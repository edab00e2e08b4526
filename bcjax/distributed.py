"""Multi-process start-up: JAX's own runtime, never a home-made one.

``launch.py`` calls :func:`initialize_from_flags` before anything touches a
device; a test or a notebook calls :func:`initialize` itself::

    distributed.initialize('10.0.0.1:8476', num_processes=2, process_id=0)
    train.train_and_evaluate(config, workdir)   # the same call as one process

* ``--coordinator_address/--num_processes/--process_id``: a cluster started by
  hand; all three go together.
* ``--distributed`` alone: JAX detects the cluster itself - SLURM
  (``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_STEP_NODELIST``, ...), Cloud
  TPU (the TPU VM's metadata), Open MPI, Kubernetes.
* neither: nothing happens and the run is single-process.

After it, ``jax.devices()`` lists every process's devices and
``jax.local_devices()`` this process's. The rest of bcjax is written for that:
each process reads its own shard of the data (bcjax/data), the wrappers in
bcjax/parallel.py map the steps over all devices, orbax saves from all
processes, and only process 0 writes logs, reports and figures.

CPU collectives: on CPU, an all-reduce across processes needs a transport.
JAX's is chosen by ``jax_cpu_collectives_implementation``; bcjax sets it to
``gloo`` (TCP, nothing to install) unless the environment names one
(``JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi``). Without it, a CPU-only
multi-process run fails at the first cross-process ``psum``. GPU and TPU runs
use NCCL / ICI and ignore the setting.
"""

import os

from absl import flags
import jax

from bcjax.errors import UserError

CPU_COLLECTIVES = 'gloo'


def define_flags() -> None:
  flags.DEFINE_bool('distributed', False,
                    'Call jax.distributed.initialize() and let JAX detect the cluster '
                    '(SLURM, Cloud TPU, ...).')
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0, for a multi-process run started by hand.')
  flags.DEFINE_integer('num_processes', None, 'Number of processes in the run.')
  flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes-1.')


def _set_cpu_collectives() -> None:
  """Gloo for cross-process collectives on CPU, unless the user chose one.

  Must run before the CPU backend is created, i.e. before the first device
  is touched - ``jax.distributed.initialize`` has the same requirement.
  """
  if 'JAX_CPU_COLLECTIVES_IMPLEMENTATION' not in os.environ:
    jax.config.update('jax_cpu_collectives_implementation', CPU_COLLECTIVES)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> bool:
  """Starts JAX's multi-process runtime when asked to; a no-op otherwise.

  Returns whether the runtime was started. ``auto`` with no explicit
  arguments lets JAX detect the cluster (SLURM, Cloud TPU, ...).
  """
  explicit = (coordinator_address, num_processes, process_id)
  if all(v is None for v in explicit) and not auto:
    return False
  if any(v is None for v in explicit) and not all(v is None for v in explicit):
    raise UserError('--coordinator_address, --num_processes and --process_id go together')
  if jax.distributed.is_initialized():
    raise UserError('jax.distributed is already initialized in this process')
  _set_cpu_collectives()
  try:
    if auto and coordinator_address is None:
      jax.distributed.initialize()
    else:
      jax.distributed.initialize(coordinator_address=coordinator_address,
                                 num_processes=num_processes, process_id=process_id)
  except ValueError as e:  # No cluster detected, or a bad process_id.
    raise UserError(f'cannot start the multi-process runtime: {e} (outside SLURM or a Cloud '
                    'TPU VM, pass --coordinator_address, --num_processes and --process_id)'
                    ) from None
  if jax.process_index() == 0:
    print(f'jax.distributed: {jax.process_count()} processes, {jax.device_count()} '
          f'{jax.devices()[0].platform} devices ({jax.local_device_count()} per process)',
          flush=True)
  return True


def initialize_from_flags(f: flags.FlagValues) -> bool:
  return initialize(f.coordinator_address, f.num_processes, f.process_id, auto=f.distributed)
