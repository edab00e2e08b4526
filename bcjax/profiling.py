"""Where a run's time goes: a ``jax.profiler`` trace of chosen steps, and the wall clock.

A trace of chosen train steps: ``config.profile_steps = (first, last)``.

    python launch.py --config configs/cnn_lstm.py:tiny --workdir /tmp/prof \
        --config.profile_steps='(3, 5)'

traces global steps 3 to 5 (1-based, as the console counts them) into
``<workdir>/profile/plugins/profile/<run>/``: the ``.xplane.pb`` that
TensorBoard's profile plugin reads (``tensorboard --logdir <workdir>/profile``),
and ``perfetto_trace.json.gz`` for https://ui.perfetto.dev. Each traced step
is a ``StepTraceAnnotation``, so the viewers split the timeline by step. The
first step of a run includes its compilation: trace a few steps in
(``benchmarks/README.md``, "Profiling a training run").

The train loop calls, around each step::

    profiler.start(step + 1)
    state, metrics = runner.train_step(state, batch, rng)
    profiler.stop(step + 1, state)  # waits for the step to finish before closing the trace

and :meth:`StepProfiler.close` in its ``finally``, so an interrupted run still
writes what it traced.

Every run also tallies its wall time by phase (:class:`WallClock`): setup
(data, parameters, placing the split), the first train step's call (its
compile), the other train steps, validation, checkpoints and the test. It is
the figure a user waits for, which a per-step rate does not give; the train
loop prints it at the end and appends it to ``<workdir>/wall_time.json``, one
entry per process run, so a resumed run's parts add up.
"""

import collections
import contextlib
import os
import time
from typing import Any, Iterator, Sequence

import jax

from bcjax.errors import UserError


def check(profile_steps: Sequence[int]) -> tuple[int, int] | None:
  """``(first, last)`` from the config field, None when off; a UserError if malformed."""
  if not profile_steps:
    return None
  steps = tuple(profile_steps)
  if (len(steps) != 2 or not all(isinstance(s, int) for s in steps)
      or not 1 <= steps[0] <= steps[1]):
    raise UserError(f'config.profile_steps={profile_steps!r}: give (first, last) global steps, '
                    '1 <= first <= last, or () for none')
  return steps


class StepProfiler:
  """Starts a trace before step ``first`` and stops it after step ``last``."""

  def __init__(self, profile_steps: Sequence[int], workdir: str):
    self.steps = check(profile_steps)
    self.log_dir = os.path.join(workdir, 'profile')
    self.active = False
    self._annotation = contextlib.nullcontext()

  def start(self, step: int) -> None:
    """Before ``step`` runs: opens the trace at ``first``, annotates every traced step."""
    if self.steps is None:
      return
    first, last = self.steps
    if step == first or (first < step <= last and not self.active):  # Resumed inside the range.
      jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
      self.active = True
    if self.active:
      self._annotation = jax.profiler.StepTraceAnnotation('train', step_num=step)
      self._annotation.__enter__()

  def stop(self, step: int, outputs: Any) -> None:
    """After ``step`` ran: closes its annotation and, at ``last``, the trace."""
    if not self.active:
      return
    jax.block_until_ready(outputs)  # The device work belongs inside the step.
    self._annotation.__exit__(None, None, None)
    self._annotation = contextlib.nullcontext()
    if step >= self.steps[1]:
      self.close()

  def close(self) -> None:
    """Writes the trace if one is open (at ``last``, or when the loop ends early)."""
    if self.active:
      self._annotation.__exit__(None, None, None)  # A step that raised leaves one open.
      self._annotation = contextlib.nullcontext()
      self.active = False
      jax.profiler.stop_trace()
      if jax.process_index() == 0:
        print(f'profile of steps {self.steps[0]}-{self.steps[1]} written to {self.log_dir}',
              flush=True)


class WallClock:
  """Seconds of one process's run by phase; what no phase claims is ``other``.

      clock = WallClock()
      with clock.phase('validation'):
        ...
      clock.summary()  # {'total': ..., 'validation': ..., 'other': ...}

  Device work is asynchronous, so a phase that only dispatches steps is
  charged when a later phase waits on them: the train loop's phases end at
  points that wait anyway (metrics pulled at log steps, validation reading
  its results), which keeps the tally honest to within one log window.
  """

  PHASES = ('setup', 'compile', 'train', 'validation', 'checkpoints', 'test')

  def __init__(self):
    self.started = time.perf_counter()
    self.seconds: collections.Counter = collections.Counter()

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    self.add(name, 0.0)  # An unknown name fails here, before the work.
    t = time.perf_counter()
    try:
      yield
    finally:
      self.add(name, time.perf_counter() - t)

  def add(self, name: str, seconds: float) -> None:
    """Moves ``seconds`` already measured into ``name`` (no phase may overlap another)."""
    if name not in self.PHASES:
      raise ValueError(f'unknown phase {name!r}; known: {self.PHASES}')
    self.seconds[name] += seconds

  def summary(self) -> dict[str, float]:
    total = time.perf_counter() - self.started
    out = {'total': total, **{p: self.seconds[p] for p in self.PHASES}}
    out['other'] = max(total - sum(self.seconds.values()), 0.0)
    return out

  @staticmethod
  def describe(summary: dict[str, float]) -> str:
    parts = ', '.join(f'{p} {summary[p]:.1f}' for p in (*WallClock.PHASES, 'other')
                      if summary.get(p, 0.0) >= 0.05)
    return f"wall time {summary['total']:.1f} s ({parts})"
