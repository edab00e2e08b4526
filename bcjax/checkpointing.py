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
a save leaves the previous checkpoint intact.
"""

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from bcjax.errors import UserError

KINDS = ('latest', 'best')


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(os.path.expanduser(workdir)), 'checkpoints')


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
          create=not read_only)  # (orbax's read_only=True only adds warnings.)
      self.managers[kind] = ocp.CheckpointManager(
          os.path.join(self.directory, kind), options=options, item_names=('state', 'meta'))

  def step(self, kind: str) -> int | None:
    """The newest step saved as ``kind``, or None."""
    return self.managers[kind].latest_step()

  def save(self, kind: str, step: int, state, meta: dict[str, Any]) -> None:
    """Saves host ``state`` and JSON ``meta`` as ``kind`` at ``step``.

    A step already saved is left as it is: training is deterministic, so a
    replayed step (a run resumed from before its last save) has the same state.
    """
    manager = self.managers[kind]
    if step in manager.all_steps():
      return
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)
    manager.wait_until_finished()

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

  def restore(self, which: str, target) -> tuple[Any, dict[str, Any]]:
    """Restores ('best' | 'latest' | step) into the structure of host ``target``."""
    kind, step = self.find(which)
    try:
      restored = self.managers[kind].restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(f'checkpoint {kind}/{step} in {self.directory} does not fit this '
                      f'config (a different model or optimiser?): '
                      f'{str(e).splitlines()[0][:200]}') from None
    return restored.state, dict(restored.meta)

  def restore_variables(self, which: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's ``params`` and ``batch_stats`` as saved (no target needed), and meta."""
    kind, step = self.find(which)
    restored = self.managers[kind].restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    state = restored.state
    variables = {'params': state['params'], 'batch_stats': state.get('batch_stats') or {}}
    return jax.device_get(variables), dict(restored.meta)

  def read_meta(self, which: str) -> dict[str, Any]:
    kind, step = self.find(which)
    return dict(self.managers[kind].restore(
        step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)

  def close(self) -> None:
    for m in self.managers.values():
      m.close()


def load_params(path: str) -> dict[str, Any]:
  """Raw parameters from a workdir (its best, else latest) or a checkpoint dir.

  Used for ``config.model.extractor_checkpoint``: accepts a run's workdir,
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
