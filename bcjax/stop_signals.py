"""SIGTERM / SIGINT during training: finish the step, save, then exit as asked.

    with stop_signals.StopSignals() as stop:
      for batch in batches:
        state = step(state, batch)
        if stop.agreed(sync_point=log_step):
          save(state)
          stop.reraise()   # Ends the process the way the signal asked.

A signal only sets a flag, checked after each step, so a checkpoint is never
written from a signal handler in the middle of a step. With several processes
(bcjax/distributed.py) they agree first, at sync points, since saving is
collective.

A signal the process inherited as ignored (``cmd &`` in a script starts
``cmd`` with SIGINT ignored) is caught all the same: sent on purpose, it
stops the run once, as it would otherwise. Delivering it again must then end
the process, so an inherited "ignore" becomes the default action for that
delivery, and :meth:`StopSignals.reraise` never returns: a handler that
returns (or ignores) ends in ``SystemExit(128 + signal)`` instead of a loop
that goes on training past its last save.
"""

import os
import signal
import threading
import time

import jax
import numpy as np
from jax.experimental import multihost_utils


class StopSignals:
  """Turns the first SIGTERM / SIGINT into a flag the loop checks after each step.

  After the loop has saved, :meth:`reraise` restores the original handlers
  and delivers the signal again, so the process ends the way it was asked to
  (SIGINT: KeyboardInterrupt; SIGTERM: termination). A second signal while
  saving is delivered at once.
  """
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received: int | None = None
    self._old = {}

  def _original(self, signum: int):
    """The handler before ours; an inherited SIG_IGN (or a C handler) counts as the default."""
    old = self._old.get(signum, signal.SIG_DFL)
    return signal.SIG_DFL if old in (signal.SIG_IGN, None) else old

  def _handle(self, signum, frame):
    del frame
    self.received = signum
    signal.signal(signum, self._original(signum))  # A second one acts at once.

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._old[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}

  @property
  def name(self) -> str:
    return signal.Signals(self.received).name

  def agreed(self, sync_point: bool) -> bool:
    """Whether to stop now; with several processes, the same answer on all of them.

    A signal reaches each process at its own step (SLURM signals every
    task), but saving is collective, so the processes must stop at the same
    step: they compare flags at ``sync_point`` steps (log steps, epoch ends)
    and all stop if any got one. Those without a signal of their own then
    end as if sent SIGTERM.
    """
    if jax.process_count() == 1:
      return self.received is not None
    if not sync_point:
      return False
    got = multihost_utils.process_allgather(np.int32(self.received or 0))
    if not np.any(got):
      return False
    self.received = self.received or signal.SIGTERM
    return True

  def reraise(self) -> None:
    """Ends the process the way the signal asked; never returns."""
    original = self._original(self.received)
    self.__exit__()
    signal.signal(self.received, original)  # An inherited SIG_IGN: the default this once.
    os.kill(os.getpid(), self.received)
    time.sleep(1)  # Let the default action happen here, not in the next statement.
    raise SystemExit(128 + self.received)  # Its handler returned: stop all the same.
