"""Ensemble members: several trained workdirs, each with its own model, one averaged answer.

``--mode=eval`` (bcjax/evaluate.py) and ``--mode=predict`` (bcjax/predict.py)
take more workdirs with ``--ensemble``; both run each member with
:func:`for_members` and average with :func:`average`. Averaging saved
predictions CSVs instead is bcjax/ensemble.py.

Members may differ in model and image size: each member is rebuilt from the
``config.json`` its training run wrote (model, image size, dtype), while what
the command line says about the data and evaluation (path, split, batch size,
test-time augmentation) applies to all. Every member sees the same examples
in the same order (evaluation never shuffles); :func:`average` checks it.
"""

import json
import os
from typing import Any, Callable, Sequence

import ml_collections
import numpy as np

from bcjax.errors import UserError

# Fields a member takes from its own training config; the rest come from the
# command line's config.
MEMBER_FIELDS = ('model', 'image_size', 'num_classes', 'dtype')
# Trainer settings an older config.json holds under config.model (now
# config.init and config.optimizer.frozen): such a run still rebuilds its model.
MOVED_MODEL_FIELDS = ('extractor_checkpoint', 'freeze_extractor')


def member_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """``config`` with the model fields of the run that trained ``workdir``."""
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise UserError(f'{workdir} has no config.json: is it a bcjax workdir?')
  try:
    with open(path) as f:
      trained = json.load(f)
  except (OSError, ValueError) as e:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)[:80]
    raise UserError(f'{path} is unreadable ({reason}); an ensemble member\'s model is read '
                    'from it: restore it from a copy, or leave that member out') from None
  if not isinstance(trained, dict):
    raise UserError(f'{path} is not a JSON object; an ensemble member\'s model is read from '
                    'it: restore it from a copy, or leave that member out')
  member = ml_collections.ConfigDict(config.to_dict())
  for field in MEMBER_FIELDS:
    if field in trained:
      value = trained[field]
      if field == 'model' and isinstance(value, dict):
        value = {k: v for k, v in value.items() if k not in MOVED_MODEL_FIELDS}
      member[field] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
  return member


def for_members(config: ml_collections.ConfigDict, workdir: str, ensemble: Sequence[str],
                fn: Callable[[ml_collections.ConfigDict, str], Any]) -> list[Any]:
  """``fn(member config, member workdir)`` for ``workdir`` and each of ``ensemble``, in order.

  Without ``ensemble`` the one member keeps ``config`` as it is; in an
  ensemble each takes its model fields from its own training run
  (:func:`member_config`).
  """
  check_distinct(workdir, ensemble)
  return [fn(member_config(config, m) if ensemble else config, m)
          for m in [workdir, *ensemble]]


def check_distinct(workdir: str, ensemble: Sequence[str]) -> None:
  """Each member once: a workdir named twice (``--ensemble`` naming ``--workdir``) is a UserError.

  Its probabilities would count twice in the average, silently weighting it.
  """
  seen: dict[str, str] = {}
  for m in [workdir, *ensemble]:
    key = os.path.realpath(os.path.expanduser(m))
    if key in seen:
      what = '--workdir' if seen[key] is workdir else f'--ensemble {seen[key]}'
      raise UserError(f'--ensemble {m} is the same workdir as {what}: each member counts once '
                      'in the average, so name each workdir once')
    seen[key] = m


def average(probs: Sequence[np.ndarray], labels: Sequence[np.ndarray | None]) -> np.ndarray:
  """The mean of the members' probabilities, after checking they line up."""
  shapes = {p.shape for p in probs}
  if len(shapes) != 1:
    raise RuntimeError(f'ensemble members produced different shapes: {sorted(shapes)}')
  known = [l for l in labels if l is not None]
  if any(not np.array_equal(known[0], l) for l in known[1:]):
    raise RuntimeError('ensemble members saw the examples in different orders')
  return np.mean(np.stack(probs), axis=0)
