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

The workdir's other record, ``history.json`` (one entry per epoch, written
by the trainer), is read here too, by ``read_history``: evaluation, the
results tables and the validation tables read it the same way.

The data is compared too, since the same config can read changed data: a
folder that gained images is split anew, so the run's validation images
could land in its test split and its epochs would no longer count the same
steps. ``"bcjax_dataset"`` records what the first run read (source, path, a
hash of the content where the source has one, split sizes;
``bcjax.data.fingerprint``) and a resume on anything else is refused in one
line naming what changed, like a config change, and let through by the same
flag (the run's entry then lists ``dataset_changed``).

A resume whose ``config.json`` is missing or unreadable cannot be checked at
all, so it is refused too; with ``--allow_changed_config`` it goes on and
the new record says it was recreated at that step (``config_json_recreated``),
not that the whole run used this config.

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
HISTORY_FILE = 'history.json'
RUNS_KEY = 'bcjax_runs'
DATASET_KEY = 'bcjax_dataset'
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
  return read_with_reason(workdir)[0]


def read_with_reason(workdir: str) -> tuple[dict[str, Any] | None, str]:
  """``(recorded config, '')``, or ``(None, why not)``: 'missing', 'not JSON (...)'."""
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path) as f:
      value = json.load(f)
  except FileNotFoundError:
    return None, 'missing'
  except OSError as e:
    return None, f'unreadable: {files.describe_os_error(e)}'
  except ValueError as e:
    return None, f'not valid JSON ({str(e)[:80]})'
  if not isinstance(value, dict):
    return None, f'not a JSON object but {type(value).__name__}'
  return value, ''


def history_path(workdir: str) -> str:
  """Where the trainer writes a run's epochs (a JSON list, one entry per epoch)."""
  return os.path.join(workdir, HISTORY_FILE)


def read_history(workdir: str) -> list[dict[str, Any]] | None:
  """The run's epochs from ``history.json``; None where it has none.

  An unreadable file raises (OSError, ValueError): whether a copy elsewhere
  (the checkpoint's) may stand in is the caller's choice.
  """
  path = history_path(workdir)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _differences(recorded: dict[str, Any], config) -> tuple[dict[str, tuple[Any, Any]], set]:
  """Every field whose value differs from the record, and the set of free fields."""
  recorded = dict(recorded)
  runs = recorded.pop(RUNS_KEY, [])
  recorded.pop(DATASET_KEY, None)
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
  """The run-changing fields of a resume; a UserError naming them unless allowed.

  A missing or unreadable ``config.json`` is a UserError too unless allowed:
  nothing says what the saved run was.
  """
  recorded, reason = read_with_reason(workdir)
  if recorded is None:
    if not allow_changes:
      raise UserError(
          f'{os.path.join(workdir, CONFIG_FILE)} is {reason}, so this resume cannot be checked '
          'against the run it continues; restore that file, use another --workdir, or pass '
          '--allow_changed_config to continue with this config (recorded as recreated here)')
    return {}
  changes = changed_fields(recorded, config)
  if changes and not allow_changes:
    listed = ', '.join(f'{k} {old!r} -> {new!r}' for k, (old, new) in list(changes.items())[:6])
    more = f' and {len(changes) - 6} more' if len(changes) > 6 else ''
    raise UserError(f'{workdir} holds a run whose config differs in fields that change it '
                    f'({listed}{more}); rerun with its config, use another --workdir, or '
                    'pass --allow_changed_config to continue it anyway')
  return changes


def recorded_dataset(recorded: dict[str, Any]) -> dict[str, Any]:
  """The data the run last read: the first run's, updated by later runs' changes."""
  dataset = dict(recorded.get(DATASET_KEY) or {})
  for run in recorded.get(RUNS_KEY, []):
    dataset.update(run.get('dataset_changed', {}))
  return dataset


def dataset_changes(recorded: dict[str, Any], dataset: dict[str, Any]) -> dict[str, tuple]:
  """``{fact: (recorded, now)}`` for the facts of ``dataset`` the record also has."""
  old = recorded_dataset(recorded)
  return {k: (old[k], v) for k, v in dataset.items() if k in old and old[k] != v}


def check_dataset(workdir: str, dataset: dict[str, Any], *,
                  allow_changes: bool) -> dict[str, tuple]:
  """The changes of a resume's data (``bcjax.data.fingerprint``); a UserError unless allowed.

  Facts the record lacks (a run recorded before they were) are not compared.
  """
  recorded = read(workdir)
  changes = dataset_changes(recorded, dataset) if recorded else {}
  if changes and not allow_changes:
    listed = ', '.join(f'{k} {old!r} -> {new!r}' for k, (old, new) in changes.items())
    raise UserError(f'{workdir} holds a run trained on other data ({listed}); its splits '
                    'would not be the run\'s (validation images could be in the test split '
                    'now): rerun on the data it was trained on, use another --workdir, or '
                    'pass --allow_changed_config to continue it anyway')
  return changes


def record(workdir: str, config, *, from_step: int, fresh: bool,
           dataset: dict[str, Any] | None = None) -> None:
  """Writes (atomically) a fresh run's config, or appends this resumed run's differences.

  ``dataset`` (``bcjax.data.fingerprint``) is recorded with a fresh run; a
  resume records the facts that differ. A resume that finds no readable
  record (allowed by the caller) starts one and says so in its entry.
  """
  recorded = None if fresh else read(workdir)
  recreated = recorded is None and not fresh
  if recorded is None:
    recorded = _as_dict(config)
    if dataset is not None:
      recorded[DATASET_KEY] = dataset
  differences, _ = _differences(recorded, config)
  entry = {'started': datetime.datetime.now().isoformat(timespec='seconds'),
           'from_step': int(from_step), 'config_name': config.name,
           'changed': {k: new for k, (_, new) in differences.items()}}
  if dataset is not None and not recreated:
    if DATASET_KEY not in recorded:  # Recorded before datasets were: this run's is the first.
      recorded[DATASET_KEY] = dataset
    changed = dataset_changes(recorded, dataset)
    if changed:
      entry['dataset_changed'] = {k: new for k, (_, new) in changed.items()}
  if recreated:
    entry['config_json_recreated'] = (
        f'config.json was missing or unreadable at step {from_step}: the config and data '
        'of the steps before are not known')
  recorded[RUNS_KEY] = list(recorded.get(RUNS_KEY, [])) + [entry]
  files.write_json(os.path.join(workdir, CONFIG_FILE), recorded)
