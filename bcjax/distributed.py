"""Multi-process start-up: JAX's own runtime, never a home-made one.

``launch.py`` calls :func:`initialize_from_flags` before anything touches a
device. With ``--coordinator_address/--num_processes/--process_id`` it calls
``jax.distributed.initialize`` with them; with ``--distributed`` alone JAX
detects the cluster itself (SLURM, Cloud TPU, ...). Without either, nothing
happens and the run is single-process.
"""

from absl import flags
import jax

from bcjax.errors import UserError


def define_flags() -> None:
  flags.DEFINE_bool('distributed', False,
                    'Call jax.distributed.initialize() and let JAX detect the cluster '
                    '(SLURM, Cloud TPU, ...).')
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0, for a multi-process run started by hand.')
  flags.DEFINE_integer('num_processes', None, 'Number of processes in the run.')
  flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes-1.')


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False) -> None:
  """Starts JAX's multi-process runtime when asked to; a no-op otherwise."""
  explicit = (coordinator_address, num_processes, process_id)
  if all(v is None for v in explicit):
    if auto:
      jax.distributed.initialize()
    return
  if any(v is None for v in explicit):
    raise UserError('--coordinator_address, --num_processes and --process_id go together')
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)


def initialize_from_flags(f: flags.FlagValues) -> None:
  initialize(f.coordinator_address, f.num_processes, f.process_id, auto=f.distributed)
