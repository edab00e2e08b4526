"""A trained model as one file that runs with JAX alone: ``launch.py --mode=export``.

    python launch.py --config configs/cnn_attention.py --workdir runs/x --mode=export \
        --out export/cnn_attention

writes ``export/cnn_attention/model.jax`` (a serialized :mod:`jax.export`
artifact) and ``model.json`` beside it (class names, image size, how to scale
the input, what the output is, the config name and the checkpoint step).
``bcjax/export_loader_example.py`` runs it in a few lines with neither flax
nor bcjax installed, e.g. in a lab pipeline that never sees the training code.

Why it is built this way:

* **The best checkpoint, eval mode, float32**: what ``--mode=eval`` tests;
  BatchNorm uses its running statistics and dropout is off, so the function
  is deterministic and needs no keys. The weights are constants of the module,
  so the artifact is the whole model.
* **XLA's own convolutions** (``conv_impl='native'``): the CPU training path
  calls oneDNN kernels through XLA FFI custom calls (bcjax/onednn), which
  exist only in a process that built and registered them and would make the
  artifact unloadable elsewhere (and ``jax.export`` refuses custom calls
  without a stability guarantee). The lowerings compute the same function,
  so the checkpoint's parameters are used unchanged.
* **A symbolic batch dimension** (``b``): one artifact serves any batch size.
  Its only custom call is jax.export's own ``shape_assertion`` (``b >= 1``),
  which JAX resolves when it loads the module.
* **Lowered for CPU and CUDA** (:data:`PLATFORMS`): the same file runs on a
  laptop and on a GPU server; JAX picks the lowering of the device it runs on.
"""

import json
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import export as jax_export

from bcjax import files, models
from bcjax.errors import UserError

PLATFORMS = ('cpu', 'cuda')
ARTIFACT = 'model.jax'
METADATA = 'model.json'
# jax.export's own check of the symbolic dimensions, resolved when the module
# is loaded; every other custom call would tie the artifact to one process.
ALLOWED_CUSTOM_CALLS = frozenset({'shape_assertion'})


def export_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config`` with XLA's own convolutions and float32 compute."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.conv_impl = 'native'
  config.dtype = 'float32'
  return config


def export_forward(config: ml_collections.ConfigDict, variables: dict[str, Any], *,
                   platforms: Sequence[str] = PLATFORMS) -> jax_export.Exported:
  """Exports ``images [b, S, S, 3] float32 in [0, 1] -> logits [b, classes] float32``."""
  config = export_config(config)
  model = models.build_model(config)
  variables = jax.tree.map(lambda a: np.asarray(a, np.float32), variables)

  def logits(images):
    return model.apply(variables, images, train=False)

  batch, = jax_export.symbolic_shape('b')
  s = config.image_size
  spec = jax.ShapeDtypeStruct((batch, s, s, 3), jnp.float32)
  return jax_export.export(jax.jit(logits), platforms=tuple(platforms))(spec)


def custom_call_targets(exported: jax_export.Exported) -> set[str]:
  """The targets of every ``stablehlo.custom_call`` in the exported module."""
  text = exported.mlir_module()
  return set(re.findall(r'stablehlo\.custom_call @([\w.$-]+)', text)) | set(
      re.findall(r'call_target_name = "([^"]+)"', text))


def metadata(config: ml_collections.ConfigDict, class_names: Sequence[str], *,
             checkpoint: str, step: int, exported: jax_export.Exported) -> dict[str, Any]:
  """What a user of the artifact needs besides the artifact: the JSON beside it."""
  s = config.image_size
  return {
      'format': 'jax.export',
      'artifact': ARTIFACT,
      'jax_version': jax.__version__,
      'calling_convention_version': exported.calling_convention_version,
      'platforms': list(exported.platforms),
      'config_name': config.name,
      'model': config.model.name,
      'checkpoint': checkpoint,
      'checkpoint_step': int(step),
      'class_names': list(class_names),
      'image_size': s,
      'input': {
          'shape': ['batch', s, s, 3], 'dtype': 'float32', 'layout': 'NHWC, RGB',
          'scaling': 'pixel / 255 (range [0, 1])',
          'resize': f'antialiased bilinear to {s}x{s}, rounded to uint8 before scaling',
      },
      'output': {'shape': ['batch', len(class_names)], 'dtype': 'float32',
                 'what': 'logits: softmax gives the class probabilities'},
  }


def write(out_dir: str, exported: jax_export.Exported, meta: dict[str, Any]) -> str:
  """Writes the artifact and its JSON into ``out_dir``; returns the artifact's path."""
  bad = custom_call_targets(exported) - ALLOWED_CUSTOM_CALLS
  if bad:  # Only a bug (a lowering that is not XLA's own) gets here.
    raise RuntimeError(f'the exported module calls {", ".join(sorted(bad))}: it would '
                       'not load outside this process')
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, ARTIFACT)
  with files.atomic_write(path, 'wb') as f:
    f.write(exported.serialize())
  files.write_text(os.path.join(out_dir, METADATA), json.dumps(meta, indent=2) + '\n')
  return path


def export_workdir(config: ml_collections.ConfigDict, workdir: str, out_dir: str, *,
                   checkpoint: str = 'best',
                   platforms: Sequence[str] = PLATFORMS) -> dict[str, Any]:
  """Exports ``workdir``'s checkpoint into ``out_dir``; returns the JSON written."""
  from bcjax import train_state  # pylint: disable=g-import-not-at-top  (orbax: only here)
  if not out_dir:
    raise UserError('--mode=export needs --out DIR')
  files.check_output_dir(out_dir, '--out', protected=files.run_inputs([workdir])[1])
  state, meta, kind, step = train_state.load_for_inference(config, workdir, checkpoint)
  class_names = train_state.trained_class_names(meta)
  variables = state.variables()
  exported = export_forward(config, variables, platforms=platforms)
  info = metadata(config, class_names, checkpoint=kind, step=step, exported=exported)
  if jax.process_index() == 0:  # Several processes (--distributed) export alike; one writes.
    path = write(out_dir, exported, info)
    print(f'exported the {kind} checkpoint (step {step}) of {config.name} for '
          f'{", ".join(exported.platforms)} to {path} '
          f'({os.path.getsize(path) / 2**20:.1f} MiB) and {METADATA}')
  return info
