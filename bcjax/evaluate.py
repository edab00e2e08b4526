"""Evaluation: a trained state on a split, and the report files.

Two users: the trainer (validation every epoch, the test split at the end)
and ``launch.py --mode=eval``, which evaluates a workdir's checkpoint on any
split, or on every image of a labelled PBC-layout folder (another lab's
images) with ``--config.data.path=DIR --config.data.split=all``::

    metrics = evaluate.evaluate_workdir(config, 'runs/cnn', split='test',
                                        checkpoint='best', out_dir='runs/cnn/eval_test')
    metrics = evaluate.evaluate_other_lab(config, 'runs/cnn', 'other_lab_folder/')

Another lab's folder may hold only some of the classes: the report names
the absent ones, averages over the present ones, and gives the accuracy with
the prediction over all classes and restricted to the present ones
(bcjax/metrics.py).

The eval dataset pads its last batch and marks the padding with ``mask``;
the step sums only real examples, and the host keeps only their rows, so
every example counts exactly once (``num_examples`` must equal the split size).
"""

import dataclasses
import os
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from bcjax import checkpointing, data, ensemble_members, files, models, parallel, predictions_csv
from bcjax import run_config, steps, train_state
from bcjax import metrics as metrics_lib


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
  for m in parallel.host_metrics(sums):
    for k in totals:
      totals[k] += m[k]
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
  metrics, text = metrics_lib.classification_metrics(result.labels, result.probs, class_names)
  metrics.update(split=split, config_name=config.name, seed=config.seed, tta=bool(config.tta))
  metrics.update(extra)
  if jax.process_index() == 0:
    title = f"{config.name} - {split} - step {extra.get('checkpoint_step')}"
    metrics_lib.write_report(out_dir, metrics, text, split=split, history=history, title=title,
                             labels=result.labels, probs=result.probs)
    if result.file_names:
      predictions_csv.write(os.path.join(out_dir, f'{split}_predictions.csv'),
                            result.file_names, result.probs, class_names, result.labels)
  return metrics


def collect_workdir(config: ml_collections.ConfigDict, workdir: str, *, split: str,
                    checkpoint: str = 'best'):
  """Every example's outputs on ``split`` from ``workdir``'s checkpoint.

  Returns ``(EvalOutput, class names, split size, checkpoint kind, step,
  training history)``: the history is ``<workdir>/history.json`` or, for a
  run that never finished, the epochs stored with the checkpoint.
  """
  state, meta, kind, step = train_state.load_for_inference(config, workdir, checkpoint)
  class_names, expected = data.split_facts(config, split)
  train_state.check_class_names(meta, class_names)
  runner = parallel.make_runner(config, models.build_model(config, axis_name=steps.AXIS))
  parallel.per_device_batch(config.eval_batch_size, jax.device_count(), 'config.eval_batch_size')
  try:
    result = run(runner, runner.put_state(state), data.make_eval_dataset(config, split),
                 collect=True)
  except Exception as e:  # pylint: disable=broad-except  (only tf.data's DataLossError is caught)
    if data.is_damaged_input(e):
      raise data.damaged_input_error(config, e) from None
    raise
  try:
    history = run_config.read_history(workdir)
  except (OSError, ValueError):  # Unreadable (written by hand?): the checkpoint's copy.
    history = None
  if history is None:
    history = meta.get('history') or []
  return result, class_names, expected, kind, step, history


def evaluate_workdir(config: ml_collections.ConfigDict, workdir: str, *,
                     split: str | None = None, checkpoint: str = 'best',
                     out_dir: str | None = None, ensemble: Sequence[str] = ()) -> dict[str, Any]:
  """Evaluates ``workdir``'s checkpoint on ``split``; writes the report to ``out_dir``.

  ``split`` defaults to ``config.data.split`` ('all' reads every image of the
  labelled folder ``config.data.path``); ``out_dir`` to ``<workdir>/eval_<split>``;
  ``checkpoint`` is 'best', 'latest' or a step number as a string. With
  ``ensemble`` (more workdirs), the members' probabilities are averaged
  (bcjax/ensemble_members.py). A single workdir's report carries the name and seed its
  training run recorded (``config.json``), not the evaluating config's, so a
  test-time-augmented eval of seed 2 is a row of seed 2 in bcjax.results.
  """
  split = split or config.data.split
  out_dir = out_dir or os.path.join(workdir, f'eval_{split}')
  ensemble_members.check_distinct(workdir, ensemble)
  if jax.process_index() == 0:  # Before the evaluation, not after it.
    for member in [workdir, *ensemble]:  # No checkpoint there, or not that one: say that first.
      ckpts = checkpointing.Checkpoints(member, read_only=True)
      try:
        ckpts.find(checkpoint)
      finally:
        ckpts.close()
    data_folder = os.path.expanduser(config.data.path or '')
    files.check_output_dir(out_dir, '--out',
                           inputs=[data_folder] if os.path.isdir(data_folder) else [],
                           protected=files.run_inputs([workdir, *ensemble])[1])
    files.check_writable(out_dir, '--out')
  outputs = ensemble_members.for_members(
      config, workdir, ensemble,
      lambda member_config, member: collect_workdir(member_config, member, split=split,
                                                    checkpoint=checkpoint))
  result, class_names, expected, kind, step, history = outputs[0]
  extra = {'checkpoint': kind, 'checkpoint_step': int(step),
           'workdir': os.path.abspath(workdir),
           'data_path': config.data.path or config.data.source}
  if ensemble:
    result.probs = ensemble_members.average([o[0].probs for o in outputs],
                                            [o[0].labels for o in outputs])
    result.correct = int((result.probs.argmax(-1) == result.labels).sum())
    result.loss_sum = float(metrics_lib.nll(result.labels, result.probs).sum())
    extra['ensemble'] = [os.path.abspath(m) for m in [workdir, *ensemble]]
  if history:
    extra['epochs_trained'] = len(history)
  recorded = run_config.read(workdir)
  if recorded and not ensemble:  # The run's own name and seed, whatever config evaluates it.
    extra.update({k: recorded[k] for k in ('name', 'seed') if k in recorded})
    if 'name' in extra:
      extra['config_name'] = extra.pop('name')
  metrics = report(config, result, class_names, split=split, out_dir=out_dir,
                   expected_examples=expected, extra=extra,
                   history=None if ensemble else history)
  if jax.process_index() == 0:
    what = (f'ensemble of {len(outputs)}' if ensemble
            else f'{kind} checkpoint, step {step}')
    print(f'{split} ({what}): {metrics_lib.format_metrics(metrics)}')
    print(f'report written to {out_dir}')
  return metrics


def evaluate_other_lab(config: ml_collections.ConfigDict, workdir: str, folder: str, *,
                       checkpoint: str = 'best', out_dir: str | None = None) -> dict[str, Any]:
  """``workdir``'s checkpoint on every image of another lab's labelled ``folder``.

  :func:`evaluate_workdir` with ``config.data.path = folder`` and the split
  'all', whatever source the run was trained on (a packed file too), so a
  script can rank the runs of an ablation by it::

      m = evaluate_other_lab(config, workdir, '/data/other_labs/chulalongkorn_wbc')
      m['accuracy'], m['accuracy_present_restricted_argmax'], m['absent_classes']

  ``folder`` is in PBC's layout (a folder or zip of class folders, any of
  them missing); the report goes to ``out_dir``, by default
  ``<workdir>/eval_<folder's name>``.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.data.path = folder
  config.data.split = 'all'
  name = os.path.basename(os.path.normpath(folder)) or 'all'
  out_dir = out_dir or os.path.join(workdir, f'eval_{os.path.splitext(name)[0]}')
  return evaluate_workdir(config, workdir, split='all', checkpoint=checkpoint, out_dir=out_dir)
