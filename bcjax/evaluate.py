"""Evaluation: a trained state on a split, and the report files.

Two users: the trainer (validation every epoch, the test split at the end)
and ``launch.py --mode=eval``, which evaluates a workdir's checkpoint on any
split, or on every image of a labelled PBC-layout folder (another lab's
images) with ``--config.data.path=DIR --config.data.split=all``::

    metrics = evaluate.evaluate_workdir(config, 'runs/cnn', split='test',
                                        checkpoint='best', out_dir='runs/cnn/eval_test')

The eval dataset pads its last batch and marks the padding with ``mask``;
the step sums only real examples, and the host keeps only their rows, so
every example counts exactly once (``num_examples`` must equal the split size).
"""

import csv
import dataclasses
import json
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
import optax
from jax.experimental import multihost_utils

from bcjax import checkpointing, models, packed, parallel, reporting, steps, train_state
from bcjax import files
from bcjax import ensemble as ensemble_lib
from bcjax.errors import UserError


@dataclasses.dataclass
class EvalOutput:
  """Summed metrics and, when collected, every real example's outputs."""
  loss_sum: float
  correct: int
  count: int
  labels: np.ndarray | None = None
  probs: np.ndarray | None = None
  file_names: list[str] | None = None

  @property
  def loss(self) -> float:
    return self.loss_sum / max(self.count, 1)

  @property
  def accuracy(self) -> float:
    return self.correct / max(self.count, 1)


def _allgather(x: np.ndarray) -> np.ndarray:
  """Every process's rows of ``x``, in the split's order.

  Process ``p`` evaluates examples ``p, p + P, p + 2P, ...`` of the split, in
  order, then padding (bcjax/data: ``shard`` + padded eval batches, the same
  number of rows on every process). So row ``k`` of process ``p`` is example
  ``k * P + p``: interleaving the processes' rows restores the order one
  process would see, and the padding comes out where the mask drops it.
  """
  if jax.process_count() == 1:
    return x
  stacked = np.asarray(multihost_utils.process_allgather(x))  # [P, rows, ...]
  return np.swapaxes(stacked, 0, 1).reshape(-1, *x.shape[1:])


def _allgather_names(names: list[bytes]) -> list[bytes]:
  """:func:`_allgather` for byte strings: fixed-width uint8 rows across processes."""
  if jax.process_count() == 1:
    return names
  longest = max((len(n) for n in names), default=0)
  width = int(np.max(multihost_utils.process_allgather(np.array(longest)))) + 1
  rows = np.zeros((len(names), width), np.uint8)
  for i, n in enumerate(names):
    rows[i, :len(n)] = np.frombuffer(n, np.uint8)
  return [r.tobytes().rstrip(b'\0') for r in _allgather(rows)]


def run(runner: parallel.Runner, state, dataset, *, collect: bool = False) -> EvalOutput:
  """Evaluates a device ``state`` on every batch of an eval ``dataset``.

  With ``collect`` the per-example probabilities come to the host batch by
  batch (needed for the confusion matrix); without, only the summed metrics
  do, once at the end.
  """
  sums, labels, probs, masks, names = [], [], [], [], []
  for batch in dataset.as_numpy_iterator():
    metrics, batch_probs = runner.eval_step(state, runner.put_batch(batch))
    sums.append(metrics)
    if collect:
      labels.append(batch['label'].reshape(-1))
      masks.append(batch['mask'].reshape(-1))
      probs.append(runner.get_rows(batch_probs))
      names.extend(batch['file_name'].reshape(-1))
  totals = {'loss_sum': 0.0, 'correct': 0, 'count': 0}
  for m in jax.device_get(sums):
    for k in totals:
      totals[k] += np.asarray(m[k]).reshape(-1)[0].item()
  out = EvalOutput(**totals)
  if collect and labels:
    mask = _allgather(np.concatenate(masks))
    out.labels = _allgather(np.concatenate(labels))[mask]
    out.probs = _allgather(np.concatenate(probs))[mask]
    out.file_names = [n.decode('utf-8', 'replace')
                      for n, keep in zip(_allgather_names(names), mask) if keep]
  elif collect:
    out.labels, out.probs, out.file_names = np.zeros(0, int), np.zeros((0, 0)), []
  return out


def report(config: ml_collections.ConfigDict, result: EvalOutput, class_names, *,
           split: str, out_dir: str, expected_examples: int | None,
           extra: dict[str, Any], history=None) -> dict[str, Any]:
  """Metrics dict and report files from a collected :class:`EvalOutput`."""
  if expected_examples is not None and len(result.labels) != expected_examples:
    raise RuntimeError(f'evaluated {len(result.labels)} examples of {split!r}, '
                       f'but the split has {expected_examples}')
  metrics, text = reporting.classification_metrics(result.labels, result.probs, class_names)
  metrics.update(split=split, config_name=config.name, seed=config.seed, tta=bool(config.tta),
                 **extra)
  if jax.process_index() == 0:
    title = f"{config.name} - {split} - step {extra.get('checkpoint_step')}"
    reporting.write_report(out_dir, metrics, text, split=split, history=history, title=title,
                           labels=result.labels, probs=result.probs)
    if result.file_names:
      write_predictions_csv(os.path.join(out_dir, f'{split}_predictions.csv'),
                            result.file_names, result.probs, class_names, result.labels)
  return metrics


_FORMULA_STARTS = ('=', '+', '-', '@', '\t', '\r')


def csv_cell(text: str) -> str:
  """``text`` safe for a spreadsheet: a leading ``'`` before = + - @ (OWASP's rule).

  File names are the user's (or an attacker's): ``=HYPERLINK(...)``.jpg opened
  in a spreadsheet would run as a formula. Probabilities are written as
  numbers and never start with those characters.
  """
  return "'" + text if text.startswith(_FORMULA_STARTS) else text


def write_predictions_csv(path: str, names, probs: np.ndarray, class_names,
                          labels: np.ndarray | None = None, errors=None) -> None:
  """One row per example: path, (true class), predicted class, probabilities.

  Written atomically (bcjax/files.py); text cells are escaped by :func:`csv_cell`.
  """
  with files.atomic_write(path, newline='') as f:
    w = csv.writer(f)
    class_names = [csv_cell(str(c)) for c in class_names]
    names = [csv_cell(str(n)) for n in names]
    header = ['path'] + (['true_class'] if labels is not None else [])
    w.writerow(header + ['predicted_class'] + [f'p_{c}' for c in class_names] + ['error'])
    for i, name in enumerate(names):
      row = [name] + ([class_names[labels[i]]] if labels is not None else [])
      err = errors[i] if errors is not None else ''
      if err:
        w.writerow(row + [''] + [''] * len(class_names) + [csv_cell(err)])
      else:
        w.writerow(row + [class_names[int(probs[i].argmax())]] +
                   [f'{p:.6f}' for p in probs[i]] + [''])


def load_inference_state(config: ml_collections.ConfigDict, workdir: str,
                         checkpoint: str = 'best'):
  """(host state with params + batch_stats, meta, kind, step) of a workdir's checkpoint.

  Only the model's variables are restored, so evaluation works whatever
  optimiser the config names.
  """
  ckpts = checkpointing.Checkpoints(workdir, read_only=True)
  try:
    kind, step = ckpts.find(checkpoint)
    variables, meta = ckpts.restore_variables(checkpoint)
  finally:
    ckpts.close()
  expected = train_state.init_variables(config, jax.random.key(0))
  for name in ('params', 'batch_stats'):
    want = jax.tree.map(np.shape, expected.get(name, {}))
    got = jax.tree.map(np.shape, variables.get(name, {}))
    if want != got:
      raise UserError(f'checkpoint {kind}/{step} in {workdir} does not fit '
                      f'config.model ({config.model.name}): its {name} differ in structure '
                      'or shape; pass the config it was trained with')
  state = train_state.TrainState.create(
      apply_fn=None, params=variables['params'], tx=optax.identity(),
      batch_stats=variables.get('batch_stats', {}))
  return state, meta, kind, step


def check_class_names(meta: dict[str, Any], class_names) -> None:
  trained = meta.get('class_names')
  if trained and tuple(trained) != tuple(class_names):
    raise UserError(f'the model was trained on classes {", ".join(trained)} but the data '
                    f'has {", ".join(class_names)}')


def _split_facts(config: ml_collections.ConfigDict, split: str) -> tuple[tuple[str, ...], int]:
  """(class names, number of examples) of ``split``.

  'all' is a folder read directly, not a prepared split: nothing is built
  (``data.prepare`` would build a dataset from the folder), and its size is
  known once the folder has been read - by the same memoised read the eval
  dataset then uses.
  """
  data = packed.input_for(config)
  if split == 'all':
    from bcjax.data import pipeline, sources  # pylint: disable=g-import-not-at-top
    _, size = pipeline.cached_split(config, 'all', sources.raw_split,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
    return tuple(data.CLASS_NAMES), size
  info = data.prepare(config)
  if split not in info.split_sizes:
    raise UserError(f'unknown split {split!r}; known: {", ".join(sorted(info.split_sizes))}, all')
  return tuple(info.class_names), info.split_sizes[split]


def collect_workdir(config: ml_collections.ConfigDict, workdir: str, *, split: str,
                    checkpoint: str = 'best'):
  """Every example's outputs on ``split`` from ``workdir``'s checkpoint.

  Returns ``(EvalOutput, class names, split size, checkpoint kind, step,
  training history)``: the history is ``<workdir>/history.json`` or, for a
  run that never finished, the epochs stored with the checkpoint.
  """
  data = packed.input_for(config)  # bcjax.data imports TensorFlow: late.
  state, meta, kind, step = load_inference_state(config, workdir, checkpoint)
  class_names, expected = _split_facts(config, split)
  check_class_names(meta, class_names)
  runner = parallel.make_runner(config, models.build_model(config, axis_name=steps.AXIS))
  parallel.per_device_batch(config.eval_batch_size, jax.device_count(), 'config.eval_batch_size')
  result = run(runner, runner.put_state(state), data.make_eval_dataset(config, split),
               collect=True)
  history = meta.get('history') or []
  history_path = os.path.join(workdir, 'history.json')
  if os.path.exists(history_path):
    try:
      with open(history_path) as f:
        history = json.load(f)
    except (OSError, ValueError):  # Unreadable (written by hand?): the checkpoint's copy.
      pass
  return result, class_names, expected, kind, step, history


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str, *,
                     split: str | None = None, checkpoint: str = 'best',
                     out_dir: str | None = None, ensemble: Sequence[str] = ()) -> dict[str, Any]:
  """Evaluates ``workdir``'s checkpoint on ``split``; writes the report to ``out_dir``.

  ``split`` defaults to ``config.data.split`` ('all' reads every image of the
  labelled folder ``config.data.path``); ``out_dir`` to ``<workdir>/eval_<split>``;
  ``checkpoint`` is 'best', 'latest' or a step number as a string. With
  ``ensemble`` (more workdirs), the members' probabilities are averaged
  (bcjax/ensemble.py).
  """
  split = split or config.data.split
  out_dir = out_dir or os.path.join(workdir, f'eval_{split}')
  if jax.process_index() == 0:  # Before the evaluation, not after it.
    checkpointing.Checkpoints(workdir, read_only=True).close()  # None there: say that first.
    files.check_writable(out_dir, '--out')
  members = [workdir, *ensemble]
  outputs = []
  for member in members:
    member_cfg = ensemble_lib.member_config(config, member) if ensemble else config
    outputs.append(collect_workdir(member_cfg, member, split=split, checkpoint=checkpoint))
  result, class_names, expected, kind, step, history = outputs[0]
  extra = {'checkpoint': kind, 'checkpoint_step': int(step),
           'workdir': os.path.abspath(workdir),
           'data_path': config.data.path or config.data.source}
  if ensemble:
    result.probs = ensemble_lib.average([o[0].probs for o in outputs],
                                        [o[0].labels for o in outputs])
    result.correct = int((result.probs.argmax(-1) == result.labels).sum())
    result.loss_sum = float(-np.log(np.maximum(
        result.probs[np.arange(len(result.labels)), result.labels], 1e-12)).sum())
    extra['ensemble'] = [os.path.abspath(m) for m in members]
  if history:
    extra['epochs_trained'] = len(history)
  metrics = report(config, result, class_names, split=split, out_dir=out_dir,
                   expected_examples=expected, extra=extra,
                   history=None if ensemble else history)
  if jax.process_index() == 0:
    what = f'ensemble of {len(members)}' if ensemble else f'{kind} checkpoint, step {step}'
    print(f'{split} ({what}): {reporting.format_metrics(metrics)}')
    print(f'report written to {out_dir}')
  return metrics
