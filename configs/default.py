"""Shared defaults for every bcjax experiment.

Every experiment choice lives here or in a config derived from it; code reads
config fields and never hard-codes them. Model configs (``configs/cnn.py``,
``configs/cnn_lstm.py``) import :func:`get_config` and change a few fields.

Override any field from the command line::

    python launch.py --config configs/cnn.py --config.batch_size=256 \
        --config.optimizer.learning_rate=3e-4

An unknown key (``--config.batch_sise=1``) is a one-line error.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'default'
  c.seed = 0  # Parameter init, dropout and every other training key.

  # -- Model: chosen by name from bcjax.models.MODELS; the remaining fields
  # of `model` are that model's constructor arguments (conv_impl only for
  # models that declare it, bcjax/models/__init__.py).
  c.model = ml_collections.ConfigDict()
  c.model.name = 'cnn'
  c.num_classes = 8
  c.image_size = 64  # Square side in pixels fed to the model.
  # Convolution / pooling lowering: 'auto' picks 'onednn' on CPU (oneDNN's
  # kernels through the XLA FFI, bcjax/onednn; 'matmul' where they cannot be
  # built: XLA:CPU's native conv gradient is slow, see docs/benchmarks.md)
  # and 'native' on GPU/TPU. Numerically the same function either way.
  c.model.conv_impl = 'auto'
  # Initialisers of every layer: 'keras' (Glorot-uniform kernels, zero biases;
  # LSTM orthogonal recurrent kernels, forget-gate bias 1), 'torch' (PyTorch's
  # defaults) or 'flax' (Flax's). The paper's framework is Keras, so its configs
  # use 'keras'. A framework default is an experiment choice: the Table 1 CNN's
  # accuracy depends on it (docs/initializers.md). bcjax/models/initializers.py.
  c.model.initializers = 'keras'
  c.dtype = 'float32'  # Compute dtype: 'float32' or 'bfloat16' (params stay f32).

  # -- Initialisation from a trained run, for any model: the parameters under
  # `init.subtree` ('' = all of them; e.g. 'extractor'; '/' separates levels)
  # are loaded from `init.checkpoint` (a workdir or a checkpoint folder) into
  # the fresh state before training. '' = none.
  c.init = ml_collections.ConfigDict()
  c.init.checkpoint = ''
  c.init.subtree = ''

  # -- Data.
  c.data = ml_collections.ConfigDict()
  c.data.source = 'synthetic'  # 'pbc' | 'bloodmnist' | 'synthetic' | 'packed' (bcjax/data/spec.py)
  # PBC folder or zip, folder holding bloodmnist*.npz, or a --mode=pack .npz
  # ('packed': no TensorFlow needed, bcjax/data/packed.py).
  c.data.path = ''
  c.data.tfds_dir = '~/tensorflow_datasets'  # Where prepared datasets live.
  c.data.seed = 42  # Split seed: the same split on every machine and run.
  c.data.train_fraction = 0.70
  c.data.val_fraction = 0.15  # The test split gets the rest (0.15).
  c.data.split = 'test'  # Split that --mode=eval evaluates ('all' for a folder).
  c.data.synthetic_examples = 1024  # Total examples of the synthetic source.
  c.data.shuffle_buffer = 16_384
  c.data.cache = True  # Cache decoded, resized images after the first epoch.
  c.data.prefetch = 2  # Batches prefetched to device.
  # Where training batches come from (bcjax/data/resident.py): 'device' keeps
  # the decoded train split on every local device as uint8 (each process its
  # own shard) and gathers, augments and scales each batch inside the step;
  # 'stream' makes batches on the host (tf.data, or NumPy for packed files);
  # 'auto' picks 'device' when the split fits device_memory_mb per device.
  # Evaluation always streams. 'stream' serves every source and split size;
  # the device path draws the epoch order as the packed backend does, not as
  # tf.data does, so on a tf.data source the same seed trains on other
  # batches (a run's config.json records which path it took). Both paths
  # deliver uint8 pixels; the step augments them alike. Opt in with
  # --config.data.placement=auto (benchmarks/gpu_check.py uses 'device').
  c.data.placement = 'stream'
  # The memory budget of 'auto', in MiB per device: PBC's train split is about
  # 85 MiB at 64 px and 1,030 MiB at 224 px (on CPU it is host memory).
  c.data.device_memory_mb = 4096
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.flips = False  # Random horizontal / vertical flips.
  c.data.augment.rot90 = False  # Random multiples of 90 degrees.
  # The next two run inside the train step on every input path (bcjax/augment.py).
  # Stain jitter's sigma: each image's stain concentrations (colour
  # deconvolution, natural-log optical density) scaled by U(1-s, 1+s) and
  # shifted by U(-s, s) (bcjax/augment.py says what the units mean). 0: off.
  c.data.augment.stain = 0.0
  # Mixup's Beta(alpha, alpha): images and targets blended with a partner from
  # the same device's shard (e.g. 0.2). 0: off.
  c.data.augment.mixup_alpha = 0.0
  # Another lab's microscope, camera and stain, simulated in the train step on
  # every input path (bcjax/augment.py, apply_domain); each 0 / off by default.
  # Zoom range (log-uniform; (0.5, 2.0) lets a cell span half to twice its
  # size), any rotation angle, translation (fraction of the side), Gaussian
  # blur up to `blur` times the side (sigma), brightness shift, contrast and
  # saturation factors 1 +- value, hue turn +- value (fraction of a circle),
  # gamma exp(+- value), the probability of grayscale, and sensor noise up to
  # that standard deviation.
  c.data.augment.zoom = (1.0, 1.0)
  c.data.augment.rotate = False
  c.data.augment.translate = 0.0
  c.data.augment.blur = 0.0
  c.data.augment.brightness = 0.0
  c.data.augment.contrast = 0.0
  c.data.augment.saturation = 0.0
  c.data.augment.hue = 0.0
  c.data.augment.gamma = 0.0
  c.data.augment.grayscale = 0.0
  c.data.augment.noise = 0.0
  # The share of training images the ops above change (the others stay as
  # they are): 1 = every image.
  c.data.augment.domain_prob = 1.0

  # -- Optimisation.
  c.batch_size = 64  # Global batch over all devices and processes.
  c.eval_batch_size = 256
  c.num_epochs = 30
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adam'  # 'adam' | 'adamw' | 'sgd'
  c.optimizer.learning_rate = 1e-3  # Peak learning rate.
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.momentum = 0.9  # sgd only.
  c.optimizer.nesterov = True  # sgd only.
  c.optimizer.weight_decay = 0.0  # Decoupled for adamw, L2 otherwise.
  c.optimizer.grad_clip_norm = 0.0  # 0 disables clipping.
  # A parameter subtree the optimiser leaves as it is, e.g. 'extractor' (the
  # hybrids' feature extractor, loaded by `init`); '/' separates levels. '' = none.
  c.optimizer.frozen = ''
  c.schedule = ml_collections.ConfigDict()
  c.schedule.name = 'constant'  # 'constant' | 'warmup_cosine'
  c.schedule.warmup_epochs = 0.0
  c.label_smoothing = 0.0
  # >0: each device runs its batch as microbatches of this size, one after
  # another, and averages their gradients: the same update for models without
  # BatchNorm (per-microbatch statistics with it), in less memory. 0: one pass.
  c.microbatch_size = 0
  # >0 (e.g. 0.999): also keep an exponential moving average of the weights,
  # validated beside them every epoch; the better of the two on validation is
  # what the best checkpoint is tested and used with. 0: off.
  c.ema_decay = 0.0

  # -- Distillation (bcjax/distill.py): trained workdirs, comma-separated, whose
  # mean probabilities for each training image (over the 8 flips/rotations
  # with `tta`) pull every target row toward them by `weight`. Needs the device
  # path (data.placement 'device', or 'auto' where the split fits). '' = off.
  c.distill = ml_collections.ConfigDict()
  c.distill.teachers = ''
  c.distill.weight = 0.5
  c.distill.tta = True

  # -- Adapting a trained model to a new lab (launch.py --mode=adapt,
  # bcjax/adapt.py, docs/adaptation.md). 'adabn': BatchNorm statistics
  # re-estimated on the lab's unlabelled images; 'tent': AdaBN, then entropy
  # minimisation on the normalisation layers' scale and shift; 'finetune':
  # supervised steps on a few labelled images (class folders).
  c.adapt = ml_collections.ConfigDict()
  c.adapt.method = 'adabn'  # 'adabn' | 'tent' | 'finetune'
  c.adapt.images = ''  # Folder (walked recursively) or file of the lab's unlabelled images.
  c.adapt.labelled = ''  # finetune: a folder with one sub-folder per class (any subset).
  # finetune: start from and end with AdaBN statistics of the lab's images
  # (config.adapt.images and the labelled ones; only where the model has BatchNorm).
  c.adapt.adabn = True
  c.adapt.batch_size = 64  # AdaBN's forward batch and TENT's batch.
  c.adapt.tent_steps = 10
  c.adapt.tent_learning_rate = 1e-3  # Adam.
  # finetune's stopping rule: a fixed budget of steps, no labelled image held
  # out for validation. The optimiser is config.optimizer at this constant rate.
  c.adapt.steps = 100
  c.adapt.learning_rate = 3e-4
  c.adapt.finetune_batch_size = 32
  c.adapt.trainable = 'all'  # finetune: 'head' | 'norm' | 'all'.
  c.adapt.seed = 0  # Batch order, augmentation and dropout of TENT and finetune.
  # Single-cell crops only: an image outside these sides (px) is an error.
  c.adapt.min_image_side = 8
  c.adapt.max_image_side = 1000

  # -- Parallelism: how the per-device step is mapped over devices.
  c.parallel = 'shard_map'  # 'pmap' | 'shard_map'

  # -- Logging, checkpoints, evaluation.
  c.log_every_steps = 50
  c.checkpoint_every_epochs = 1
  c.keep_checkpoints = 2
  c.eval_every_epochs = 1
  c.tta = False  # Test-time augmentation over flips and 90-degree rotations.
  # (first, last): a jax.profiler trace of those global steps (1-based) into
  # <workdir>/profile, for TensorBoard or Perfetto (bcjax/profiling.py). (): off.
  c.profile_steps = ()
  return c


def tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to seconds on a laptop CPU: tests and smoke runs."""
  config.name = config.name + ':tiny'
  config.data.source = 'synthetic'
  config.data.synthetic_examples = 64
  config.data.shuffle_buffer = 64
  config.batch_size = 8
  config.eval_batch_size = 16
  config.num_epochs = 1
  config.log_every_steps = 2
  return config
