"""Training loop: epochs of mapped steps, validation, checkpoints, the test report.

    metrics = train.train_and_evaluate(config, workdir)   # what launch.py --mode=train calls

What a workdir holds afterwards::

    <workdir>/config.json                  the config of the first run, and each resume's changes
    <workdir>/events.out.tfevents.*        TensorBoard scalars (process 0)
    <workdir>/checkpoints/{latest,best}/   orbax checkpoints (bcjax/checkpointing.py)
    <workdir>/report/                      test metrics, figures, text report (bcjax/metrics.py)
    <workdir>/wall_time.json               each process run's wall time by phase (bcjax/profiling.py)
    <workdir>/train.lock                   held while a training runs there (bcjax/workdir_lock.py)

Resuming: rerunning the same command restores ``checkpoints/latest`` and goes
on. Everything random is a pure function of the config: parameters of
``config.seed``, dropout of (seed, step), data order of (seed, epoch)
(bcjax/data; bcjax/data/resident.py when the train split is resident on the
devices, ``config.data.placement``), augmentation of (seed, step, device)
in the train step whichever path the batches come by. So a run resumed from
an epoch checkpoint - after SIGKILL, say - replays the lost steps exactly
and ends with the same metrics as an uninterrupted run. SIGTERM and SIGINT save ``latest`` at the current step
(mid-epoch is fine: the resumed epoch skips the batches already seen) before
the process exits as the signal asks. With several processes
(bcjax/distributed.py) they agree first: all save at the next log step or
epoch end after any of them got a signal, then all exit.

A NaN or infinite loss stops training with one line naming the step; no
checkpoint is written after it, so the last good one stays.
"""

import collections
import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable, Iterator

import jax
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from bcjax import checkpointing, data, evaluate, models, optim, parallel, steps
from bcjax import config_checks, distill, files, profiling, run_config, stop_signals, train_state
from bcjax import model_size, workdir_lock
from bcjax import metrics as metrics_lib
from bcjax.data import resident
from bcjax.errors import UserError


class NonFiniteLossError(UserError):
  """The training loss became NaN or infinite."""


def _say(*args) -> None:
  if jax.process_index() == 0:
    tqdm.tqdm.write(' '.join(str(a) for a in args), file=sys.stdout)
    sys.stdout.flush()


class _Scalars:
  """TensorBoard scalars in ``workdir`` from process 0; a no-op elsewhere.

  ``tf.summary.scalar`` needs the ``tensorboard`` package, which only the
  viewer needs; ``tf.summary.write`` with the scalars plugin's metadata writes
  the same event records with TensorFlow alone. A run on packed data
  (bcjax/data/packed.py) does not load TensorFlow for them, so it writes no
  event files: ``history.json`` and the report's learning curves hold the same epochs.
  """

  def __init__(self, workdir: str, with_tensorflow: bool):
    self.writer = None
    if not with_tensorflow:
      _say('input without TensorFlow: no TensorBoard scalars (history.json has the epochs)')
    elif jax.process_index() == 0:
      try:
        import tensorflow as tf  # pylint: disable=g-import-not-at-top  (loaded by bcjax.data)
        from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
      except ImportError:
        _say('TensorFlow is not installed: no TensorBoard scalars (history.json has the epochs)')
        return
      self.tf = tf
      self.metadata = summary_pb2.SummaryMetadata()
      self.metadata.plugin_data.plugin_name = 'scalars'
      self.writer = tf.summary.create_file_writer(workdir)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if self.writer is None:
      return
    with self.writer.as_default(step=step):
      for k, v in scalars.items():
        if v is not None:
          self.tf.summary.write(k, self.tf.constant(v, self.tf.float32),
                                metadata=self.metadata)

  def close(self) -> None:
    if self.writer is not None:
      self.writer.flush()
      self.writer.close()
      self.writer = None  # Closing twice (a stop, then the loop's cleanup) is harmless.


def _prefetch(batches: Iterator, put, size: int) -> Iterator:
  """Keeps ``size`` batches on their way to the devices ahead of the step."""
  queue = collections.deque()
  for b in batches:
    queue.append(put(b))
    if len(queue) > max(size, 0):
      yield queue.popleft()
  while queue:
    yield queue.popleft()


class _EpochMetrics:
  """Per-step device metrics, pulled to the host only at log time."""

  def __init__(self, sums: dict[str, float] | None = None):
    self.sums = dict(sums or {'loss_sum': 0.0, 'correct': 0, 'count': 0})
    self.pending: list[tuple[int, Any]] = []

  def add(self, step: int, metrics) -> None:
    self.pending.append((step, metrics))

  def pull(self) -> dict[str, float]:
    """Host sums of the pending steps; raises NonFiniteLossError naming the first bad step."""
    window = {'loss_sum': 0.0, 'correct': 0, 'count': 0, 'steps': len(self.pending)}
    host = parallel.host_metrics([m for _, m in self.pending])
    for (step, _), m in zip(self.pending, host):
      if not np.isfinite(m['loss_sum']):
        raise NonFiniteLossError(
            f"loss is {m['loss_sum']} at step {step}; training stopped "
            '(lower config.optimizer.learning_rate or set config.optimizer.grad_clip_norm)')
      for k in ('loss_sum', 'correct', 'count'):
        window[k] += m[k]
        self.sums[k] += m[k]
    self.pending = []
    return window


def _mean(sums: dict[str, float], key: str) -> float | None:
  return sums[key] / sums['count'] if sums['count'] else None


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    tqdm.tqdm.write(f'warning: {message}', file=sys.stderr)
    sys.stderr.flush()


@dataclasses.dataclass
class _Run:
  """One run's fixed parts and its moving state, handed to each piece of the loop.

  ``state`` (on the devices), ``step`` and ``meta`` (what checkpoints carry:
  history, best validation accuracy, a partial epoch) change as it trains;
  the pieces read and update them here, never through an enclosing scope.
  """
  config: ml_collections.ConfigDict
  workdir: str
  info: data.DatasetInfo
  steps_per_epoch: int
  schedule: Callable[[int], Any]
  runner: parallel.Runner
  ckpts: checkpointing.Checkpoints
  scalars: _Scalars
  profiler: profiling.StepProfiler
  dropout_rng: jax.Array
  meta: dict[str, Any]
  state: Any
  step: int
  clock: profiling.WallClock
  first_step: int  # This process's first step: its first train call compiles the step.
  feed: resident.ResidentTrain | None = None  # The device path; None: streamed batches.
  placement: str = 'stream'  # Which of the two feeds this run (config.data.placement's choice).


def _save(run: _Run, kind: str, partial_epoch: dict[str, Any] | None = None) -> None:
  with run.clock.phase('checkpoints'):
    run.ckpts.save(kind, run.step, run.runner.get_state(run.state),
                   dict(run.meta, partial_epoch=partial_epoch))


def _record_wall_time(run: _Run) -> None:
  """Appends this process run's wall time by phase to ``wall_time.json``; says it."""
  summary = run.clock.summary()
  _say(profiling.WallClock.describe(summary))
  if jax.process_index() != 0:
    return
  path = os.path.join(run.workdir, 'wall_time.json')
  try:
    with open(path) as f:
      entries = list(json.load(f))
  except (OSError, ValueError, TypeError):  # The first part of this run (or an unreadable file).
    entries = []
  entries.append({'from_step': run.first_step, 'to_step': run.step,
                  'platform': jax.devices()[0].platform, 'devices': run.runner.num_devices,
                  'placement': run.placement,
                  'seconds': {k: round(v, 3) for k, v in summary.items()}})
  files.write_json(path, entries)


def _stop(run: _Run, stop: stop_signals.StopSignals, partial_epoch) -> None:
  """Saves ``latest`` at this step, then ends the process as the signal asked."""
  _save(run, 'latest', partial_epoch)
  _say(f'signal {stop.name}: saved step {run.step} to {run.ckpts.directory}/latest; '
       'rerun the same command to resume')
  _record_wall_time(run)
  run.scalars.close()
  run.ckpts.close()
  stop.reraise()


def _train_epoch(run: _Run, epoch: int, stop: stop_signals.StopSignals):
  """The steps of ``epoch`` from ``run.step`` on; returns (metrics, images, seconds)."""
  config, per_epoch = run.config, run.steps_per_epoch
  skip = run.step - epoch * per_epoch
  partial = run.meta.get('partial_epoch')
  acc = _EpochMetrics(partial['sums'] if partial and partial['epoch'] == epoch else None)
  t_epoch = t_window = time.time()  # Building the epoch's input pipeline is part of it.
  if run.feed is not None:  # Gathered on the devices: nothing to prefetch from the host.
    device_batches = run.feed.batches(epoch, start=skip)
  else:
    batches = data.make_train_dataset(config, epoch=epoch).skip(skip).as_numpy_iterator()
    device_batches = _prefetch(batches, run.runner.put_batch, config.data.prefetch)
  bar = tqdm.tqdm(total=per_epoch, initial=skip, unit='step', leave=False,
                  desc=f'epoch {epoch + 1}/{config.num_epochs}', file=sys.stderr,
                  mininterval=1.0, dynamic_ncols=True, disable=jax.process_index() != 0)
  epoch_images = 0
  compile_seconds = 0.0
  for batch in device_batches:
    run.profiler.start(run.step + 1)
    t_call = time.perf_counter()
    run.state, metrics = run.runner.train_step(run.state, batch, run.dropout_rng)
    if run.step == run.first_step:  # The call returns once compiled; the work runs on.
      compile_seconds = time.perf_counter() - t_call
    run.step += 1
    run.profiler.stop(run.step, run.state)
    acc.add(run.step, metrics)
    done = run.step == (epoch + 1) * per_epoch
    log_step = run.step % config.log_every_steps == 0 or done
    if log_step or (stop.received and jax.process_count() == 1):
      w = acc.pull()
      now = time.time()
      images_per_s = w['steps'] * config.batch_size / max(now - t_window, 1e-9)
      epoch_images += w['steps'] * config.batch_size
      t_window = now
      bar.set_postfix(loss=f"{_mean(w, 'loss_sum'):.4f}", acc=f"{_mean(w, 'correct'):.3f}",
                      img_s=f'{images_per_s:.0f}', refresh=False)
      run.scalars.write(run.step, {'train/loss': _mean(w, 'loss_sum'),
                                   'train/accuracy': _mean(w, 'correct'),
                                   'train/learning_rate': float(run.schedule(run.step - 1)),
                                   'train/images_per_second': images_per_s})
    bar.update(1)
    if stop.agreed(log_step):
      bar.close()
      _stop(run, stop, {'epoch': epoch, 'sums': acc.sums})
  bar.close()
  if acc.pending:
    acc.pull()
  run.step = (epoch + 1) * per_epoch
  seconds = time.time() - t_epoch
  run.clock.add('compile', compile_seconds)
  run.clock.add('train', max(seconds - compile_seconds, 0.0))
  return acc, epoch_images, seconds


def _end_epoch(run: _Run, epoch: int, acc: _EpochMetrics, epoch_images: int,
               seconds: float) -> None:
  """Validation, history, checkpoints and the epoch's line, after its last step."""
  config = run.config
  last = epoch + 1 == config.num_epochs
  entry = {'epoch': epoch + 1, 'step': run.step,
           'train_loss': _mean(acc.sums, 'loss_sum'),
           'train_accuracy': _mean(acc.sums, 'correct'),
           'val_loss': None, 'val_accuracy': None,
           'learning_rate': float(run.schedule(run.step - 1)), 'seconds': seconds}
  improved = False
  if (epoch + 1) % config.eval_every_epochs == 0 or last:
    with run.clock.phase('validation'):
      val = evaluate.run(run.runner, run.state, data.make_eval_dataset(config, 'validation'))
      entry.update(val_loss=val.loss, val_accuracy=val.accuracy)
      score = val.accuracy
      if run.state.ema_params is not None:  # config.ema_decay: the average, validated too.
        ema = evaluate.run(run.runner, run.state.replace(params=run.state.ema_params),
                           data.make_eval_dataset(config, 'validation'))
        entry.update(val_loss_ema=ema.loss, val_accuracy_ema=ema.accuracy)
        run.meta['eval_weights'] = 'ema' if ema.accuracy > val.accuracy else 'raw'
        score = max(val.accuracy, ema.accuracy)
    best = run.meta['best_val_accuracy']
    improved = best is None or score > best
    if improved:
      run.meta['best_val_accuracy'] = score
  run.meta['history'] = run.meta['history'] + [entry]
  if jax.process_index() == 0:  # Every epoch, so a run that is killed keeps its curve too.
    files.write_json(run_config.history_path(run.workdir), run.meta['history'])
  run.scalars.write(run.step, {f'epoch/{k}': v for k, v in entry.items()
                               if k not in ('epoch', 'step', 'seconds')})
  if improved:
    _save(run, 'best')
  if (epoch + 1) % config.checkpoint_every_epochs == 0 or last:
    _save(run, 'latest')
  val_text = (f"  val loss {entry['val_loss']:.4f} acc {entry['val_accuracy']:.4f}"
              if entry['val_loss'] is not None else '')
  if entry.get('val_accuracy_ema') is not None:
    val_text += f" (ema {entry['val_accuracy_ema']:.4f})"
  _say(f"epoch {epoch + 1}/{config.num_epochs}  step {run.step}  train loss "
       f"{entry['train_loss']:.4f} acc {entry['train_accuracy']:.4f}{val_text}  "
       f"lr {entry['learning_rate']:.2e}  {epoch_images / max(seconds, 1e-9):.0f} img/s  "
       f"{seconds:.1f}s" + ('  *best*' if improved else ''))


def _train(run: _Run) -> None:
  """Every epoch left, then ``latest`` at the last step; a signal saves and exits."""
  try:
    with stop_signals.StopSignals() as stop:
      for epoch in range(run.step // run.steps_per_epoch, run.config.num_epochs):
        acc, epoch_images, seconds = _train_epoch(run, epoch, stop)
        _end_epoch(run, epoch, acc, epoch_images, seconds)
        if stop.agreed(True):  # Arrived during validation or saving.
          _stop(run, stop, None)
    if run.ckpts.step('latest') != run.step:
      _save(run, 'latest')
  except NonFiniteLossError as e:
    raise NonFiniteLossError(f'{e}; last good checkpoint: {run.ckpts.last_good()}') from None
  except files.WriteError as e:  # history.json, config.json, wall_time.json: disk full.
    raise files.WriteError(f'{e}; last good checkpoint: {run.ckpts.last_good()}') from None
  finally:
    run.profiler.close()
    run.scalars.close()


def _test_best(run: _Run, target) -> dict[str, Any]:
  """Tests the best checkpoint (``target``: a host state of its structure); the report."""
  with run.clock.phase('test'):
    return _test_best_checkpoint(run, target)


def _test_best_checkpoint(run: _Run, target) -> dict[str, Any]:
  config = run.config
  best_state, best_meta = run.ckpts.restore('best', target)
  kind, best_step = run.ckpts.find('best')
  run.ckpts.close()
  best_state = best_state.replace(params=checkpointing.validated_params(
      best_state.params, best_state.ema_params, best_meta))
  result = evaluate.run(run.runner, run.runner.put_state(best_state),
                        data.make_eval_dataset(config, 'test'), collect=True)
  out_dir = os.path.join(run.workdir, 'report')
  metrics = evaluate.report(
      config, result, run.info.class_names, split='test', out_dir=out_dir,
      expected_examples=run.info.split_sizes['test'], history=run.meta['history'],
      extra={'checkpoint': kind, 'checkpoint_step': int(best_step), 'workdir': run.workdir,
             'best_val_accuracy': run.meta['best_val_accuracy'],
             'epochs_trained': len(run.meta['history']),
             **({'weights': best_meta.get('eval_weights', 'raw')}
                if config.get('ema_decay', 0.0) > 0 else {})})
  _say(f'test (best checkpoint, step {best_step}): {metrics_lib.format_metrics(metrics)}')
  _say(f'report written to {out_dir}')
  return metrics


def _initial_state(config: ml_collections.ConfigDict, rng: jax.Array, tx):
  """A fresh host state, with ``config.init``'s pretrained parameters when set."""
  state = train_state.create(config, rng, tx)
  if not config.init.checkpoint:
    return state
  params = train_state.pretrained_params(config, state.params)
  frozen = config.optimizer.frozen
  _say(f"parameters {config.init.subtree or '(all)'} loaded from {config.init.checkpoint}"
       + (f' ({frozen} frozen)' if frozen else ''))
  return train_state.create(config, rng, tx, params=params)


@contextlib.contextmanager
def _exclusive(workdir: str) -> Iterator[None]:
  """The workdir's training lock (bcjax/workdir_lock.py), taken by process 0 for all."""
  stack = contextlib.ExitStack()
  busy = None
  if jax.process_index() == 0:
    try:
      stack.enter_context(workdir_lock.hold(workdir))
    except workdir_lock.WorkdirBusyError as e:
      busy = e
  if jax.process_count() > 1:  # Every process stops, not only the one that knows.
    refused = np.any(multihost_utils.process_allgather(np.int32(busy is not None)))
    if refused and busy is None:
      busy = workdir_lock.WorkdirBusyError(
          f'{workdir} is in use by another training (process 0 could not lock it)')
  if busy is not None:
    raise busy
  with stack:
    yield


def _has_checkpoints(workdir: str) -> bool:
  """Whether ``workdir`` holds a saved step to resume from (``latest`` or ``best``)."""
  root = checkpointing.checkpoint_dir(workdir)
  for kind in checkpointing.KINDS:
    folder = os.path.join(root, kind)
    if os.path.isdir(folder) and any(n.isdigit() for n in os.listdir(folder)):
      return True
  return False


def _remove_if_unused(workdir: str) -> None:
  """Removes a workdir this call created when nothing but the lock was written in it."""
  try:
    names = set(os.listdir(workdir))
    if names <= {workdir_lock.LOCK_FILE}:
      for name in names:
        os.unlink(os.path.join(workdir, name))
      os.rmdir(workdir)
  except OSError:
    pass


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_changed_config: bool = False) -> dict[str, Any]:
  """Trains (or resumes) in ``workdir``, then tests the best checkpoint.

  Before any work: the config's values are checked, the model must take
  ``config.image_size`` and fit the machine's memory (bcjax/model_size.py),
  the workdir must be writable and free (one training per workdir, bcjax/workdir_lock.py), and a
  resume must not change the run nor its data (bcjax/run_config.py;
  ``allow_changed_config`` accepts the changes and records them). A workdir
  created here and refused before anything was written in it is removed again.

  Returns the test metrics, the content of ``<workdir>/report/test_metrics.json``.
  """
  clock = profiling.WallClock()  # From here: the process's imports and JAX's start are not in it.
  config_checks.check(config)
  size = model_size.check(config, training=True)  # Before the workdir, data or parameters.
  _say(f'{config.model.name} at {config.image_size} px: {size.describe()}')
  workdir = os.path.abspath(os.path.expanduser(workdir))
  created = jax.process_index() == 0 and not os.path.exists(workdir)
  if jax.process_index() == 0:
    files.check_writable(workdir, '--workdir')
  try:
    with _exclusive(workdir):
      return _train_and_evaluate(config, workdir, clock, allow_changed_config)
  except Exception as e:  # pylint: disable=broad-except  (only tf.data's DataLossError is caught)
    if data.is_damaged_input(e):
      raise data.damaged_input_error(config, e) from None
    raise
  finally:
    if created:
      _remove_if_unused(workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        clock: profiling.WallClock, allow_changed_config: bool) -> dict[str, Any]:
  main = jax.process_index() == 0
  resuming = _has_checkpoints(workdir)
  allow = allow_changed_config
  if resuming:
    run_config.check_resume(workdir, config, allow_changes=allow)
  dataset = data.fingerprint(config)  # Before preparing: changed data builds nothing.
  if resuming:
    run_config.check_dataset(workdir, dataset, allow_changes=allow)
  info = data.prepare(config)
  dataset = data.fingerprint(config, info)
  changed_data = (run_config.check_dataset(workdir, dataset, allow_changes=allow) if resuming
                  else {})
  if changed_data:
    _warn('continuing on changed data as --allow_changed_config asks ('
          + ', '.join(f'{k} {old!r} -> {new!r}' for k, (old, new) in changed_data.items())
          + '); the best checkpoint so far was chosen on the old validation split')
  config_checks.check_classes(config, info.class_names)
  parallel.per_device_batch(config.batch_size, jax.device_count())
  parallel.per_device_batch(config.eval_batch_size, jax.device_count(), 'config.eval_batch_size')
  steps_per_epoch = data.steps_per_epoch(config, info)  # At least one, or a UserError.
  tx, schedule = optim.make(config, steps_per_epoch)
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))

  ckpts = checkpointing.Checkpoints(workdir, keep=config.keep_checkpoints)
  host_state = _initial_state(config, init_rng, tx)
  meta = {'history': [], 'best_val_accuracy': None, 'class_names': list(info.class_names),
          'image_size': config.image_size, 'config_name': config.name, 'partial_epoch': None}
  # Newest readable of latest's kept steps, then best; damaged ones are set aside.
  resumed = ckpts.resume(host_state, warn=_warn)
  if resumed is not None:
    host_state, meta, kind, resumed_step = resumed
    _say(f'resuming from {ckpts.directory}/{kind}/{resumed_step}')
  train_state.check_class_names(meta, info.class_names)
  step = int(host_state.step)
  if main:
    run_config.record(workdir, config, from_step=step, fresh=resumed is None, dataset=dataset)

  runner = parallel.make_runner(config, models.build_model(config, axis_name=steps.AXIS))
  run = _Run(config=config, workdir=workdir, info=info, steps_per_epoch=steps_per_epoch,
             schedule=schedule, runner=runner, ckpts=ckpts,
             scalars=_Scalars(workdir, data.uses_tensorflow(config)),
             profiler=profiling.StepProfiler(config.get('profile_steps', ()), workdir),
             dropout_rng=dropout_rng, meta=meta, state=runner.put_state(host_state), step=step,
             clock=clock, first_step=step)
  del host_state
  placement = resident.choose(config, info.split_sizes['train'], jax.process_count())
  run.placement = placement.kind
  teachers = distill.teachers(config)
  if teachers and placement.kind != 'device':
    raise UserError(f'config.distill.teachers needs the training split on the devices, but '
                    f'config.data.placement={config.data.placement!r} streams it '
                    f'({placement.reason}); use placement device or auto')
  if placement.kind == 'device':
    images, labels = data.train_pixels(config)
    teacher = None
    if teachers:
      _say(f'distilling from {len(teachers)} teacher(s): {", ".join(teachers)}')
      teacher = distill.teacher_probabilities(config, teachers, images,
                                              class_names=info.class_names,
                                              progress=main)
    run.feed = resident.ResidentTrain(config, runner, images, labels,
                                      total=info.split_sizes['train'],
                                      process_count=jax.process_count(), teacher=teacher)
  _say(f'{config.name}: {info.split_sizes} examples, {steps_per_epoch} steps/epoch, '
       f'{runner.num_devices} {jax.devices()[0].platform} device(s) ({runner.name}), '
       f'global batch {config.batch_size}')
  _say(placement.describe(data.streamer_name(config)))
  clock.add('setup', time.perf_counter() - clock.started)
  _train(run)
  run.state = run.feed = None  # Frees the devices' copies before the test.
  metrics = {}
  if 'test' in info.split_sizes:
    metrics = _test_best(run, train_state.create(config, init_rng, tx))
  else:
    ckpts.close()
    _say(f'no test split in {config.data.path}: evaluate the best checkpoint with '
         f'--mode=eval on the original data')
  _record_wall_time(run)
  return metrics
