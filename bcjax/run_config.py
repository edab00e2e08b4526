"""A workdir's ``config.json``: the config its run was made with, and what each resume used.

Resuming restores a state and continues the same run, which is only true if
the config still describes that run: a resume with another batch size, seed,
data or model would mix two experiments under one name and one set of
metrics. So before any work a resume compares the config with the recorded
one and refuses changes to fields that change the run, naming them::

    changes = run_config.check_resume(workdir, config, allow_changes=False)
    run_config.record(workdir, config, from_step=step, fresh=step == 0)

``--allow_changed_config`` accepts them (e.g. a run moved from packed data on
a GPU host to the original images on a CPU); either way ``config.json``
lists every run of the workdir under ``"bcjax_runs"`` with the step it
started from and the fields it changed, so the record says what was used.
The top level stays the first run's config (``bcjax/ensemble.py`` reads its
model fields).

Fields that cannot change the numbers are free to change: where things are
written or cached, how often to log, evaluate or checkpoint, how steps are
mapped over devices, the convolution lowering (the same function), the
evaluation batch size, test-time augmentation and the steps profiled.
``num_epochs`` is free with a constant learning rate (a run extended) but
not with a schedule that depends on it. A field the recorded config lacks
(added to bcjax later) is not compared.
"""

import datetime
import json
import os
from typing import Any

from bcjax import files
from bcjax.errors import UserError

CONFIG_FILE = 'config.json'
RUNS_KEY = 'bcjax_runs'
FREE_FIELDS = frozenset({
    'name', 'data.tfds_dir', 'data.prefetch', 'data.cache', 'data.split', 'log_every_steps',
    'keep_checkpoints', 'eval_batch_size', 'tta', 'checkpoint_every_epochs',
    'eval_every_epochs', 'parallel', 'model.conv_impl', 'profile_steps',
})


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      out.update(_flatten(value, name + '.'))
    else:
      out[name] = list(value) if isinstance(value, tuple) else value
  return out


def _as_dict(config) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def read(workdir: str) -> dict[str, Any] | None:
  """The recorded config (with its runs), or None if there is none or it is unreadable."""
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def _differences(recorded: dict[str, Any], config) -> tuple[dict[str, tuple[Any, Any]], set]:
  """Every field whose value differs from the record, and the set of free fields."""
  recorded = dict(recorded)
  runs = recorded.pop(RUNS_KEY, [])
  old = _flatten(recorded)
  for run in runs:  # Later runs' changes are the current record.
    old.update(run.get('changed', {}))
  new = _flatten(_as_dict(config))
  free = set(FREE_FIELDS)
  if new.get('schedule.name', 'constant') == 'constant' and old.get(
      'schedule.name', 'constant') == 'constant':
    free.add('num_epochs')
  return {k: (old[k], new[k]) for k in sorted(new) if k in old and old[k] != new[k]}, free


def changed_fields(recorded: dict[str, Any], config) -> dict[str, tuple[Any, Any]]:
  """``{field: (recorded value, new value)}`` for the fields that change the run."""
  differences, free = _differences(recorded, config)
  return {k: v for k, v in differences.items() if k not in free}


def check_resume(workdir: str, config, *, allow_changes: bool) -> dict[str, tuple[Any, Any]]:
  """The run-changing fields of a resume; a UserError naming them unless allowed."""
  recorded = read(workdir)
  if recorded is None:
    return {}
  changes = changed_fields(recorded, config)
  if changes and not allow_changes:
    listed = ', '.join(f'{k} {old!r} -> {new!r}' for k, (old, new) in list(changes.items())[:6])
    more = f' and {len(changes) - 6} more' if len(changes) > 6 else ''
    raise UserError(f'{workdir} holds a run whose config differs in fields that change it '
                    f'({listed}{more}); rerun with its config, use another --workdir, or '
                    'pass --allow_changed_config to continue it anyway')
  return changes


def record(workdir: str, config, *, from_step: int, fresh: bool) -> None:
  """Writes (atomically) a fresh run's config, or appends this resumed run's differences."""
  recorded = None if fresh else read(workdir)
  if recorded is None:
    recorded = _as_dict(config)
  differences, _ = _differences(recorded, config)
  runs = list(recorded.get(RUNS_KEY, []))
  runs.append({'started': datetime.datetime.now().isoformat(timespec='seconds'),
               'from_step': int(from_step), 'config_name': config.name,
               'changed': {k: new for k, (_, new) in differences.items()}})
  recorded[RUNS_KEY] = runs
  files.write_json(os.path.join(workdir, CONFIG_FILE), recorded)
