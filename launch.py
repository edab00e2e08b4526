"""bcjax command line: one flag parser, one library call per mode.

    python launch.py --config configs/cnn_lstm.py --workdir runs/cnn_lstm
    python launch.py --config configs/cnn.py --mode=summary
    python launch.py --config configs/cnn.py --mode=prepare --config.data.path=PATH
    python launch.py --config configs/cnn.py --workdir runs/cnn --mode=eval --out DIR
    python launch.py --config configs/cnn.py --workdir runs/cnn --mode=predict --images a.jpg dir/
    python launch.py --config configs/cnn.py --workdir runs/cnn --mode=export --out export/cnn
    python launch.py --config configs/cnn.py --workdir runs/cnn --mode=explain --out DIR a.jpg
    python launch.py --config configs/cnn.py --workdir runs/cnn --mode=adapt --out runs/cnn_lab \
        --config.adapt.images=LAB_FOLDER

Everything the modes do lives in importable modules (bcjax.train, bcjax.evaluate,
bcjax.predict, bcjax.data, bcjax.summary); tests call those directly. A user
mistake (bcjax.errors.UserError) prints one ``error:`` line and exits 2.
"""

import difflib
import importlib.util
import logging
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # tf.data only; no TensorFlow chatter.

from bcjax import process_setup

process_setup.configure()  # Before JAX runs anything: see bcjax/process_setup.py ($BCJAX_MALLOC).

from absl import app, flags
from absl import logging as absl_logging
import ml_collections
from ml_collections import config_flags

from bcjax import distributed
from bcjax.errors import UserError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/cnn.py or configs/cnn.py:tiny.',
    lock_config=True)
flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'predict', 'prepare', 'pack', 'summary',
                                    'export', 'explain', 'adapt'],
                  'What to do.')
flags.DEFINE_string('workdir', None, 'Run directory: checkpoints, logs, reports.')
flags.DEFINE_multi_string('images', [], 'predict, explain: an image file or folder; repeat '
                          'the flag for more (or give them as trailing arguments). Commas are part '
                          'of a path.')
flags.DEFINE_string('out', None, 'eval: report directory; predict: CSV path; pack: .npz path; '
                    'export, explain: directory; adapt: the new workdir.')
flags.DEFINE_list('explain_methods', [], 'explain: gradcam, integrated_gradients, smoothgrad, '
                  'rollout (default: all that apply to the model).')
flags.DEFINE_integer('max_images', 0, 'explain: at most this many images (0: all).')
flags.DEFINE_list('pack_splits', ['train', 'validation', 'test'], 'pack: splits to pack.')
flags.DEFINE_integer('pack_quality', 80, 'pack: WebP quality, 0 = lossless (bcjax/data/packed.py).')
flags.DEFINE_string('checkpoint', 'best',
                    "eval/predict/export/explain/adapt: 'best', 'latest' or a step number.")
flags.DEFINE_bool('allow_changed_config', False, 'train: resume a workdir even though the '
                  'config changes fields that change the run (recorded in config.json).')
flags.DEFINE_multi_string('ensemble', [], 'eval/predict: more workdirs whose class '
                          'probabilities are averaged with --workdir\'s (an ensemble).')
distributed.define_flags()
flags.mark_flags_as_required(['config'])



def _need_workdir() -> str:
  if not FLAGS.workdir:
    raise UserError(f'--mode={FLAGS.mode} needs --workdir')
  return FLAGS.workdir


def _check_outputs() -> None:
  """Where the mode will write must be writable: checked before the long work.

  (--mode=eval checks its --out in bcjax.evaluate, once it knows the workdir
  exists; training its --workdir in bcjax.train, which removes a workdir it
  created for a run refused before anything was written.)
  """
  from bcjax import files
  if FLAGS.mode in ('predict', 'pack') and FLAGS.out:
    files.check_writable(os.path.dirname(os.path.abspath(FLAGS.out)), '--out')
  elif FLAGS.mode == 'predict':
    files.check_writable(os.getcwd(), 'the current folder (for predictions.csv; or pass --out)')


def run(argv: list[str]) -> None:
  config = FLAGS.config
  extra = argv[1:]
  if extra and FLAGS.mode not in ('predict', 'explain'):
    raise UserError(f'unexpected arguments: {" ".join(extra)}')
  if FLAGS.mode != 'summary':  # Bad values: one line now, not a crash an epoch in.
    from bcjax import config_checks
    config_checks.check(config)
  if FLAGS.mode in ('eval', 'predict', 'explain', 'export'):  # (train checks in bcjax.train)
    from bcjax import model_size
    model_size.check(config, training=False)
  _check_outputs()
  distributed.initialize_from_flags(FLAGS)

  if FLAGS.mode == 'summary':
    from bcjax import summary
    print(summary.format_summary(config))
  elif FLAGS.mode == 'prepare':
    from bcjax import data
    data.prepare(config, print_summary=True)
  elif FLAGS.mode == 'pack':
    from bcjax.data import packed
    if not FLAGS.out:
      raise UserError('--mode=pack needs --out FILE.npz')
    sizes, error = packed.pack(config, FLAGS.out, splits=FLAGS.pack_splits,
                                 quality=FLAGS.pack_quality)
    print(f'packed {sizes} at {config.image_size} px into {FLAGS.out} '
          f'({os.path.getsize(FLAGS.out) / 2**20:.1f} MiB; mean absolute pixel error '
          f'{error:.2f} / 255)')
  elif FLAGS.mode == 'train':
    workdir = _need_workdir()
    from bcjax import train
    train.train_and_evaluate(config, workdir, allow_changed_config=FLAGS.allow_changed_config)
  elif FLAGS.mode == 'eval':
    from bcjax import evaluate
    evaluate.evaluate_workdir(config, _need_workdir(), checkpoint=FLAGS.checkpoint,
                              out_dir=FLAGS.out, ensemble=FLAGS.ensemble)
  elif FLAGS.mode == 'predict':
    from bcjax import predict
    paths = list(FLAGS.images) + extra
    if not paths:
      raise UserError('--mode=predict needs --images PATH [PATH ...]')
    out = predict.predict_files(config, _need_workdir(), paths, checkpoint=FLAGS.checkpoint,
                                out_csv=FLAGS.out or 'predictions.csv', ensemble=FLAGS.ensemble)
    print(f'wrote {out}')
  elif FLAGS.mode == 'explain':
    from bcjax import explain
    explain.explain_workdir(config, _need_workdir(), list(FLAGS.images) + extra, FLAGS.out,
                            checkpoint=FLAGS.checkpoint, methods=FLAGS.explain_methods,
                            max_images=FLAGS.max_images)
  elif FLAGS.mode == 'adapt':
    from bcjax import adapt
    adapt.adapt_workdir(config, _need_workdir(), FLAGS.out, checkpoint=FLAGS.checkpoint)
  elif FLAGS.mode == 'export':
    from bcjax import export
    export.export_workdir(config, _need_workdir(), FLAGS.out, checkpoint=FLAGS.checkpoint)


def _config_file(argv: list[str]) -> str | None:
  """The ``--config`` argument (``path[:variant]``) as given, or None."""
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      return arg[len('--config='):]
    if arg == '--config' and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config(spec: str):
  """What ``get_config`` of ``path[:variant]`` returns, loaded the way ml_collections does."""
  path, _, variant = spec.partition(':')
  if not os.path.isfile(path):
    raise UserError(f'config file not found: {path}')
  module_spec = importlib.util.spec_from_file_location('launch_config', path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if ':' in spec else module.get_config()
  except (TypeError, ValueError) as e:  # A config file's own check (an unknown variant).
    raise UserError(str(e)) from None


def check_overrides(config, argv: list[str]) -> None:
  """A UserError for the first ``--config.<field>`` that ``config`` lacks, with a guess.

  The config is locked, so an unknown field could only fail; checked here
  against the config itself rather than read back from the flags library's
  wording.
  """
  for arg in argv:
    for prefix in ('--config.', '--noconfig.'):
      if not arg.startswith(prefix):
        continue
      field = arg[len(prefix):].split('=', 1)[0].split('[', 1)[0]
      node, path = config, []
      for part in field.split('.'):
        keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        if part not in keys:
          near = difflib.get_close_matches(part, keys, n=1)
          where = '.'.join(path + [part])
          raise UserError(f'unknown config field {where!r}' + (
              f" (did you mean {'.'.join(path + near)!r}?)" if near else ''))
        node, path = node[part], path + [part]


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a one-line error for a bad flag, config file or field."""
  try:
    spec = _config_file(argv)
    if spec is not None:
      check_overrides(_load_config(spec), argv)
    return FLAGS(argv)
  except (UserError, flags.Error) as e:
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    print(f'error: {lines[0] if lines else type(e).__name__}', file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> None:
  if not FLAGS['verbosity'].present:
    # Library INFO logs (orbax, TFDS, the TPU probe) drown the progress bar;
    # --verbosity=0 brings them back.
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)
  try:
    run(argv)
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print('interrupted', file=sys.stderr)
    sys.exit(130)


if __name__ == '__main__':
  app.run(main, flags_parser=parse_flags)
