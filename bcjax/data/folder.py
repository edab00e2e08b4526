"""The split 'all': every image of a labelled PBC-layout folder, read directly.

A model trained on PBC is tested on another lab's images by pointing
``config.data.path`` at their folder (or zip) in PBC's layout and evaluating
``--config.data.split=all``. Nothing is prepared or written: the folder is
read, checked (undecodable files are skipped with a warning) and fed to the
same pipeline as a prepared split. Class folders may be missing here, since
another lab may not have every cell type, but at least one must be present.
"""

from bcjax import errors
from bcjax.data import layout
from bcjax.data import spec
from bcjax.data.tf_cpu import tf


def raw_all(config) -> spec.RawSplit:
  if not config.data.path:
    raise errors.UserError(
        "split 'all' reads the labelled folder at config.data.path; set "
        '--config.data.path=<folder or zip in PBC layout>')
  location = layout.locate(config.data.path)
  listing = layout.list_files(location, require_all_classes=False)
  scan = layout.read(listing, require_all_classes=False)
  if not scan.records:
    raise errors.UserError(f'{location.describe()} holds no readable image')
  dataset = tf.data.Dataset.from_tensor_slices({
      'image': [r.data for r in scan.records],
      'label': [r.label for r in scan.records],
      'file_name': [r.file_name for r in scan.records],
  })
  return spec.RawSplit(dataset, len(scan.records), encoded=True)
