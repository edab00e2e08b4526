"""Class predictions for image files: ``launch.py --mode=predict --images PATH...``.

    predict.predict_files(config, 'runs/cnn', ['cells/', 'one.jpg'], out_csv='pred.csv')

Folders are walked recursively for image files (by extension, or by header
for a file without one; macOS ``._*`` metadata files are skipped). Each image is read and resized exactly as the
training pipeline does (``bcjax.data.read_image`` + ``preprocess``). The CSV
has ``path``, ``predicted_class``, one ``p_<class>`` column per class and
``error``: a file that cannot be read gets a row saying why, and the run goes
on. Runs on one device: prediction of a folder is small next to training.

When every image sits in a folder named for a class (another lab's labelled
folder: any letter case, plural or a common other name, as
``bcjax.data.layout.class_of_folder`` reads it), one line names the classes
present and absent and the eval command that scores them.
"""

import functools
import os
from typing import Iterator, Sequence

import jax
import ml_collections
import numpy as np

from bcjax import ensemble_members, files, models, predictions_csv, steps, train_state
from bcjax.errors import UserError

IMAGE_EXTENSIONS = files.IMAGE_EXTENSIONS


def _is_image_name(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith('._')


def _is_image_file(folder: str, name: str) -> bool:
  """An image by its name, or a file without an extension whose header is an image's.

  A file named on the command line is predicted whatever its name, so one
  without an extension found in a folder is not left out either; files with
  another extension (notes.txt, a CSV) are.
  """
  if name.startswith('._') or name == '.DS_Store':
    return False
  if _is_image_name(name):
    return True
  path = os.path.join(folder, name)
  if os.path.splitext(name)[1] or not os.path.isfile(path):
    return False
  from bcjax.data import images  # pylint: disable=g-import-not-at-top  (TensorFlow: import late)
  if images.too_large(os.path.getsize(path)):
    return True  # Listed, so its row says why it is not read.
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path):  # The header only.
      return True
  except Exception:  # pylint: disable=broad-except  (not an image Pillow knows)
    return False


def _split_old_list(paths: Sequence[str]) -> list[str]:
  """Paths as given; 'a.jpg,b.jpg' (the old comma-list flag) only when no such file exists.

  A comma is a valid file-name character, so a path that exists is never
  split; a missing one is split only when every piece exists.
  """
  out = []
  for p in paths:
    pieces = p.split(',')
    if (len(pieces) > 1 and not os.path.exists(p)
        and all(x and os.path.exists(x) for x in pieces)):
      out += pieces
    else:
      out.append(p)
  return out


def expand_paths(paths: Sequence[str]) -> list[str]:
  """Files as given (any extension), and image files found under folders, sorted."""
  out = []
  for p in _split_old_list(paths):
    if os.path.isdir(p):
      found = []
      for root, dirs, names in os.walk(p):
        dirs[:] = sorted(d for d in dirs if d != '__MACOSX')
        found += [os.path.join(root, f) for f in names if _is_image_file(root, f)]
      if not found:
        raise UserError(f'no image files ({", ".join(IMAGE_EXTENSIONS)}, or images without '
                        f'an extension) under {p}')
      out += sorted(found)
    else:
      out.append(p)  # Missing or unreadable: reported in its row.
  return out


def _read_all(paths: list[str], image_size: int) -> Iterator[tuple[str, np.ndarray | None, str]]:
  from bcjax import data  # pylint: disable=g-import-not-at-top  (TensorFlow: import late)
  for p in paths:
    try:
      yield p, data.preprocess(data.read_image(p), image_size), ''
    except UserError as e:
      yield p, None, str(e).replace(f'cannot read image {p}: ', '') or 'unreadable'


def folder_classes(files: Sequence[str], class_names: Sequence[str]) -> str:
  """The line on the classes the files' folders name, or '' unless every folder names one."""
  from bcjax.data import layout  # pylint: disable=g-import-not-at-top
  named = {layout.class_of_folder(os.path.basename(os.path.dirname(os.path.abspath(f))))
           for f in files}
  if not files or None in named:
    return ''
  present = [c for c in class_names if c in named]
  absent = [c for c in class_names if c not in named]
  return (f"the images' folders name {len(present)} of {len(class_names)} classes "
          f"({', '.join(present)}); absent: {', '.join(absent) or 'none'}. The accuracy over "
          'them: --mode=eval --config.data.split=all --config.data.path=FOLDER')


def predict_probs(config: ml_collections.ConfigDict, workdir: str, files: list[str], *,
                  checkpoint: str = 'best'):
  """Class probabilities of ``files`` (in order) from ``workdir``'s checkpoint.

  Returns ``(probs [N, classes], errors [N], class names, kind, step)``; a
  file that cannot be read has an error message and a zero row.
  """
  state, meta, kind, step = train_state.load_for_inference(config, workdir, checkpoint)
  class_names = train_state.trained_class_names(meta)
  model = models.build_model(config)
  variables = state.variables()
  forward = jax.jit(functools.partial(steps.predict_log_probs, model, tta=bool(config.tta)))
  batch_size = config.eval_batch_size
  s = config.image_size
  probs = np.zeros((len(files), len(class_names)), np.float32)
  errors = [''] * len(files)
  pending: list[tuple[int, np.ndarray]] = []  # (row, image), rows keep the input order.

  def flush():
    # Pad to a fixed batch so every call reuses one compiled program.
    x = np.zeros((batch_size, s, s, 3), np.float32)
    for i, (_, img) in enumerate(pending):
      x[i] = img
    p = np.exp(np.asarray(forward(variables, x)))
    for i, (row, _) in enumerate(pending):
      probs[row] = p[i]
    pending.clear()

  for row, (_, image, error) in enumerate(_read_all(files, s)):
    if error:
      errors[row] = error
      continue
    pending.append((row, image))
    if len(pending) == batch_size:
      flush()
  if pending:
    flush()
  return probs, errors, class_names, kind, step


def predict_files(config: ml_collections.ConfigDict, workdir: str, paths: list[str], *,
                  out_csv: str, checkpoint: str = 'best', ensemble: Sequence[str] = ()) -> str:
  """Writes the predictions CSV for ``paths`` (files or folders); returns its path.

  With ``ensemble`` (more workdirs), the members' probabilities are averaged
  (bcjax/ensemble_members.py).
  """
  if not paths:
    raise UserError('no images given')
  paths = _split_old_list(paths)
  # Before any work: the CSV must not replace an image, an input, a run's files or a folder.
  run_files, checkpoints = files.run_inputs([workdir, *ensemble])
  files.check_output_file(out_csv, '--out', inputs=paths + run_files, kind='CSV file',
                          protected=checkpoints)
  image_files = expand_paths(paths)
  files.check_output_file(out_csv, '--out', inputs=image_files, kind='CSV file')
  outputs = ensemble_members.for_members(
      config, workdir, ensemble,
      lambda member_config, member: predict_probs(member_config, member, image_files,
                                                  checkpoint=checkpoint))
  probs, errors, class_names, kind, step = outputs[0]
  if ensemble:
    probs = ensemble_members.average([o[0] for o in outputs], [None] * len(outputs))
  if jax.process_index() == 0:  # Several processes (--distributed) predict alike; one writes.
    out_dir = os.path.dirname(os.path.abspath(out_csv))
    os.makedirs(out_dir, exist_ok=True)
    predictions_csv.write(out_csv, image_files, probs, class_names, errors=errors)
    bad = sum(1 for e in errors if e)
    what = (f'an ensemble of {len(outputs)}' if ensemble
            else f'the {kind} checkpoint (step {step})')
    print(f'{len(image_files) - bad} images predicted with {what}'
          + (f'; {bad} unreadable (see the error column)' if bad else ''))
    labelled = folder_classes(image_files, class_names)
    if labelled:
      print(labelled)
  if all(errors):
    raise UserError(f'no image could be predicted: all {len(image_files)} unreadable (first: '
                    f'{image_files[0]}: {errors[0]}); their reasons are in {out_csv}')
  return out_csv
