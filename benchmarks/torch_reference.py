"""PyTorch peers of bcjax's two models, for throughput comparisons only.

The same layers, shapes and trainable-parameter counts as the Flax models in
``bcjax/models`` (checked by :func:`check_param_counts`), trained with Adam
and cross-entropy, so ``benchmarks/throughput.py --peer torch`` can time both
in one process. Needs the optional extra ``bench`` (``pip install -e .[bench]``,
which pins ``torch==2.13.0``)::

    from benchmarks import torch_reference as tr
    model = tr.build(config)                     # a bcjax ml_collections config
    step = tr.make_train_step(model, lr=1e-3)    # step(images, labels) -> loss
    images, labels = tr.synthetic_batch(config, batch_size=128)
    step(images, labels)

Differences that do not change the work done per image: PyTorch runs NCHW
(or ``channels_last`` memory format, see :func:`build`), so the CNN's flatten
order differs from Flax's NHWC flatten; and ``torch.nn.LSTM`` carries two
bias vectors where Flax/Keras carry one, so the second (``bias_hh``) is fixed
at zero and not trained, which keeps the trainable counts equal.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
from torch import nn


class CNN(nn.Module):
  """Table 1: conv32 relu pool drop, conv64 relu pool drop, dense64 relu drop, dense."""

  def __init__(self, image_size: int = 64, num_classes: int = 8, dense_features: int = 64,
               dropout_conv: float = 0.25, dropout_dense: float = 0.5):
    super().__init__()
    side = ((image_size - 2) // 2 - 2) // 2
    self.features = nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(dropout_conv),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(dropout_conv),
    )
    self.classifier = nn.Sequential(
        nn.Flatten(), nn.Linear(64 * side * side, dense_features), nn.ReLU(),
        nn.Dropout(dropout_dense), nn.Linear(dense_features, num_classes),
    )

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.classifier(self.features(x))


def _single_bias_lstm(input_size: int, hidden: int) -> nn.LSTM:
  """A batch-first LSTM with one trainable bias, like Flax's OptimizedLSTMCell."""
  lstm = nn.LSTM(input_size, hidden, batch_first=True)
  with torch.no_grad():
    lstm.bias_hh_l0.zero_()
  lstm.bias_hh_l0.requires_grad_(False)
  return lstm


class CNNLSTM(nn.Module):
  """Table 2: a conv/BN/ReLU/pool extractor, then Conv1D/BN/pool x2 and LSTM 100, 50."""

  def __init__(self, num_classes: int = 8,
               extractor_features: Sequence[int] = (16, 32, 64, 64, 64),
               dropout: float = 0.2):
    super().__init__()
    stages, c = [], 3
    for f in extractor_features:
      # momentum=0.1 in PyTorch's convention is Flax's momentum=0.9.
      stages += [nn.Conv2d(c, f, 3, padding='same'), nn.BatchNorm2d(f, momentum=0.1),
                 nn.ReLU(), nn.MaxPool2d(2)]
      c = f
    self.extractor = nn.Sequential(*stages)
    self.head_conv = nn.Sequential(
        nn.Conv1d(c, 64, 3), nn.BatchNorm1d(64, momentum=0.1), nn.MaxPool1d(2),
        nn.Conv1d(64, 128, 3), nn.BatchNorm1d(128, momentum=0.1), nn.MaxPool1d(2),
    )
    self.lstm1 = _single_bias_lstm(128, 100)
    self.lstm2 = _single_bias_lstm(100, 50)
    self.drop = nn.Dropout(dropout)
    self.logits = nn.Linear(50, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.extractor(x)                       # (N, C, h, w)
    x = x.flatten(2)                            # (N, C, h*w): raster order, as in Flax.
    x = self.head_conv(x).transpose(1, 2)       # (N, L, 128)
    x, _ = self.lstm1(x)
    x = self.drop(x)
    x, _ = self.lstm2(x)
    x = self.drop(x[:, -1])
    return self.logits(x)


def build(config, channels_last: bool = True) -> nn.Module:
  """The PyTorch peer of ``config.model.name`` ('cnn' or 'cnn_lstm').

  ``channels_last`` stores 4-D activations NHWC, which oneDNN runs faster on
  CPU for these shapes (measured in docs/benchmarks.md).
  """
  name = config.model.name
  if name == 'cnn':
    model = CNN(config.image_size, config.num_classes, config.model.dense_features,
                config.model.dropout_conv, config.model.dropout_dense)
  elif name == 'cnn_lstm':
    model = CNNLSTM(config.num_classes, tuple(config.model.extractor_features),
                    config.model.dropout)
  else:
    raise ValueError(f"no PyTorch peer for model {name!r}; known: 'cnn', 'cnn_lstm'")
  if channels_last:
    model = model.to(memory_format=torch.channels_last)
  return model


def num_trainable(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def num_batch_stats(model: nn.Module) -> int:
  """Running means and variances, Flax's ``batch_stats`` collection."""
  return sum(b.numel() for n, b in model.named_buffers() if n.endswith(('running_mean', 'running_var')))


def check_param_counts(config, flax_variables) -> tuple[int, int]:
  """Asserts the peer's trainable and BatchNorm-statistic counts equal Flax's."""
  import jax
  model = build(config)
  flax_params = sum(x.size for x in jax.tree.leaves(flax_variables['params']))
  flax_stats = sum(x.size for x in jax.tree.leaves(flax_variables.get('batch_stats', {})))
  ours, stats = num_trainable(model), num_batch_stats(model)
  if (ours, stats) != (flax_params, flax_stats):
    raise AssertionError(
        f'{config.model.name}: PyTorch peer has {ours:,} params + {stats:,} batch stats, '
        f'Flax model {flax_params:,} + {flax_stats:,}')
  return ours, stats


def synthetic_batch(config, batch_size: int, channels_last: bool = True, seed: int = 0):
  g = torch.Generator().manual_seed(seed)
  s = config.image_size
  images = torch.rand(batch_size, 3, s, s, generator=g)
  if channels_last:
    images = images.contiguous(memory_format=torch.channels_last)
  labels = torch.randint(0, config.num_classes, (batch_size,), generator=g)
  return images, labels


def _autocast(images: torch.Tensor, dtype: torch.dtype | None):
  """bcjax's ``config.dtype='bfloat16'``: bfloat16 compute, float32 parameters."""
  if dtype is None:
    return contextlib.nullcontext()
  return torch.autocast(images.device.type, dtype=dtype)


def compiled(model: nn.Module) -> nn.Module:
  """``torch.compile`` (inductor; on CPU it generates and compiles C++) of ``model``.

  The forward and, through AOTAutograd, the backward are compiled; the Adam
  update stays eager. The first calls compile: time them apart.
  """
  # dynamic=False: each batch size gets its own static graph, as XLA compiles
  # one program per shape (automatic dynamic shapes would recompile slower code).
  return torch.compile(model, dynamic=False)


def make_train_step(model: nn.Module, lr: float = 1e-3,
                    autocast: torch.dtype | None = None) -> Callable:
  """``step(images, labels) -> loss``: forward, backward, Adam update.

  Eager unless ``model`` is :func:`compiled`. ``autocast`` (``torch.bfloat16``)
  runs the forward and backward in that dtype, as bcjax's ``config.dtype``.
  """
  model.train()
  opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
  loss_fn = nn.CrossEntropyLoss()

  def step(images, labels):
    opt.zero_grad(set_to_none=True)
    with _autocast(images, autocast):
      loss = loss_fn(model(images), labels)
    loss.backward()
    opt.step()
    return loss.detach()
  return step


def make_eval_step(model: nn.Module, autocast: torch.dtype | None = None) -> Callable:
  """``step(images) -> logits`` in eval mode without autograd."""
  def step(images):
    model.eval()
    with torch.inference_mode(), _autocast(images, autocast):
      out = model(images)
    model.train()
    return out
  return step


def forward_flops_per_image(config) -> float:
  """Multiply-adds x 2 of the convolutions, linears and LSTMs (analytic, no BN/pool)."""
  s = config.image_size
  if config.model.name == 'cnn':
    a = s - 2
    b = a // 2 - 2
    side = b // 2
    macs = a * a * 27 * 32 + b * b * 288 * 64 + side * side * 64 * 64 + 64 * 8
    return 2.0 * macs
  macs, c = 0, 3
  for f in config.model.extractor_features:
    macs += s * s * 9 * c * f
    s, c = s // 2, f
  L = s * s
  L1 = L - 2
  macs += L1 * 3 * c * 64
  L2 = L1 // 2 - 2
  macs += L2 * 3 * 64 * 128
  L3 = L2 // 2
  macs += L3 * 4 * (128 * 100 + 100 * 100) + L3 * 4 * (100 * 50 + 50 * 50) + 50 * 8
  return 2.0 * macs


__all__ = ['CNN', 'CNNLSTM', 'build', 'check_param_counts', 'compiled', 'make_train_step',
           'make_eval_step', 'synthetic_batch', 'num_trainable', 'forward_flops_per_image']
