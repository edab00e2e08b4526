"""Training loop: epochs of mapped steps, validation, checkpoints, the test report.

    metrics = train.train_and_evaluate(config, workdir)   # what launch.py --mode=train calls

What a workdir holds afterwards::

    <workdir>/config.json                  the config of the first run, and each resume's changes
    <workdir>/events.out.tfevents.*        TensorBoard scalars (process 0)
    <workdir>/checkpoints/{latest,best}/   orbax checkpoints (bcjax/checkpointing.py)
    <workdir>/report/                      test metrics, figures, text report (bcjax/reporting.py)

Resuming: rerunning the same command restores ``checkpoints/latest`` and goes
on. Everything random is a pure function of the config: parameters of
``config.seed``, dropout of (seed, step), data order and augmentation of
(seed, epoch) (bcjax/data). So a run resumed from an epoch checkpoint - after
SIGKILL, say - replays the lost steps exactly and ends with the same metrics
as an uninterrupted run. SIGTERM and SIGINT save ``latest`` at the current step
(mid-epoch is fine: the resumed epoch skips the batches already seen) before
the process exits as the signal asks. With several processes
(bcjax/distributed.py) they agree first: all save at the next log step or
epoch end after any of them got a signal, then all exit.

A NaN or infinite loss stops training with one line naming the step; no
checkpoint is written after it, so the last good one stays.
"""

import collections
import contextlib
import os
import signal
import sys
import threading
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from bcjax import checkpointing, evaluate, models, optim, packed, parallel, reporting, steps
from bcjax import config_checks, files, profiling, run_config, train_state
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
  the same event records with TensorFlow alone. Without TensorFlow (packed
  data, bcjax/packed.py) there are no event files: ``history.json`` and the
  report's learning curves hold the same epochs.
  """

  def __init__(self, workdir: str):
    self.writer = None
    if jax.process_index() == 0:
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


class _StopSignals:
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

  def _handle(self, signum, frame):
    del frame
    self.received = signum
    signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self.SIGNALS:
        self._old[s] = signal.signal(s, self._handle)
    return self

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    self._old = {}

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
    self.__exit__()
    os.kill(os.getpid(), self.received)
    time.sleep(1)  # Let the default action happen here, not in the next statement.


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
    host = jax.device_get([m for _, m in self.pending])
    for (step, _), m in zip(self.pending, host):
      m = {k: np.asarray(v).reshape(-1)[0].item() for k, v in m.items()}
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


def _initial_state(config, rng, tx):
  """A fresh host state; the cnn_lstm extractor comes from a checkpoint if configured."""
  state = train_state.create(config, rng, tx)
  path = config.model.get('extractor_checkpoint', '')
  if not path:
    return state
  loaded = checkpointing.load_params(path)
  if 'extractor' not in loaded:
    raise UserError(f'config.model.extractor_checkpoint={path} holds no extractor parameters '
                    f'(its parameters: {", ".join(sorted(loaded))})')
  want = jax.tree.map(np.shape, state.params['extractor'])
  if jax.tree.map(np.shape, loaded['extractor']) != want:
    raise UserError(f'the extractor in {path} does not fit config.model.extractor_features')
  params = dict(state.params, extractor=jax.device_get(loaded['extractor']))
  _say(f'extractor loaded from {path}' +
       (' (frozen)' if config.model.get('freeze_extractor') else ''))
  return train_state.create(config, rng, tx, params=params)


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    tqdm.tqdm.write(f'warning: {message}', file=sys.stderr)
    sys.stderr.flush()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_changed_config: bool = False) -> dict[str, Any]:
  """Trains (or resumes) in ``workdir``, then tests the best checkpoint.

  Before any work: the config's values are checked, the workdir must be
  writable, and a resume must not change the run (bcjax/run_config.py;
  ``allow_changed_config`` accepts the changes and records them).

  Returns the test metrics, the content of ``<workdir>/report/test_metrics.json``.
  """
  config_checks.check(config)
  data = packed.input_for(config)  # bcjax.data (tf.data), or packed splits without TensorFlow.
  workdir = os.path.abspath(os.path.expanduser(workdir))
  main = jax.process_index() == 0
  if main:
    files.check_writable(workdir, '--workdir')
  latest_dir = os.path.join(checkpointing.checkpoint_dir(workdir), 'latest')
  if os.path.isdir(latest_dir) and any(n.isdigit() for n in os.listdir(latest_dir)):
    run_config.check_resume(workdir, config, allow_changes=allow_changed_config)
  info = data.prepare(config)
  config_checks.check_classes(config, info.class_names)
  parallel.per_device_batch(config.batch_size, jax.device_count())
  parallel.per_device_batch(config.eval_batch_size, jax.device_count(), 'config.eval_batch_size')
  steps_per_epoch = data.steps_per_epoch(config, info)
  if steps_per_epoch < 1:
    raise UserError(f"the train split has {info.split_sizes['train']} examples, fewer than "
                    f'one batch (config.batch_size={config.batch_size})')
  total_steps = config.num_epochs * steps_per_epoch
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
  evaluate.check_class_names(meta, info.class_names)
  step = int(host_state.step)
  if main:
    run_config.record(workdir, config, from_step=step, fresh=resumed is None)

  runner = parallel.make_runner(config, models.build_model(config, axis_name=steps.AXIS))
  state = runner.put_state(host_state)
  del host_state
  scalars = _Scalars(workdir)
  profiler = profiling.StepProfiler(config.get('profile_steps', ()), workdir)
  global_batch = config.batch_size

  def save(kind, step, metrics_sums=None):
    m = dict(meta, partial_epoch=metrics_sums)
    ckpts.save(kind, step, runner.get_state(state), m)

  def exit_on_signal(partial_epoch):
    save('latest', step, partial_epoch)
    _say(f'signal {signal.Signals(stop.received).name}: saved step {step} to '
         f'{ckpts.directory}/latest; rerun the same command to resume')
    scalars.close()
    ckpts.close()
    stop.reraise()

  _say(f'{config.name}: {info.split_sizes} examples, {steps_per_epoch} steps/epoch, '
       f'{runner.num_devices} {jax.devices()[0].platform} device(s) ({runner.name}), '
       f'global batch {global_batch}')
  try:
    with _StopSignals() as stop:
      for epoch in range(step // steps_per_epoch, config.num_epochs):
        skip = step - epoch * steps_per_epoch
        partial = meta.get('partial_epoch')
        acc = _EpochMetrics(partial['sums'] if partial and partial['epoch'] == epoch else None)
        batches = data.make_train_dataset(config, epoch=epoch).skip(skip).as_numpy_iterator()
        bar = tqdm.tqdm(total=steps_per_epoch, initial=skip, unit='step', leave=False,
                        desc=f'epoch {epoch + 1}/{config.num_epochs}', file=sys.stderr,
                        mininterval=1.0, dynamic_ncols=True, disable=not main)
        t_epoch = t_window = time.time()
        epoch_images = 0
        for batch in _prefetch(batches, runner.put_batch, config.data.prefetch):
          profiler.start(step + 1)
          state, metrics = runner.train_step(state, batch, dropout_rng)
          step += 1
          profiler.stop(step, state)
          acc.add(step, metrics)
          done = step == (epoch + 1) * steps_per_epoch
          log_step = step % config.log_every_steps == 0 or done
          if log_step or (stop.received and jax.process_count() == 1):
            w = acc.pull()
            now = time.time()
            images_per_s = w['steps'] * global_batch / max(now - t_window, 1e-9)
            epoch_images += w['steps'] * global_batch
            t_window = now
            bar.set_postfix(loss=f"{_mean(w, 'loss_sum'):.4f}",
                            acc=f"{_mean(w, 'correct'):.3f}",
                            img_s=f'{images_per_s:.0f}', refresh=False)
            scalars.write(step, {'train/loss': _mean(w, 'loss_sum'),
                                 'train/accuracy': _mean(w, 'correct'),
                                 'train/learning_rate': float(schedule(step - 1)),
                                 'train/images_per_second': images_per_s})
          bar.update(1)
          if stop.agreed(log_step):
            bar.close()
            exit_on_signal({'epoch': epoch, 'sums': acc.sums})
        bar.close()
        if acc.pending:
          acc.pull()
        step = (epoch + 1) * steps_per_epoch
        seconds = time.time() - t_epoch
        last = epoch + 1 == config.num_epochs
        entry = {'epoch': epoch + 1, 'step': step,
                 'train_loss': _mean(acc.sums, 'loss_sum'),
                 'train_accuracy': _mean(acc.sums, 'correct'),
                 'val_loss': None, 'val_accuracy': None,
                 'learning_rate': float(schedule(step - 1)), 'seconds': seconds}
        improved = False
        if (epoch + 1) % config.eval_every_epochs == 0 or last:
          val = evaluate.run(runner, state, data.make_eval_dataset(config, 'validation'))
          entry.update(val_loss=val.loss, val_accuracy=val.accuracy)
          score = val.accuracy
          if state.ema_params is not None:  # config.ema_decay: the average, validated too.
            ema = evaluate.run(runner, state.replace(params=state.ema_params),
                               data.make_eval_dataset(config, 'validation'))
            entry.update(val_loss_ema=ema.loss, val_accuracy_ema=ema.accuracy)
            meta['eval_weights'] = 'ema' if ema.accuracy > val.accuracy else 'raw'
            score = max(val.accuracy, ema.accuracy)
          best = meta['best_val_accuracy']
          improved = best is None or score > best
          if improved:
            meta['best_val_accuracy'] = score
        meta['history'] = meta['history'] + [entry]
        if main:  # Every epoch, so a run that is killed keeps its curve too.
          files.write_json(os.path.join(workdir, 'history.json'), meta['history'])
        scalars.write(step, {f'epoch/{k}': v for k, v in entry.items()
                             if k not in ('epoch', 'step', 'seconds')})
        if improved:
          save('best', step)
        if (epoch + 1) % config.checkpoint_every_epochs == 0 or last:
          save('latest', step)
        val_text = (f"  val loss {entry['val_loss']:.4f} acc {entry['val_accuracy']:.4f}"
                    if entry['val_loss'] is not None else '')
        if entry.get('val_accuracy_ema') is not None:
          val_text += f" (ema {entry['val_accuracy_ema']:.4f})"
        _say(f"epoch {epoch + 1}/{config.num_epochs}  step {step}  train loss "
             f"{entry['train_loss']:.4f} acc {entry['train_accuracy']:.4f}{val_text}  "
             f"lr {entry['learning_rate']:.2e}  {epoch_images / max(seconds, 1e-9):.0f} img/s  "
             f"{seconds:.1f}s" + ('  *best*' if improved else ''))
        if stop.agreed(True):  # Arrived during validation or saving.
          exit_on_signal(None)
    if ckpts.step('latest') != step:
      save('latest', step)
  except NonFiniteLossError as e:
    last = ckpts.step('latest')
    raise NonFiniteLossError(f'{e}; last good checkpoint: '
                             + (f'{ckpts.directory}/latest/{last}' if last is not None
                                else 'none')) from None
  finally:
    profiler.close()
    scalars.close()
  del state
  if 'test' not in info.split_sizes:
    ckpts.close()
    _say(f'no test split in {config.data.path}: evaluate the best checkpoint with '
         f'--mode=eval on the original data')
    return {}

  # -- Test the best checkpoint.
  best_state, best_meta = ckpts.restore('best', train_state.create(config, init_rng, tx))
  kind, best_step = ckpts.find('best')
  ckpts.close()
  if best_meta.get('eval_weights') == 'ema':  # The average validated better: test it.
    best_state = best_state.replace(params=best_state.ema_params)
  result = evaluate.run(runner, runner.put_state(best_state),
                        data.make_eval_dataset(config, 'test'), collect=True)
  out_dir = os.path.join(workdir, 'report')
  metrics = evaluate.report(
      config, result, info.class_names, split='test', out_dir=out_dir,
      expected_examples=info.split_sizes['test'], history=meta['history'],
      extra={'checkpoint': kind, 'checkpoint_step': int(best_step), 'workdir': workdir,
             'best_val_accuracy': meta['best_val_accuracy'],
             'epochs_trained': len(meta['history']),
             **({'weights': best_meta.get('eval_weights', 'raw')}
                if config.get('ema_decay', 0.0) > 0 else {})})
  _say(f'test (best checkpoint, step {best_step}): {reporting.format_metrics(metrics)}')
  _say(f'report written to {out_dir}')
  return metrics
