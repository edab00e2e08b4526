"""Faults and bad input around runs: checkpoints, resume, settings, outputs, predict.

Each test builds its fault in a temporary folder and checks what a user gets:
the run goes on correctly (a resumed run ends with the metrics of an
uninterrupted one), or it stops before the long work with one ``error:`` line
(a UserError; a few cases run ``launch.py`` itself to check the line, the exit
status and that no traceback is printed), and what was saved survives.

One tiny CNN run (2 epochs of 5 steps on synthetic data, ``latest`` keeps
steps 5 and 10) is trained once and copied for each fault.
"""

import csv
import errno
import glob
import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bcjax import checkpointing, config_checks, files, predict, predictions_csv, run_config
from bcjax import train
from bcjax import train_state, workdir_lock
from bcjax.errors import UserError
from conftest import ROOT, override


def _config(**fields):
  from configs import cnn
  config = cnn.get_config('tiny')
  config.num_epochs = 2
  return override(config, **fields)


def _metrics(m):
  return {k: v for k, v in m.items() if k != 'workdir'}


def _history(workdir):
  with open(os.path.join(workdir, 'history.json')) as f:
    return [{k: v for k, v in h.items() if k != 'seconds'} for h in json.load(f)]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(workdir, final test metrics, history) of one uninterrupted 2-epoch run."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  metrics = train.train_and_evaluate(_config(), workdir)
  return workdir, _metrics(metrics), _history(workdir)


@pytest.fixture
def run_copy(trained, tmp_path):
  workdir = str(tmp_path / 'run')
  shutil.copytree(trained[0], workdir)
  return workdir


def _launch(*args, cwd=ROOT):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'), *args], cwd=cwd,
                        env=env, capture_output=True, text=True, timeout=300)


def _one_error_line(result, *needles):
  assert result.returncode == 2, result.stdout[-1500:] + result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  lines = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(lines) == 1, result.stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], lines[0]
  return lines[0]


# -- Damaged checkpoints -------------------------------------------------------


def _step_dir(workdir, kind, step=None):
  series = os.path.join(workdir, 'checkpoints', kind)
  step = step if step is not None else max(int(s) for s in os.listdir(series) if s.isdigit())
  return os.path.join(series, str(step)), step


def _damage(step_dir, how):
  data_files = glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
  if how == 'truncated_data':
    for f in data_files:
      os.truncate(f, os.path.getsize(f) // 2)
  elif how == 'zeroed_data':
    for f in data_files:
      size = os.path.getsize(f)
      with open(f, 'wb') as fh:
        fh.write(bytes(size))
  elif how == 'missing_manifest':
    os.remove(os.path.join(step_dir, 'state', 'manifest.ocdbt'))
  elif how == 'missing_metadata':
    os.remove(os.path.join(step_dir, 'state', '_METADATA'))
  elif how == 'deleted_subfolder':
    shutil.rmtree(os.path.join(step_dir, 'state'))
  elif how == 'zeroed_meta':
    with open(os.path.join(step_dir, 'meta', 'metadata'), 'wb') as fh:
      fh.write(bytes(16))
  else:
    raise ValueError(how)


DAMAGE = ['truncated_data', 'zeroed_data', 'missing_manifest', 'missing_metadata',
          'deleted_subfolder', 'zeroed_meta']


@pytest.mark.parametrize('how', DAMAGE)
def test_eval_names_a_damaged_checkpoint_and_the_others(run_copy, how):
  step_dir, step = _step_dir(run_copy, 'best')
  _damage(step_dir, how)
  with pytest.raises(checkpointing.DamagedCheckpointError) as e:
    train_state.load_for_inference(_config(), run_copy, 'best')
  message = str(e.value)
  assert f'checkpoint best/{step} in ' in message and 'is damaged (' in message
  assert 'other checkpoints: latest 5, 10' in message and '--checkpoint=latest' in message
  state, _, kind, _ = train_state.load_for_inference(_config(), run_copy, 'latest')
  assert kind == 'latest' and state.params  # The others still read.


def test_eval_and_predict_of_a_damaged_checkpoint_are_one_line(run_copy, tmp_path):
  _damage(_step_dir(run_copy, 'best')[0], 'zeroed_data')
  image = tmp_path / 'cell.png'
  Image.fromarray(np.full((30, 30, 3), 128, np.uint8)).save(image)
  for args in (['--mode=eval'], ['--mode=predict', '--images', str(image),
                                 '--out', str(tmp_path / 'p.csv')]):
    result = _launch('--config', 'configs/cnn.py:tiny', '--workdir', run_copy, *args)
    _one_error_line(result, 'is damaged', 'other checkpoints: latest 5, 10')
  assert not os.path.exists(tmp_path / 'p.csv')


def _damage_latest_and_rerun(workdir, steps, how='truncated_data'):
  for step in steps:
    _damage(_step_dir(workdir, 'latest', step)[0], how)
  shutil.rmtree(os.path.join(workdir, 'report'))
  warnings = []
  original = train._warn  # pylint: disable=protected-access
  train._warn = warnings.append  # pylint: disable=protected-access
  try:
    metrics = train.train_and_evaluate(_config(), workdir)
  finally:
    train._warn = original  # pylint: disable=protected-access
  return _metrics(metrics), warnings


def test_resume_falls_back_from_a_damaged_latest_to_the_previous_step(trained, run_copy):
  _, expected, history = trained
  metrics, warnings = _damage_latest_and_rerun(run_copy, [10])
  assert len(warnings) == 1 and 'checkpoint latest/10 is damaged' in warnings[0]
  assert 'damaged/latest-10' in warnings[0]
  assert metrics == expected and _history(run_copy) == history  # Epoch 2 replayed exactly.
  assert os.path.isdir(os.path.join(run_copy, 'checkpoints', 'damaged', 'latest-10'))  # Kept.
  assert checkpointing.Checkpoints(run_copy, read_only=True).step('latest') == 10


@pytest.mark.slow
def test_resume_falls_back_to_best_when_every_latest_is_damaged(trained, run_copy):
  _, expected, _ = trained
  metrics, warnings = _damage_latest_and_rerun(run_copy, [5, 10], 'missing_manifest')
  assert [w.split(' is damaged')[0] for w in warnings] == ['checkpoint latest/10',
                                                           'checkpoint latest/5']
  assert metrics == expected


def test_another_model_or_optimiser_is_not_called_damaged(run_copy):
  other_model = _config(**{'model.dense_features': 32})
  ckpts = checkpointing.Checkpoints(run_copy, read_only=True)
  import jax
  from bcjax import optim, train_state
  for config, words in ((other_model, "another model's parameters"),
                        (_config(**{'optimizer.name': 'sgd'}), 'another optimiser state')):
    tx, _ = optim.make(config, 5)
    target = train_state.create(config, jax.random.key(0), tx)
    with pytest.raises(checkpointing.MismatchedCheckpointError, match=words):
      ckpts.restore('latest', target)
  ckpts.close()
  with pytest.raises(UserError, match='does not fit config.model') as e:
    train_state.load_for_inference(other_model, run_copy, 'best')
  assert 'damaged' not in str(e.value)


def test_a_failed_save_names_the_folder_and_the_last_good_checkpoint(tmp_path, monkeypatch):
  import orbax.checkpoint as ocp
  real_save = ocp.CheckpointManager.save
  saves = []

  def save(self, step, *args, **kwargs):
    saves.append(step)
    if step == 10:
      raise OSError(errno.ENOSPC, 'No space left on device')
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', save)
  workdir = str(tmp_path / 'run')
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(_config(), workdir)
  message = str(e.value)
  assert 'cannot save checkpoint latest/10' in message and 'no space left on device' in message
  assert f'last good checkpoint: {workdir}/checkpoints/latest/5' in message
  monkeypatch.undo()
  state, _ = checkpointing.Checkpoints(workdir, read_only=True).read_raw('latest', 5)
  assert state['params']  # What was saved before is intact.


def test_an_unwritable_workdir_or_out_is_refused_before_any_work(tmp_path):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  result = _launch('--config', 'configs/cnn.py:tiny', '--workdir', str(blocker / 'run'))
  _one_error_line(result, '--workdir', 'is not writable')
  assert 'examples' not in result.stdout  # Nothing was prepared or trained.
  with pytest.raises(UserError, match='--out .* is not writable'):
    files.check_writable(str(blocker / 'out'), '--out')


# -- Atomic writes -------------------------------------------------------------


def test_a_crash_while_writing_leaves_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / 'history.json'
  files.write_json(str(path), [1, 2])

  class Crash(Exception):
    pass

  with pytest.raises(Crash):
    with files.atomic_write(str(path)) as f:
      f.write('[1, 2, 3')
      raise Crash()
  assert json.loads(path.read_text()) == [1, 2]
  assert os.listdir(tmp_path) == ['history.json']


def test_every_result_file_is_written_whole(trained, tmp_path, monkeypatch):
  """config.json, history.json, the report, predictions: all through files.atomic_*."""
  written = []
  real_write, real_path = files.atomic_write, files.atomic_path

  def spy_write(path, *a, **k):
    written.append(os.path.basename(path))
    return real_write(path, *a, **k)

  def spy_path(path):
    written.append(os.path.basename(path))
    return real_path(path)

  monkeypatch.setattr(files, 'atomic_write', spy_write)
  monkeypatch.setattr(files, 'atomic_path', spy_path)
  workdir = tmp_path / 'run'
  shutil.copytree(trained[0], workdir)
  shutil.rmtree(workdir / 'report')
  for name in ('history.json', 'config.json'):
    (workdir / name).unlink()
  # Resume a finished run: nothing to train, the report and files are written again
  # (without config.json the resume is only allowed when asked).
  train.train_and_evaluate(_config(), str(workdir), allow_changed_config=True)
  report = set(os.listdir(workdir / 'report'))
  assert {'config.json', 'test_metrics.json', 'classification_report.txt',
          'test_predictions.csv', 'confusion_matrix.png'} <= set(written)
  assert report <= set(written)
  assert not [n for n in os.listdir(workdir) + list(report) if n.endswith('.tmp')]


# -- Resuming with another config ---------------------------------------------


def test_a_resume_that_changes_the_run_is_refused_and_named(run_copy):
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(_config(batch_size=16, seed=3), run_copy)
  message = str(e.value)
  assert 'batch_size 8 -> 16' in message and 'seed 0 -> 3' in message
  assert '--allow_changed_config' in message
  # Free fields (logging, checkpoints kept, more epochs at a constant rate) resume.
  assert not run_config.check_resume(
      run_copy, _config(log_every_steps=1, keep_checkpoints=3, num_epochs=3),
      allow_changes=False)


def test_an_allowed_change_is_recorded_in_config_json(run_copy):
  train.train_and_evaluate(_config(**{'data.shuffle_buffer': 32}), run_copy,
                           allow_changed_config=True)
  with open(os.path.join(run_copy, 'config.json')) as f:
    recorded = json.load(f)
  assert recorded['data']['shuffle_buffer'] == 64  # The first run's config stays on top.
  runs = recorded['bcjax_runs']
  assert [r['from_step'] for r in runs] == [0, 10]
  assert runs[-1]['changed'] == {'data.shuffle_buffer': 32}


# -- Settings ------------------------------------------------------------------


@pytest.mark.parametrize('field,value,words', [
    ('eval_every_epochs', 0, 'config.eval_every_epochs=0 must be a whole number >= 1'),
    ('log_every_steps', -1, 'config.log_every_steps=-1 must be'),
    ('checkpoint_every_epochs', 0, 'config.checkpoint_every_epochs=0'),
    ('num_epochs', 0, 'config.num_epochs=0'),
    ('image_size', 0, 'config.image_size=0'),
    ('batch_size', 0, 'config.batch_size=0'),
    ('eval_batch_size', -8, 'config.eval_batch_size=-8'),
    ('optimizer.learning_rate', 0.0, 'config.optimizer.learning_rate=0.0 must be > 0'),
    ('optimizer.b2', 1.5, 'config.optimizer.b2=1.5 must be >= 0 and < 1'),
    ('label_smoothing', 1.0, 'config.label_smoothing=1.0'),
    ('data.augment.stain', 1.0, 'config.data.augment.stain=1.0 must be >= 0 and < 1'),
    ('data.augment.mixup_alpha', -0.2, 'config.data.augment.mixup_alpha=-0.2 must be >= 0'),
    ('distill.weight', 1.5, 'config.distill.weight=1.5 must be >= 0 and <= 1'),
    ('distill.teachers', 'runs/a', "config.distill.teachers needs the training split on the devices"),
    ('model.dropout_dense', 1.2, 'config.model.dropout_dense=1.2 must be a rate in [0, 1)'),
    ('data.val_fraction', 0.0, 'must each be in (0, 1) and leave a test split'),
    ('data.train_fraction', 0.9, 'leave a test split'),
    ('model.conv_impl', 'fast', "config.model.conv_impl='fast' is not known; allowed: auto"),
    ('dtype', 'float16', "config.dtype='float16' is not known; allowed: float32, bfloat16"),
    ('data.source', 'imagenet', "allowed: pbc, bloodmnist, synthetic, packed"),
    ('parallel', 'ddp', "allowed: pmap, shard_map"),
])
def test_bad_settings_are_one_line_naming_the_field(field, value, words):
  with pytest.raises(UserError, match=None) as e:
    config_checks.check(_config(**{field: value}))
  assert words in str(e.value) and '\n' not in str(e.value)


def test_num_classes_must_match_the_data(tmp_path):
  with pytest.raises(UserError, match='config.num_classes=5 but the data has 8 classes'):
    train.train_and_evaluate(_config(num_classes=5), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / 'checkpoints')


def test_a_bad_setting_stops_launch_before_any_work(tmp_path):
  result = _launch('--config', 'configs/cnn.py:tiny', '--workdir', str(tmp_path / 'run'),
                   '--config.eval_every_epochs=0')
  _one_error_line(result, 'config.eval_every_epochs=0')
  assert not os.path.exists(tmp_path / 'run')


# -- Predict -------------------------------------------------------------------


def _cell(path):
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (36, 40, 3), np.uint8)).save(path)
  return str(path)


@pytest.mark.slow
def test_predict_paths_with_commas_and_formula_names(trained, tmp_path):
  workdir = trained[0]
  comma = _cell(tmp_path / 'a,b.png')
  formula = _cell(tmp_path / '=HYPERLINK(1).png')
  plain = _cell(tmp_path / 'plain.png')
  out = tmp_path / 'p.csv'
  result = _launch('--config', os.path.join(ROOT, 'configs', 'cnn.py:tiny'), '--mode=predict',
                   '--workdir', workdir,
                   '--images', comma, '--images', '=HYPERLINK(1).png', '--out', str(out),
                   plain, cwd=str(tmp_path))
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out, newline='') as f:
    rows = list(csv.DictReader(f))
  assert [r['path'] for r in rows] == [comma, "'=HYPERLINK(1).png", plain]
  assert all(r['predicted_class'] and not r['error'] for r in rows)
  assert formula  # (written as a relative name above, so the cell starts with '=')
  assert predictions_csv.csv_cell('-1+2') == "'-1+2" and predictions_csv.csv_cell('@x') == "'@x"
  assert predictions_csv.csv_cell('+x') == "'+x"
  assert predictions_csv.csv_cell('cell.png') == 'cell.png'


def test_predict_with_nothing_readable_fails(trained, tmp_path):
  (tmp_path / 'broken.jpg').write_bytes(b'not a jpeg')
  out = tmp_path / 'p.csv'
  with pytest.raises(UserError, match='no image could be predicted: all 2 unreadable'):
    predict.predict_files(_config(), trained[0], [str(tmp_path / 'broken.jpg'),
                                                 str(tmp_path / 'missing.png')],
                          out_csv=str(out))
  assert len(out.read_text().splitlines()) == 3  # The reasons are in the CSV.


# -- One training per workdir --------------------------------------------------


_HOLD_LOCK = '''
import sys, time
from bcjax import workdir_lock
with workdir_lock.hold(sys.argv[1]):
  print('held', flush=True)
  time.sleep(600)
'''


def _hold_lock_in_another_process(workdir):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  holder = subprocess.Popen([sys.executable, '-c', _HOLD_LOCK, workdir], env=env,
                            stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == 'held'
  return holder


def test_a_second_training_in_a_busy_workdir_is_refused_and_a_dead_ones_lock_is_not(
    trained, run_copy):
  holder = _hold_lock_in_another_process(run_copy)
  try:
    before = {n: os.path.getmtime(os.path.join(run_copy, n)) for n in ('config.json',
                                                                       'history.json')}
    with pytest.raises(workdir_lock.WorkdirBusyError) as e:
      train.train_and_evaluate(_config(seed=1), run_copy)
    message = str(e.value)
    assert f'is in use by another training (process {holder.pid} on ' in message
    assert 'use another --workdir' in message and 'optimiser' not in message
    # Nothing of the first run was touched.
    assert before == {n: os.path.getmtime(os.path.join(run_copy, n)) for n in before}
    # Reading a workdir while it trains takes no lock.
    out = os.path.join(os.path.dirname(run_copy), 'p.csv')
    predict.predict_files(_config(), run_copy, [_cell(os.path.join(os.path.dirname(run_copy),
                                                                   'c.png'))], out_csv=out)
    assert os.path.exists(out)
  finally:
    holder.kill()
    holder.wait()
  # SIGKILLed holder: its lock died with it (the file and its text remain).
  assert os.path.exists(os.path.join(run_copy, workdir_lock.LOCK_FILE))
  assert _metrics(train.train_and_evaluate(_config(), run_copy)) == trained[1]


@pytest.mark.slow
def test_two_trainings_started_in_one_workdir_one_runs_and_one_is_refused(tmp_path):
  workdir = str(tmp_path / 'run')
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(ROOT))
  procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, 'launch.py'), '--config',
                             'configs/cnn.py:tiny', '--workdir', workdir, f'--config.seed={seed}',
                             '--config.num_epochs=20'],  # Long enough to overlap.
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for seed in (0, 1)]
  results = [p.communicate(timeout=300) for p in procs]
  codes = sorted(p.returncode for p in procs)
  assert codes == [0, 2], [r[1][-2000:] for r in results]
  winner = [p.returncode for p in procs].index(0)
  refused = results[1 - winner][1]
  assert 'Traceback' not in refused
  assert [l for l in refused.splitlines() if l.startswith('error:')] == [
      l for l in refused.splitlines() if 'is in use by another training' in l]
  with open(os.path.join(workdir, 'config.json')) as f:
    recorded = json.load(f)
  with open(os.path.join(workdir, 'report', 'test_metrics.json')) as f:
    report = json.load(f)
  assert recorded['seed'] == winner and report['seed'] == winner
  assert len(recorded['bcjax_runs']) == 1


def test_the_lock_is_released_on_every_exit_and_a_refused_new_workdir_is_removed(tmp_path):
  workdir = str(tmp_path / 'run')
  with pytest.raises(UserError, match='fewer than one batch'):
    train.train_and_evaluate(_config(batch_size=48), workdir)
  assert not os.path.exists(workdir)  # Created for the run, refused, removed.
  os.makedirs(workdir)
  with pytest.raises(UserError, match='fewer than one batch'):
    train.train_and_evaluate(_config(batch_size=48), workdir)
  with workdir_lock.hold(workdir):  # Released by the failed run.
    with pytest.raises(workdir_lock.WorkdirBusyError, match=f'process {os.getpid()} on'):
      with workdir_lock.hold(workdir):
        pass
  assert os.path.isdir(workdir)  # It existed before: left as found (with the lock file).


def test_without_flock_the_lock_file_is_the_lock_and_a_dead_holders_is_taken_over(
    tmp_path, monkeypatch):
  import socket

  def no_flock(fd, op):
    raise OSError(errno.ENOLCK, 'No locks available')

  monkeypatch.setattr(workdir_lock.fcntl, 'flock', no_flock)
  path = tmp_path / workdir_lock.LOCK_FILE
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True).stdout.strip()
  path.write_text(json.dumps({'pid': int(dead), 'host': socket.gethostname()}))
  with workdir_lock.hold(str(tmp_path)):  # Its holder is gone: taken over.
    assert json.loads(path.read_text())['pid'] == os.getpid()
    with pytest.raises(workdir_lock.WorkdirBusyError, match=f'process {os.getpid()}'):
      with workdir_lock.hold(str(tmp_path)):
        pass
  assert not path.exists()  # Released.
  path.write_text(json.dumps({'pid': 1, 'host': 'elsewhere'}))
  with pytest.raises(workdir_lock.WorkdirBusyError, match=f'delete {path}'):
    with workdir_lock.hold(str(tmp_path)):
      pass


# -- Resuming on changed data, or without a record -----------------------------


@pytest.mark.slow
def test_a_resume_on_a_pbc_folder_that_gained_images_is_refused_before_building(tmp_path):
  from data_fixtures import jpeg_bytes, make_pbc_folder
  folder = make_pbc_folder(str(tmp_path), per_class=6, junk=False)
  tfds_dir = str(tmp_path / 'tfds')
  config = _config(num_epochs=1, **{'data.source': 'pbc', 'data.path': folder,
                                    'data.tfds_dir': tfds_dir})
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'config.json')) as f:
    first = json.load(f)['bcjax_dataset']
  assert first['source'] == 'pbc' and first['files'] == 48 and first['path'] == folder
  assert sum(first['split_sizes'][s] for s in ('train', 'validation', 'test')) == 48
  for i in range(2):
    with open(os.path.join(folder, 'basophil', f'new_{i}.jpg'), 'wb') as f:
      f.write(jpeg_bytes(0, 100 + i))
  built = sorted(os.listdir(os.path.join(tfds_dir, 'pbc')))
  history = _history(workdir)
  longer = override(config, num_epochs=2)
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(longer, workdir)
  message = str(e.value)
  assert 'holds a run trained on other data (files 48 -> 50, content ' in message
  assert '--allow_changed_config' in message and '\n' not in message
  assert sorted(os.listdir(os.path.join(tfds_dir, 'pbc'))) == built  # Nothing built.
  assert _history(workdir) == history
  # Allowed: it goes on, and the record says which data the later steps used.
  train.train_and_evaluate(longer, workdir, allow_changed_config=True)
  with open(os.path.join(workdir, 'config.json')) as f:
    recorded = json.load(f)
  assert recorded['bcjax_dataset'] == first
  changed = recorded['bcjax_runs'][-1]['dataset_changed']
  assert changed['files'] == 50 and changed['content'] != first['content']


def test_a_resume_on_another_packed_file_is_refused(tmp_path):
  from bcjax.data import packed, synthetic
  path = str(tmp_path / 'cells.npz')

  def pack(n):
    splits = {}
    for split, count in (('train', n), ('validation', 8), ('test', 8)):
      images, labels = synthetic.make_split(seed=1, split=split, num=count, image_size=32)
      splits[split] = (images, labels)
    packed.write_arrays(path, splits, synthetic.CLASS_NAMES, provenance={})

  pack(16)
  config = _config(num_epochs=1, **{'data.source': 'packed', 'data.path': path})
  workdir = str(tmp_path / 'run')
  train.train_and_evaluate(config, workdir)
  pack(24)
  with pytest.raises(UserError, match=r'trained on other data \(content .* -> .*\)'):
    train.train_and_evaluate(override(config, num_epochs=2), workdir)
  train.train_and_evaluate(config, workdir, allow_changed_config=True)  # Finished: tests only.
  with open(os.path.join(workdir, 'config.json')) as f:
    recorded = json.load(f)
  assert recorded['bcjax_dataset']['split_sizes']['train'] == 16
  assert recorded['bcjax_runs'][-1]['dataset_changed']['split_sizes']['train'] == 24


@pytest.mark.parametrize('damage,reason', [('delete', 'is missing'),
                                           ('truncate', 'is not valid JSON'),
                                           ('list', 'is not a JSON object')])
def test_a_resume_without_a_readable_config_json_is_refused_unless_allowed(
    run_copy, damage, reason):
  path = os.path.join(run_copy, 'config.json')
  if damage == 'delete':
    os.remove(path)
  elif damage == 'truncate':
    with open(path, 'r+') as f:
      f.truncate(40)
  else:
    with open(path, 'w') as f:
      f.write('[1, 2]')
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(_config(num_epochs=3), run_copy)
  message = str(e.value)
  assert f'{path} {reason}' in message and 'cannot be checked' in message
  assert '--allow_changed_config' in message and '\n' not in message
  assert not os.path.exists(path) or damage != 'delete'  # Left as found.


def test_an_allowed_resume_without_config_json_says_the_record_was_recreated(run_copy):
  os.remove(os.path.join(run_copy, 'config.json'))
  train.train_and_evaluate(_config(), run_copy, allow_changed_config=True)  # Tests only.
  with open(os.path.join(run_copy, 'config.json')) as f:
    recorded = json.load(f)
  (run,) = recorded['bcjax_runs']  # Not a fresh run's entry from step 0.
  assert run['from_step'] == 10 and 'missing or unreadable at step 10' in run[
      'config_json_recreated']


# -- Outputs never replace inputs ----------------------------------------------


@pytest.fixture
def cells(tmp_path):
  folder = tmp_path / 'cells'
  folder.mkdir()
  for name in ('BA_101381.jpg', 'NE_2.png'):
    _cell(folder / name)
  return folder


def _no_model(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError('a model was loaded before the output was checked')
  monkeypatch.setattr(train_state, 'load_for_inference', refuse)


def test_predict_out_that_is_an_input_an_image_or_a_folder_is_refused_before_any_work(
    trained, cells, tmp_path, monkeypatch):
  _no_model(monkeypatch)
  original = (cells / 'BA_101381.jpg').read_bytes()
  shutil.copy(cells / 'NE_2.png', tmp_path / 'scan')  # An image without an extension.
  for out, args, words in (
      (cells / 'BA_101381.jpg', [str(cells)], 'names an image'),
      (cells / 'BA_101381.jpg', [str(cells / 'BA_101381.jpg')], 'is one of the inputs'),
      (tmp_path / 'scan', [str(cells)], 'names an image'),
      (tmp_path / 'scan', [str(tmp_path / 'scan')], 'is one of the inputs'),
      (cells, [str(cells)], 'is a folder, but one CSV file is written there'),
      (tmp_path / 'new.PNG', [str(cells)], 'names an image'),
      (os.path.join(trained[0], 'config.json'), [str(cells)], 'is one of the inputs'),
      (os.path.join(trained[0], 'checkpoints', 'p.csv'), [str(cells)],
       'checkpoints, which this command reads')):
    with pytest.raises(UserError, match=words):
      predict.predict_files(_config(), trained[0], args, out_csv=str(out))
  assert (cells / 'BA_101381.jpg').read_bytes() == original
  assert sorted(os.listdir(cells)) == ['BA_101381.jpg', 'NE_2.png']


def test_predict_out_onto_an_input_image_is_one_line_from_launch(trained, cells):
  result = _launch('--config', 'configs/cnn.py:tiny', '--workdir', trained[0],
                   '--mode=predict', '--out', str(cells / 'BA_101381.jpg'), str(cells))
  _one_error_line(result, f'--out {cells}/BA_101381.jpg names an image')
  with Image.open(cells / 'BA_101381.jpg') as image:
    assert image.format == 'JPEG'


def test_folder_outputs_that_are_files_or_inside_an_input_folder_are_refused(
    trained, cells, tmp_path, monkeypatch):
  from bcjax import evaluate, explain, export
  _no_model(monkeypatch)
  a_file = tmp_path / 'notes.txt'
  a_file.write_text('mine')
  with pytest.raises(UserError, match='is inside the input folder'):
    explain.explain_workdir(_config(), trained[0], [str(cells)], str(cells / 'explained'))
  with pytest.raises(UserError, match='notes.txt is a file, but a folder is written there'):
    explain.explain_workdir(_config(), trained[0], [str(cells)], str(a_file))
  with pytest.raises(UserError, match='notes.txt is a file, but a folder is written there'):
    export.export_workdir(_config(), trained[0], str(a_file))
  with pytest.raises(UserError, match='notes.txt is a file, but a folder is written there'):
    evaluate.evaluate_workdir(_config(), trained[0], out_dir=str(a_file))
  best = os.path.join(trained[0], 'checkpoints', 'best')
  with pytest.raises(UserError, match='checkpoints, which this command reads'):
    evaluate.evaluate_workdir(_config(), trained[0], out_dir=best)
  with pytest.raises(UserError, match='checkpoints, which this command reads'):
    export.export_workdir(_config(), trained[0], best)
  assert a_file.read_text() == 'mine' and sorted(os.listdir(cells)) == ['BA_101381.jpg',
                                                                         'NE_2.png']


def test_pack_out_onto_its_own_input_or_a_folder_is_refused(tmp_path):
  from bcjax.data import packed
  from data_fixtures import make_bloodmnist_npz
  source = make_bloodmnist_npz(str(tmp_path / 'bloodmnist.npz'))
  before = open(source, 'rb').read()
  config = _config(**{'data.source': 'bloodmnist', 'data.path': source, 'image_size': 28})
  with pytest.raises(UserError, match='is one of the inputs'):
    packed.pack(config, source)
  (tmp_path / 'dir.npz').mkdir()
  with pytest.raises(UserError, match='is a folder, but one .npz file is written there'):
    packed.pack(config, str(tmp_path / 'dir.npz'))
  assert open(source, 'rb').read() == before


def test_eval_of_a_missing_checkpoint_leaves_no_out_folder(trained, tmp_path):
  from bcjax import evaluate
  out = tmp_path / 'eval'
  with pytest.raises(UserError, match='no checkpoint at step 999 .* saved steps: 5, 10'):
    evaluate.evaluate_workdir(_config(), trained[0], checkpoint='999', out_dir=str(out))
  assert not out.exists()


def test_an_ensemble_naming_a_member_twice_or_with_a_corrupt_config_json_is_one_line(
    trained, run_copy, tmp_path):
  from bcjax import evaluate
  out = tmp_path / 'eval'
  for ensemble, words in (([trained[0] + '/'], 'is the same workdir as --workdir'),
                          ([run_copy, run_copy], f'--ensemble {run_copy} is the same workdir '
                                                 f'as --ensemble {run_copy}')):
    with pytest.raises(UserError, match=words):
      evaluate.evaluate_workdir(_config(), trained[0], out_dir=str(out), ensemble=ensemble)
    with pytest.raises(UserError, match=words):
      predict.predict_files(_config(), trained[0], [_cell(tmp_path / 'c.png')],
                            out_csv=str(tmp_path / 'p.csv'), ensemble=ensemble)
  assert not out.exists()
  with open(os.path.join(run_copy, 'config.json'), 'r+') as f:
    f.truncate(30)
  with pytest.raises(UserError, match=r'config.json is unreadable \(.*\); an ensemble member'):
    predict.predict_files(_config(), trained[0], [_cell(tmp_path / 'c.png')],
                          out_csv=str(tmp_path / 'p.csv'), ensemble=[run_copy])


def test_a_file_without_an_extension_in_a_folder_is_predicted_like_a_named_one(cells):
  shutil.copy(cells / 'NE_2.png', cells / 'scan')
  (cells / 'notes').write_text('not an image')
  (cells / 'notes.txt').write_text('not an image either')
  assert predict.expand_paths([str(cells)]) == [
      str(cells / n) for n in ('BA_101381.jpg', 'NE_2.png', 'scan')]


# -- Sizes the model cannot take or the machine cannot hold --------------------


@pytest.mark.parametrize('size', [1, 4, 8, 9])
def test_an_image_size_too_small_for_the_model_is_one_line_naming_the_smallest(size, tmp_path):
  from bcjax import model_size
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(_config(image_size=size), str(tmp_path / 'run'))
  message = str(e.value)
  assert message.startswith(f"config.image_size={size} is too small for model 'cnn'")
  assert message.endswith('the smallest size it takes is 10') and '\n' not in message
  assert not os.path.exists(tmp_path / 'run')
  assert model_size.check(_config(image_size=10), training=True).params > 0


@pytest.mark.parametrize('fields,words', [
    ({'image_size': 6400}, '10,459,581,960 parameters'),  # configs/cnn.py at 6400 px.
    ({'image_size': 100_000}, 'parameters'),
    ({'batch_size': 100_000_000}, 'activations'),
])
def test_a_size_beyond_the_machines_memory_is_refused_before_initialising(
    fields, words, tmp_path, monkeypatch):
  from bcjax import model_size
  from configs import cnn
  config = override(cnn.get_config(), **fields)

  def no_init(*args, **kwargs):
    raise AssertionError('initialised')

  monkeypatch.setattr(train_state, 'create', no_init)
  monkeypatch.setattr(model_size, 'machine_memory', lambda: (64 * 2**30, 'host memory'))
  with pytest.raises(UserError) as e:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  message = str(e.value)
  assert words in message and 'more than the 64.0 GiB of host memory' in message
  assert '\n' not in message and not os.path.exists(tmp_path / 'run')


def test_the_memory_estimate_counts_what_training_holds():
  from bcjax import model_size
  config = _config()
  found = model_size.estimate(config, training=True, device_count=1)
  assert found.params == 167_432  # configs/cnn.py:tiny at 32 px, as --mode=summary counts.
  assert found.state_bytes == 4 * 4 * found.params  # Parameters, gradients, Adam's two moments.
  inference = model_size.estimate(config, training=False, device_count=1)
  assert inference.state_bytes == 4 * found.params
  # Activations: per image the same, for twice the images (16 vs 8) but not kept twice.
  assert inference.activation_bytes == found.activation_bytes
  with pytest.raises(UserError, match='more than the 1.0 MiB of host memory'):
    model_size.check(config, training=True, memory=(2**20, 'host memory'))


# -- Signals inherited as ignored ----------------------------------------------


_IGNORED_SIGINT = r'''
import os, signal, sys
from bcjax import stop_signals
assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # Inherited (cmd & in a script).
if sys.argv[1] == 'returning':
  signal.signal(signal.SIGINT, lambda *a: None)  # A handler that returns.
with stop_signals.StopSignals() as stop:
  os.kill(os.getpid(), signal.SIGINT)
  assert stop.received == signal.SIGINT
  print('caught', flush=True)
  stop.reraise()
print('went on', flush=True)
'''


def _with_sigint_ignored(argv):
  """``argv`` started as ``cmd &`` in a script starts it: SIGINT ignored, inherited by exec."""
  return ['sh', '-c', 'trap "" INT; exec "$@"', 'sh', *argv]


@pytest.mark.parametrize('before,status', [('ignored', -signal.SIGINT),
                                           ('returning', 128 + signal.SIGINT)])
def test_a_signal_inherited_as_ignored_stops_once_and_never_goes_on(before, status):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  result = subprocess.run(_with_sigint_ignored([sys.executable, '-c', _IGNORED_SIGINT, before]),
                          env=env, capture_output=True, text=True, timeout=120)
  assert result.stdout == 'caught\n', result.stdout + result.stderr[-2000:]
  assert result.returncode == status and 'Traceback' not in result.stderr


_INTERRUPTED_TRAINING = r'''
import os, signal, sys
from configs import cnn
from bcjax import parallel, train
config = cnn.get_config('tiny')
config.num_epochs = 3
if sys.argv[2]:
  config.data.source, config.data.path = 'packed', sys.argv[2]
make_runner = parallel.make_runner
def interrupting_runner(*args, **kwargs):
  runner = make_runner(*args, **kwargs)
  step, calls = runner.train_step, [0]
  def train_step(*a):
    out = step(*a)
    calls[0] += 1
    if calls[0] == 7:  # Mid-epoch 2.
      os.kill(os.getpid(), signal.SIGINT)
    return out
  runner.train_step = train_step
  return runner
parallel.make_runner = interrupting_runner
train.train_and_evaluate(config, sys.argv[1])
print('went on', flush=True)
'''


@pytest.mark.slow
@pytest.mark.parametrize('source', ['synthetic', 'packed'])
def test_sigint_inherited_as_ignored_saves_once_and_ends_the_training(source, tmp_path):
  from bcjax.data import packed, synthetic
  path = ''
  if source == 'packed':
    path = str(tmp_path / 'cells.npz')
    packed.write_arrays(path, {s: synthetic.make_split(seed=1, split=s, num=n, image_size=32)
                               for s, n in (('train', 40), ('validation', 8), ('test', 8))},
                        synthetic.CLASS_NAMES, provenance={})
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS='cpu')
  workdir = tmp_path / 'run'
  result = subprocess.run(
      _with_sigint_ignored([sys.executable, '-c', _INTERRUPTED_TRAINING, str(workdir), path]),
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == -signal.SIGINT, result.stdout[-2000:] + result.stderr[-3000:]
  assert result.stdout.count('rerun the same command to resume') == 1, result.stdout[-3000:]
  assert 'went on' not in result.stdout and 'Traceback' not in result.stderr
  assert sorted(os.listdir(workdir / 'checkpoints' / 'latest')) == ['5', '7']  # Saved once.


# -- Disk full -----------------------------------------------------------------


def test_disk_full_at_the_first_save_is_one_line_naming_the_complete_best(tmp_path, monkeypatch):
  """As orbax fails on a full disk: each worker thread logs its traceback, then it raises."""
  import logging
  import threading
  import orbax.checkpoint as ocp
  from absl import logging as absl_logging
  real_save = ocp.CheckpointManager.save
  full = ('RESOURCE_EXHAUSTED: Error writing "opt_state.1.0.mu.conv1.kernel/0.0.0.0" in OCDBT '
          'database: Failed to write 201624 bytes to file 16: No space left on device '
          "[os_error_code='28']")

  def save(self, step, *args, **kwargs):
    if str(self.directory).endswith('latest'):
      def worker():
        try:
          raise ValueError(full)
        except ValueError as e:
          absl_logging.exception('[process=0][thread=np_type_handler][operation_id=2] '
                                 '_SignalingThread.run() raised an exception: %s', e)
      thread = threading.Thread(target=worker)
      thread.start()
      thread.join()
      raise ValueError(full)
    return real_save(self, step, *args, **kwargs)

  class Records(logging.Handler):
    def __init__(self):
      super().__init__()
      self.messages = []

    def emit(self, record):
      self.messages.append(record.getMessage())

  records = Records()
  logging.getLogger('absl').addHandler(records)
  monkeypatch.setattr(ocp.CheckpointManager, 'save', save)
  workdir = str(tmp_path / 'run')
  try:
    with pytest.raises(UserError) as e:
      train.train_and_evaluate(_config(), workdir)
  finally:
    logging.getLogger('absl').removeHandler(records)
  message = str(e.value)
  assert 'cannot save checkpoint latest/5' in message and '(no space left on device)' in message
  assert f'last good checkpoint: {workdir}/checkpoints/best/5;' in message
  assert not [m for m in records.messages if '_SignalingThread' in m]
  monkeypatch.undo()
  state, _ = checkpointing.Checkpoints(workdir, read_only=True).read_raw('best', 5)
  assert state['params']


def _disk_full_on_fsync(monkeypatch):
  def fsync(fd):
    raise OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(files.os, 'fsync', fsync)


def test_disk_full_writing_predictions_or_an_eval_report_is_one_line(trained, tmp_path,
                                                                     monkeypatch):
  from bcjax import evaluate
  out = tmp_path / 'p.csv'
  out.write_text('the previous predictions\n')
  image = _cell(tmp_path / 'cell.png')
  _disk_full_on_fsync(monkeypatch)
  with pytest.raises(files.WriteError) as e:
    predict.predict_files(_config(), trained[0], [image], out_csv=str(out))
  assert str(e.value).startswith(f'cannot write {out} (no space left on device); nothing was '
                                 'written there')
  assert out.read_text() == 'the previous predictions\n'
  report = tmp_path / 'eval'
  with pytest.raises(files.WriteError, match=f'cannot write {report}/.* \\(no space left'):
    evaluate.evaluate_workdir(_config(), trained[0], out_dir=str(report))
  assert not [n for n in os.listdir(tmp_path) + os.listdir(report) if n.endswith('.tmp')
              or '.tmp.' in n]


def test_disk_full_writing_history_during_training_names_the_last_checkpoint(tmp_path,
                                                                              monkeypatch):
  real = files.write_json

  def write_json(path, value):
    if path.endswith('history.json') and len(value) == 2:
      raise files.WriteError(f'cannot write {path} (no space left on device)')
    return real(path, value)

  monkeypatch.setattr(files, 'write_json', write_json)
  workdir = str(tmp_path / 'run')
  with pytest.raises(files.WriteError) as e:
    train.train_and_evaluate(_config(), workdir)
  assert str(e.value).endswith(f'; last good checkpoint: {workdir}/checkpoints/latest/5')


def test_a_batch_beyond_memory_from_launch_is_one_line_and_leaves_no_workdir(tmp_path):
  result = _launch('--config', 'configs/cnn.py:tiny', '--workdir', str(tmp_path / 'run'),
                   '--config.batch_size=100000000')
  _one_error_line(result, "model 'cnn' at config.image_size=32 and config.batch_size=100000000",
                  'lower config.batch_size')
  assert not os.path.exists(tmp_path / 'run')


def test_eval_with_model_fields_other_than_the_runs_is_one_line(run_copy, tmp_path):
  """A field that changes the function but no parameter's shape (input_norm, say) would
  load and answer wrongly: refused, naming the field and the flag that fixes it."""
  from bcjax import evaluate
  path = os.path.join(run_copy, 'config.json')
  with open(path) as f:
    recorded = json.load(f)
  recorded['model']['dense_features'] = 32  # As if trained with another value.
  recorded['model']['initializers'] = 'torch'  # Training only: never compared.
  with open(path, 'w') as f:
    json.dump(recorded, f)
  out = tmp_path / 'eval'
  with pytest.raises(UserError, match=r"dense_features 32 \(config: 64\).*"
                                      r"--config.model.dense_features=32"):
    evaluate.evaluate_workdir(_config(), run_copy, out_dir=str(out))
  with pytest.raises(UserError, match='dense_features'):
    predict.predict_files(_config(), run_copy, [_cell(tmp_path / 'c.png')],
                          out_csv=str(tmp_path / 'p.csv'))
