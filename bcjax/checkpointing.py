"""Orbax checkpoints of a run: the latest and the best, under ``<workdir>/checkpoints``.

Layout::

    <workdir>/checkpoints/latest/<step>/{state,meta}   # every epoch and on SIGTERM/SIGINT
    <workdir>/checkpoints/best/<step>/{state,meta}     # best validation accuracy so far

``state`` is the whole :class:`~bcjax.train_state.TrainState` (parameters,
optimiser moments, BatchNorm statistics, step) as host arrays; ``meta`` is
JSON: the epoch history, the best validation accuracy, the class names, the
partial sums of an epoch that was interrupted mid-way. Resuming restores both,
so a resumed run continues exactly where the saved one stood.

Usage::

    ckpts = checkpointing.Checkpoints(workdir, keep=config.keep_checkpoints)
    ckpts.save('latest', step, host_state, meta)
    state, meta = ckpts.restore('best', target=host_state)

Saves are synchronous: a checkpoint is small next to an epoch, and a save that
returned is on disk before the next step can fail. Orbax writes each step to a
temporary directory and renames it when complete, so a process killed during
a save leaves the previous checkpoint intact; a save that fails (disk full,
read-only folder) is one error line naming the last good checkpoint.

Damage is told apart from a mismatch. Every restore first reads the step as
saved, with no target: if that fails (a truncated or zeroed data file, a
missing manifest, metadata or sub-folder) the step is *damaged*
(:class:`DamagedCheckpointError`). Only a step that reads whole is compared
with the config's state: different parameters mean another model, a state
that then does not restore means another optimiser
(:class:`MismatchedCheckpointError`). Orbax itself cannot say which: a
damaged step and a foreign one both fail inside tensorstore, and a target of
other shapes restores silently with the saved shapes.

:meth:`Checkpoints.resume` walks the kept ``latest`` steps newest first,
then ``best``: a damaged step is moved to ``checkpoints/damaged/`` (kept, not
deleted, and out of the way of the step's next save) with one warning line.
"""

import logging
import os
import re
import shutil
import sys
from typing import Any, Callable

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from bcjax import files
from bcjax.errors import UserError

KINDS = ('latest', 'best')
DAMAGED = 'damaged'  # checkpoints/damaged/<kind>-<step>: set aside by resume().


class DamagedCheckpointError(UserError):
  """A saved step that cannot be read back: its files are truncated, zeroed or missing."""

  def __init__(self, message: str, reason: str = ''):
    super().__init__(message)
    self.reason = reason


class MismatchedCheckpointError(UserError):
  """A step that reads whole but holds another model's or optimiser's state."""


def _drop_closed_loop_noise(previous: Callable) -> Callable:
  """An unraisable hook that hides asyncio's 'Event loop is closed' after a failed restore.

  When tensorstore fails to read a damaged step, orbax's event loop closes
  while tensorstore still holds callbacks into it; each one later prints a
  RuntimeError traceback through ``sys.unraisablehook`` (and asyncio logs
  'Task exception was never retrieved'). The failure itself is reported as
  one line by this module, so only that exact noise is dropped.
  """
  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == 'Event loop is closed':
      return
    previous(unraisable)
  hook.bcjax_quiet = True
  return hook


if not getattr(sys.unraisablehook, 'bcjax_quiet', False):
  sys.unraisablehook = _drop_closed_loop_noise(sys.unraisablehook)


class _NoUnretrievedTasks:
  def filter(self, record) -> bool:
    return 'exception was never retrieved' not in record.getMessage()


logging.getLogger('asyncio').addFilter(_NoUnretrievedTasks())


class _NoThreadTracebacks:
  """Drops orbax's logged tracebacks of its worker threads.

  A save that fails in orbax's threads (disk full) logs each thread's
  exception with its traceback, then raises it to the caller, here
  :meth:`Checkpoints.save`, which reports it as one line.
  """

  def filter(self, record) -> bool:
    return '_SignalingThread.run() raised an exception' not in record.getMessage()


logging.getLogger('absl').addFilter(_NoThreadTracebacks())


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), 'checkpoints')


def _short_reason(e: BaseException) -> str:
  """One short clause for why a step did not read: tensorstore's status and the array."""
  text = str(e).strip().strip("'\"")
  if 'No space left on device' in text or "os_error_code='28'" in text:
    return 'no space left on device'
  status = re.match(r'([A-Z_]+): ', text)
  array = re.search(r'Error reading "([^"/]+)', text) or re.search(r'at "([^"/]+)', text)
  if status:
    what = status.group(1).lower().replace('_', ' ')
    return what + (f' reading {array.group(1)}' if array else '')
  first = text.splitlines()[0] if text else type(e).__name__
  return first[:160]


def _params(tree) -> Any:
  return tree.get('params') if isinstance(tree, dict) else getattr(tree, 'params', None)


def _shapes(tree) -> dict[str, tuple]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): tuple(np.shape(leaf)) for path, leaf in flat}


class Checkpoints:
  """The two checkpoint series of one workdir."""

  def __init__(self, workdir: str, keep: int = 2, read_only: bool = False):
    self.directory = checkpoint_dir(workdir)
    if read_only and not os.path.isdir(self.directory):
      raise UserError(f'no checkpoints in {workdir} (expected {self.directory}); '
                      'train there first or pass the right --workdir')
    self.managers = {}
    for kind, max_to_keep in (('latest', max(1, keep)), ('best', 1)):
      options = ocp.CheckpointManagerOptions(
          max_to_keep=max_to_keep, enable_async_checkpointing=False,
          # A save killed mid-way leaves a temporary folder; the next run clears it.
          cleanup_tmp_directories=not read_only,
          create=not read_only)  # (orbax's read_only=True only adds warnings.)
      self.managers[kind] = ocp.CheckpointManager(
          os.path.join(self.directory, kind), options=options, item_names=('state', 'meta'))

  def step(self, kind: str) -> int | None:
    """The newest step saved as ``kind``, or None."""
    return self.managers[kind].latest_step()

  def last_good(self) -> str:
    """Where the newest complete step is, ``latest`` or ``best``, for error lines ('none').

    A save that failed at the first epoch's ``latest`` may follow a complete
    ``best`` of the same step, which a rerun resumes from.
    """
    found = [(step, kind == 'latest', kind) for kind in KINDS
             for step in [self.step(kind)] if step is not None]
    if not found:
      return 'none'
    step, _, kind = max(found)
    return f'{self.directory}/{kind}/{step}'

  def save(self, kind: str, step: int, state, meta: dict[str, Any]) -> None:
    """Saves host ``state`` and JSON ``meta`` as ``kind`` at ``step``.

    A step already saved is left as it is: training is deterministic, so a
    replayed step (a run resumed from before its last save) has the same state.
    A save that fails (disk full, read-only folder) is a UserError naming the
    folder and the last good checkpoint, which orbax has left untouched.
    """
    manager = self.managers[kind]
    if step in manager.all_steps():
      return
    try:
      manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
      manager.wait_until_finished()
    except (OSError, ValueError, RuntimeError) as e:
      reason = files.describe_os_error(e) if isinstance(e, OSError) else _short_reason(e)
      raise UserError(f'cannot save checkpoint {kind}/{step} in {self.directory} ({reason}); '
                      f'last good checkpoint: {self.last_good()}; free space or fix the '
                      'folder, then rerun the same command to resume from it') from None

  def describe_others(self, kind: str, step: int) -> str:
    """'best 12; latest 10, 12' without (kind, step): what else --checkpoint can name."""
    parts = []
    for k in KINDS:
      steps = [s for s in self.managers[k].all_steps() if (k, s) != (kind, step)]
      if steps:
        parts.append(f'{k} {", ".join(map(str, sorted(steps)))}')
    return '; '.join(parts) or 'none'

  def find(self, which: str) -> tuple[str, int]:
    """(kind, step) for 'best', 'latest' or a step number given as a string."""
    if which in KINDS:
      step = self.step(which)
      if step is None and which == 'best':  # E.g. interrupted before any validation.
        which, step = 'latest', self.step('latest')
      if step is None:
        raise UserError(f'no {which!r} checkpoint in {self.directory}')
      return which, step
    try:
      step = int(which)
    except ValueError:
      raise UserError(f"checkpoint must be 'best', 'latest' or a step number, "
                      f'got {which!r}') from None
    for kind in KINDS:
      if step in self.managers[kind].all_steps():
        return kind, step
    steps = sorted({s for m in self.managers.values() for s in m.all_steps()})
    raise UserError(f'no checkpoint at step {step} in {self.directory}; '
                    f'saved steps: {", ".join(map(str, steps)) or "none"}')

  def _read(self, kind: str, step: int, target=None) -> tuple[Any, dict[str, Any]]:
    """The step as saved (no ``target``) or into ``target``'s structure; raises as orbax does."""
    restored = self.managers[kind].restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    meta = restored.meta
    if not isinstance(meta, dict):
      raise ValueError(f'meta is {type(meta).__name__}, not a JSON object')
    return restored.state, dict(meta)

  def read_raw(self, kind: str, step: int) -> tuple[Any, dict[str, Any]]:
    """The step as saved, or DamagedCheckpointError naming it and the others."""
    try:
      return self._read(kind, step)
    except Exception as e:  # pylint: disable=broad-except  (any failure to read is damage)
      reason = _short_reason(e)
      raise DamagedCheckpointError(
          f'checkpoint {kind}/{step} in {self.directory} is damaged ({reason}); '
          f'other checkpoints: {self.describe_others(kind, step)} (pass --checkpoint=latest, '
          '--checkpoint=best or a step number)', reason) from None

  def _restore_step(self, kind: str, step: int, target) -> tuple[Any, dict[str, Any]]:
    raw, _ = self.read_raw(kind, step)
    want, got = _shapes(_params(target)), _shapes(_params(raw))
    if want != got:
      differ = sorted(set(want) ^ set(got)) or sorted(k for k in want if want[k] != got[k])
      raise MismatchedCheckpointError(
          f'checkpoint {kind}/{step} in {self.directory} holds another model\'s parameters '
          f'(first difference: {differ[0]}); pass the config it was trained with, or another '
          '--workdir')
    try:
      return self._read(kind, step, target)
    except Exception as e:  # pylint: disable=broad-except  (the data read whole just before)
      raise MismatchedCheckpointError(
          f'checkpoint {kind}/{step} in {self.directory} holds the same model but another '
          f'optimiser state ({_short_reason(e)}); pass the config.optimizer it was trained '
          'with') from None

  def restore(self, which: str, target) -> tuple[Any, dict[str, Any]]:
    """Restores ('best' | 'latest' | step) into the structure of host ``target``.

    Raises DamagedCheckpointError or MismatchedCheckpointError (both UserErrors).
    """
    kind, step = self.find(which)
    return self._restore_step(kind, step, target)

  def set_aside(self, kind: str, step: int) -> str:
    """Moves a damaged step to ``checkpoints/damaged/<kind>-<step>``; returns where."""
    source = os.path.join(self.directory, kind, str(step))
    dest = os.path.join(self.directory, DAMAGED, f'{kind}-{step}')
    n = 1
    while os.path.exists(dest):
      n += 1
      dest = os.path.join(self.directory, DAMAGED, f'{kind}-{step}.{n}')
    if jax.process_index() == 0:  # Every process found it damaged; one moves it.
      os.makedirs(os.path.dirname(dest), exist_ok=True)
      shutil.move(source, dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f'bcjax.checkpointing.set_aside.{kind}.{step}')
    self.managers[kind].reload()
    return dest

  def resume(self, target, warn) -> tuple[Any, dict[str, Any], str, int] | None:
    """The newest readable state to resume from: ``latest`` steps newest first, then ``best``.

    Each damaged step is set aside with one ``warn`` line; a damaged ``best``
    that is not needed is set aside too, so the final test never meets it.
    A step of another model or optimiser is an error, not skipped. Returns
    ``(state, meta, kind, step)``, or None when nothing was saved (or nothing
    readable was: the run then starts afresh, deterministically the same).
    """
    found = None
    candidates = [('latest', s) for s in sorted(self.managers['latest'].all_steps(),
                                                reverse=True)]
    candidates += [('best', s) for s in self.managers['best'].all_steps()]
    for kind, step in candidates:
      if found is not None and kind == 'latest':
        continue
      try:
        state, meta = self._restore_step(kind, step, target)
      except DamagedCheckpointError as e:
        where = self.set_aside(kind, step)
        warn(f'checkpoint {kind}/{step} is damaged ({e.reason}); moved to {where}'
             + ('' if found else '; trying the previous one'))
        continue
      if found is None:
        found = (state, meta, kind, step)
    return found

  def restore_variables(self, which: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's ``params`` and ``batch_stats`` as saved (no target needed), and meta.

    ``params`` are the weights' moving average where that validated better
    (``config.ema_decay``, ``meta['eval_weights'] == 'ema'``).
    """
    kind, step = self.find(which)
    state, meta = self.read_raw(kind, step)
    if not isinstance(state, dict) or 'params' not in state:
      raise DamagedCheckpointError(
          f'checkpoint {kind}/{step} in {self.directory} is damaged (no parameters in it); '
          f'other checkpoints: {self.describe_others(kind, step)}', 'no parameters in it')
    variables = {'params': validated_params(state['params'], state.get('ema_params'), meta),
                 'batch_stats': state.get('batch_stats') or {}}
    return jax.device_get(variables), meta

  def close(self) -> None:
    for m in self.managers.values():
      m.close()


def validated_params(params, ema_params, meta: dict[str, Any]):
  """The weights a checkpoint is the model with: ``ema_params`` where they validated better.

  With ``config.ema_decay`` > 0 the trainer validates both the weights and
  their moving average and records the better in ``meta['eval_weights']``;
  testing, evaluation and inference all use that one.
  """
  return ema_params if meta.get('eval_weights') == 'ema' and ema_params else params


def load_params(path: str) -> dict[str, Any]:
  """Raw parameters from a workdir (its best, else latest) or a checkpoint dir.

  Used for ``config.init.checkpoint``: accepts a run's workdir,
  its ``checkpoints/{best,latest}`` directory or one ``<step>`` directory.
  """
  path = os.path.abspath(os.path.expanduser(path))
  step_dir = None
  if os.path.isdir(os.path.join(path, 'state')):
    step_dir = path
  else:
    for series in (os.path.join(path, 'checkpoints', 'best'),
                   os.path.join(path, 'checkpoints', 'latest'), path):
      steps = [int(s) for s in os.listdir(series) if s.isdigit()] if os.path.isdir(series) else []
      if steps:
        step_dir = os.path.join(series, str(max(steps)))
        break
  if step_dir is None:
    raise UserError(f'no checkpoint found at {path}')
  return ocp.StandardCheckpointer().restore(os.path.join(step_dir, 'state'))['params']
