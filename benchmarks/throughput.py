"""Train- and eval-step throughput per device, with an optional PyTorch peer.

For each model (``cnn`` at 64 px, ``cnn_lstm`` at 224 px), batch size and
parallel wrapper (``pmap``, ``shard_map``) this times the project's own steps
(bcjax/steps.py through bcjax/parallel.py, exactly what training runs) on
synthetic data already on the devices: compile time apart, warm-up, then
``--repeats`` timed calls, each synchronised with ``block_until_ready``. It
reports the median and spread of images/s per device, FLOPs per image from
XLA's cost analysis, the FLOP/s achieved and the fraction of the device's
peak where the peak is known (the JSON names the source of each peak).

``--peer torch,torch_compile`` times the PyTorch models of
benchmarks/torch_reference.py in the same process, eager and under
``torch.compile`` (inductor; its compile time is reported apart), alternating
call by call with the JAX steps, and prints bcjax / each peer and bcjax / the
faster of them per model and batch size (``--dtype bfloat16``: the peers run
under ``torch.autocast``). ``--e2e`` adds real training epochs
(benchmarks/e2e.py) over the pure step rate, first epoch and later ones apart,
naming the input path: from the real PBC folder (``--e2e_source pbc
--data_path ...``), a packed file or, labelled as such, the synthetic source;
``--e2e_augment off,on`` measures both (< 0.9: the device starves).

    python benchmarks/throughput.py --peer torch,torch_compile  # docs/benchmarks.md's table
    python benchmarks/throughput.py --models cnn --batch_sizes 64,128,256
    python benchmarks/throughput.py --tiny --peer torch --e2e  # seconds; the smoke test
    python benchmarks/throughput.py --batch_sizes 64 --e2e --e2e_source pbc \
        --data_path ../shared/data/PBC_dataset_normal_DIB --e2e_augment off,on --e2e_epochs 2
    python benchmarks/throughput.py --json out.json --markdown out.md

Runs unchanged on GPU/TPU. On a GPU the PyTorch peer runs on CUDA
(synchronised per call); on a TPU there is no peer.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bcjax import process_setup  # pylint: disable=g-import-not-at-top

process_setup.configure()  # Before JAX runs anything: the allocator setting.

import flax  # pylint: disable=g-import-not-at-top
import jax
import jaxlib
import numpy as np

from bcjax import models, optim, parallel, steps, train_state
from bcjax.models import layers
from configs import cnn as cnn_config
from configs import cnn_lstm as cnn_lstm_config

CONFIGS = {'cnn': cnn_config, 'cnn_lstm': cnn_lstm_config}
WRAPPERS = ('pmap', 'shard_map')
PEERS = ('torch', 'torch_compile')  # PyTorch eager; the same model under torch.compile.
E2E_SOURCES = ('synthetic', 'pbc', 'packed')
STARVED_BELOW = 0.9  # e2e / pure step rate under this: the input pipeline starves the device.

# Dense peak FLOP/s per device by device_kind prefix: (fp32, bf16, source).
# Vendor datasheet figures (dense, no sparsity); "fp32" is the non-tensor-core
# rate on NVIDIA parts, since XLA's default float32 matmuls there may use TF32
# the achieved fraction can exceed what this suggests - read it as a guide.
PEAKS = {
    'NVIDIA H200': (67e12, 989e12, 'NVIDIA H200 datasheet (SXM): FP32 67 TFLOPS, BF16 989 TFLOPS dense'),
    'NVIDIA H100': (67e12, 989e12, 'NVIDIA H100 datasheet (SXM5): FP32 67 TFLOPS, BF16 989 TFLOPS dense'),
    'NVIDIA A100': (19.5e12, 312e12, 'NVIDIA A100 datasheet: FP32 19.5 TFLOPS, BF16 312 TFLOPS dense'),
    'NVIDIA L4': (30.3e12, 121e12, 'NVIDIA L4 datasheet: FP32 30.3 TFLOPS, BF16 121 TFLOPS dense'),
    'TPU v4': (None, 275e12, 'Google Cloud TPU v4 docs: 275 TFLOPS bf16 per chip'),
    'TPU v5 lite': (None, 197e12, 'Google Cloud TPU v5e docs: 197 TFLOPS bf16 per chip'),
    'TPU v5p': (None, 459e12, 'Google Cloud TPU v5p docs: 459 TFLOPS bf16 per chip'),
}


# --------------------------------------------------------------------------
# Device facts


def _cpu_peak() -> tuple[float, str] | None:
  """cores x nominal clock x FP32 FLOP/cycle of the widest FMA the CPU has."""
  try:
    with open('/proc/cpuinfo') as f:
      info = f.read()
  except OSError:
    return None
  flags = next((l.split(':', 1)[1].split() for l in info.splitlines() if l.startswith('flags')), [])
  mhz = [float(l.split(':', 1)[1]) for l in info.splitlines() if l.startswith('cpu MHz')]
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  if not mhz or not cores:
    return None
  if 'avx512f' in flags:
    per_cycle, isa = 64, 'AVX-512: 2 FMA units x 16 fp32 x 2'
  elif 'avx2' in flags and 'fma' in flags:
    per_cycle, isa = 32, 'AVX2: 2 FMA units x 8 fp32 x 2'
  else:
    return None
  ghz = max(mhz) / 1e3
  peak = cores * ghz * 1e9 * per_cycle
  return peak, (f'{cores} cores x {ghz:.2f} GHz (/proc/cpuinfo, nominal) x {per_cycle} '
                f'FLOP/cycle ({isa}; assumes the core has 2 FMA units)')


def device_peak(device: jax.Device, dtype: str) -> tuple[float, str] | None:
  if device.platform == 'cpu':
    return _cpu_peak()
  for prefix, (fp32, bf16, source) in PEAKS.items():
    if device.device_kind.startswith(prefix):
      value = bf16 if dtype == 'bfloat16' else fp32
      return (value, source) if value else None
  return None


def environment() -> dict[str, Any]:
  d = jax.devices()[0]
  env = {
      'device_kind': d.device_kind, 'platform': d.platform,
      'device_count': jax.device_count(), 'local_device_count': jax.local_device_count(),
      'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
      'numpy': np.__version__, 'python': platform.python_version(),
      'host': platform.machine(), 'cpu_count': os.cpu_count(),
      'process_settings': process_setup.applied(),
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
  }
  return env


# --------------------------------------------------------------------------
# Timing


def _spread(seconds: list[float], images: int) -> dict[str, float]:
  """images/s: median and spread over the timed calls."""
  rates = sorted(images / s for s in seconds)
  q = statistics.quantiles(rates, n=4) if len(rates) > 1 else [rates[0]] * 3
  return {'median': statistics.median(rates), 'min': rates[0], 'max': rates[-1],
          'q1': q[0], 'q3': q[2], 'repeats': len(rates)}


def _time_round_robin(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
  """Seconds per call, alternating the callables call by call (fair under load)."""
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      t = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t)
  return times


def _flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


# --------------------------------------------------------------------------
# The steps under test: the project's own, through its wrappers


def make_config(model: str, batch_size: int, tiny: bool, wrapper: str,
                dtype: str = 'float32', microbatch_size: int | None = None):
  config = CONFIGS[model].get_config('tiny' if tiny else '')
  config.dtype = dtype
  if microbatch_size is not None:
    config.microbatch_size = microbatch_size
  config.batch_size = batch_size
  config.eval_batch_size = batch_size
  config.parallel = wrapper
  return config


def countable_twin(config):
  """The same steps in a form XLA's cost analysis counts whole, or None if ``config`` is.

  The analysis counts a ``lax.scan`` body once (microbatches) and sees no
  FLOPs inside FFI calls (the oneDNN convolutions), so those rows take their
  FLOPs from one pass with the matmul lowering: the same function, compiled
  only to be counted.
  """
  twin = config.copy_and_resolve_references()
  twin.microbatch_size = 0
  if layers.resolve_impl(config.model.conv_impl) == 'onednn':
    twin.model.conv_impl = 'matmul'
  same = (twin.microbatch_size == config.microbatch_size
          and twin.model.conv_impl == config.model.conv_impl)
  return None if same else twin


def build_steps(config, seed: int = 0, count_flops: bool = True) -> dict[str, Any]:
  """Compiled train and eval steps of ``config.parallel`` on synthetic, on-device data.

  Returns ``train()`` / ``eval()`` thunks (the train thunk carries its state
  forward, as training does), compile seconds and XLA's FLOPs per device
  call (``count_flops=False``: no second compile for the count). This is
  the one place that builds steps: swap it to benchmark another step function.
  """
  model = models.build_model(config, axis_name=steps.AXIS)
  runner = parallel.make_runner(config, model)
  d = len(runner.local_devices)
  per_device = parallel.per_device_batch(config.batch_size, jax.device_count())
  tx, _ = optim.make(config, steps_per_epoch=100)
  state = runner.put_state(train_state.create(config, jax.random.key(seed), tx))
  rs = np.random.RandomState(seed)
  s = config.image_size
  host = {'image': rs.rand(d, per_device, s, s, 3).astype(np.float32),
          'label': rs.randint(0, config.num_classes, (d, per_device)).astype(np.int32),
          'mask': np.ones((d, per_device), bool)}
  batch = runner.put_batch(host)
  train_batch = {k: v for k, v in batch.items() if k != 'mask'}
  rng = jax.random.key(seed + 1)

  t = time.perf_counter()
  train_c = runner.train_step.lower(state, train_batch, rng).compile()
  train_compile = time.perf_counter() - t
  t = time.perf_counter()
  eval_c = runner.eval_step.lower(state, batch).compile()
  eval_compile = time.perf_counter() - t
  flops = {'train': _flops(train_c), 'eval': _flops(eval_c)}
  twin = countable_twin(config) if count_flops else None
  if twin is not None:
    twin_runner = parallel.make_runner(twin, models.build_model(twin, axis_name=steps.AXIS))
    flops = {'train': _flops(twin_runner.train_step.lower(state, train_batch, rng).compile()),
             'eval': _flops(twin_runner.eval_step.lower(state, batch).compile())}

  holder = [state]

  def train():
    holder[0], metrics = train_c(holder[0], train_batch, rng)
    return metrics['loss_sum']

  def evaluate():
    return eval_c(holder[0], batch)[0]['loss_sum']

  return {'train': train, 'eval': evaluate, 'runner': runner, 'per_device': per_device,
          'train_compiled': train_c, 'state': holder, 'rng': rng,
          'compile_s': {'train': train_compile, 'eval': eval_compile},
          'flops_per_call': flops}


def torch_device(platform_: str):
  """The torch device that matches JAX's platform: 'cpu' or 'cuda' (GPU)."""
  import torch  # pylint: disable=g-import-not-at-top
  if platform_ == 'cpu':
    return torch.device('cpu')
  if platform_ == 'gpu' and torch.cuda.is_available():
    return torch.device('cuda')
  raise SystemExit(f'--peer torch: PyTorch has no device for JAX platform {platform_!r}')


def build_torch(config, compile_: bool = False) -> dict[str, Any]:
  """The PyTorch peer's steps on the device JAX runs on, each call synchronised.

  On CUDA the thunks end with ``torch.cuda.synchronize()`` (the counterpart
  of ``block_until_ready``) and cuDNN autotuning is on, as XLA autotunes its
  convolutions too. ``compile_``: the model under ``torch.compile``; the
  first train and eval calls (the compile) are made and timed here, apart.
  ``config.dtype='bfloat16'``: the peer runs under ``torch.autocast`` in
  bfloat16, its parameters float32, as bcjax's.
  """
  import torch  # pylint: disable=g-import-not-at-top
  from benchmarks import torch_reference as tr  # pylint: disable=g-import-not-at-top
  device = torch_device(jax.devices()[0].platform)
  cuda = device.type == 'cuda'
  if cuda:
    torch.backends.cudnn.benchmark = True
  model = tr.build(config).to(device)
  params = tr.num_trainable(model)
  if compile_:
    model = tr.compiled(model)
  autocast = torch.bfloat16 if config.dtype == 'bfloat16' else None
  images, labels = (t.to(device) for t in tr.synthetic_batch(config, config.batch_size))
  train = tr.make_train_step(model, autocast=autocast)
  evaluate = tr.make_eval_step(model, autocast=autocast)

  def synced(fn):
    def call():
      out = fn()
      if cuda:
        torch.cuda.synchronize()
      return out
    return call

  out = {'train': synced(lambda: train(images, labels)), 'eval': synced(lambda: evaluate(images)),
         'threads': torch.get_num_threads(), 'version': torch.__version__,
         'device': torch.cuda.get_device_name() if cuda else 'cpu', 'params': params}
  if compile_:
    out['compile_s'] = {}
    for phase in ('train', 'eval'):
      t = time.perf_counter()
      out[phase]()
      out['compile_s'][phase] = time.perf_counter() - t
  return out


def have_torch() -> bool:
  import importlib.util  # pylint: disable=g-import-not-at-top
  return importlib.util.find_spec('torch') is not None


# --------------------------------------------------------------------------
# End to end: a real epoch from tf.data


def e2e_config(model: str, batch: int, tiny: bool, wrapper: str, dtype: str, *, source: str,
               data_path: str, augment: bool, placement: str):
  """The config of one --e2e measurement: the model's own, fed from ``source``."""
  config = make_config(model, batch, tiny, wrapper, dtype)
  config.data.source = source
  if source != 'synthetic':
    config.data.path = data_path
  config.data.augment.flips = config.data.augment.rot90 = augment
  if placement:
    config.data.placement = placement
  return config


def measure_e2e(configs: list, epochs: int) -> dict[str, Any]:
  """benchmarks/e2e.py for each config; the headline is the worst later-epoch ratio."""
  from benchmarks import e2e  # pylint: disable=g-import-not-at-top
  runs = [e2e.measure(c, epochs=epochs) for c in configs]
  worst = min(runs, key=lambda r: r['ratio_to_step_rate'])
  return {'images_per_s': worst['images_per_s'], 'ratio_to_step_rate': worst['ratio_to_step_rate'],
          'starved': worst['ratio_to_step_rate'] < STARVED_BELOW, 'runs': runs}


# --------------------------------------------------------------------------
# The benchmark


def run(models_: list[str], batch_sizes: list[int], wrappers: list[str], *, repeats: int,
        warmup: int, peer: str | None, tiny: bool, e2e: bool, e2e_examples: int,
        dtype: str = 'float32', microbatch_size: int | None = None,
        e2e_source: str = 'synthetic', data_path: str = '', e2e_augment=(False,),
        e2e_epochs: int = 2, placement: str = '', count_flops: bool = True,
        log=print) -> dict[str, Any]:
  """The table's rows; ``peer``: '' or a comma-separated subset of :data:`PEERS`."""
  peers = [x for x in (peer or '').split(',') if x]
  env = environment()
  devices = jax.device_count()
  results = []
  for model in models_:
    for batch in batch_sizes:
      if batch % devices:
        log(f'skip {model} batch {batch}: not a multiple of {devices} devices')
        continue
      log(f'{model} batch {batch}: compiling ...')
      built = {w: build_steps(make_config(model, batch, tiny, w, dtype, microbatch_size),
                              count_flops=count_flops)
               for w in wrappers}
      base = make_config(model, batch, tiny, wrappers[0], dtype, microbatch_size)
      torch_steps = {x: build_torch(base, compile_=x == 'torch_compile') for x in peers}
      dtype = base.dtype
      peak = device_peak(jax.devices()[0], dtype)
      row = {'model': model, 'image_size': base.image_size, 'batch_size': batch,
             'dtype': dtype, 'conv_impl': layers.resolve_impl(base.model.conv_impl),
             'wrappers': {}}
      if base.microbatch_size:
        row['microbatch_size'] = base.microbatch_size
      for phase in ('train', 'eval'):
        fns = {w: built[w][phase] for w in wrappers}
        fns.update({x: t[phase] for x, t in torch_steps.items()})
        for fn in fns.values():  # Warm-up (after the compile).
          for _ in range(warmup):
            jax.block_until_ready(fn())
        times = _time_round_robin(fns, repeats)
        for w in wrappers:
          b = built[w]
          ips = _spread(times[w], b['per_device'])  # Per device.
          entry = row['wrappers'].setdefault(w, {'compile_s': b['compile_s']})
          fig = {'images_per_s_per_device': ips,
                 'images_per_s_total': ips['median'] * devices}
          flops = b['flops_per_call'][phase]
          if flops:
            fig['flops_per_image'] = flops / b['per_device']
            fig['achieved_flops_per_s'] = flops * ips['median'] / b['per_device']
            if peak:
              fig['peak_flops_per_s'] = peak[0]
              fig['fraction_of_peak'] = fig['achieved_flops_per_s'] / peak[0]
              row['peak_source'] = peak[1]
          entry[phase] = fig
        for x, t in torch_steps.items():
          tips = _spread(times[x], batch)
          facts = {k: t[k] for k in ('threads', 'version', 'device')}
          if 'compile_s' in t:
            facts['compile_s'] = t['compile_s']
          row.setdefault(x, facts)[phase] = {'images_per_s': tips}
          for w in wrappers:
            row['wrappers'][w][phase][f'ratio_vs_{x}'] = (
                row['wrappers'][w][phase]['images_per_s_total'] / tips['median'])
        if torch_steps:
          faster = max(torch_steps, key=lambda x: row[x][phase]['images_per_s']['median'])
          for w in wrappers:
            fig = row['wrappers'][w][phase]
            fig['faster_peer'] = faster
            fig['ratio_vs_faster_peer'] = fig[f'ratio_vs_{faster}']
      if e2e:
        configs = [e2e_config(model, batch, tiny, wrappers[0], dtype, source=e2e_source,
                              data_path=data_path, augment=a, placement=placement)
                   for a in e2e_augment]
        for c in configs:
          c.data.synthetic_examples = max(e2e_examples, 4 * batch)
        row['e2e'] = dict(measure_e2e(configs, e2e_epochs), wrapper=wrappers[0])
      results.append(row)
      log(_row_summary(row))
  return {'environment': env, 'settings': {
      'repeats': repeats, 'warmup': warmup, 'peer': peer or '', 'tiny': tiny,
      'wrappers': wrappers, 'batch_sizes': batch_sizes, 'models': models_}, 'results': results}


def _row_summary(row) -> str:
  parts = []
  for w, e in row['wrappers'].items():
    r = e['train'].get('ratio_vs_faster_peer')
    parts.append(f"{w} train {e['train']['images_per_s_per_device']['median']:.0f} img/s/dev"
                 + (f" (x{r:.2f} {e['train']['faster_peer']})" if r else ''))
  return f"{row['model']} batch {row['batch_size']}: " + ', '.join(parts)


def _fmt(value, scale, spec) -> str:
  return '-' if value is None else format(value * scale, spec)


def markdown(report: dict[str, Any]) -> str:
  env = report['environment']
  lines = [f"Device: {env['device_count']} x {env['device_kind']} ({env['platform']}); "
           f"jax {env['jax']}, jaxlib {env['jaxlib']}, flax {env['flax']}; "
           f"process settings {env['process_settings']}; "
           f"{report['settings']['repeats']} timed calls, median [min-max].", '',
           '| model | batch | wrapper | step | img/s per device | compile s | MFLOP/img '
           '| GFLOP/s | % peak | PyTorch img/s | torch.compile img/s (compile s) '
           '| bcjax / PyTorch | bcjax / torch.compile | bcjax / faster peer |',
           '| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- '
           '| ---: | ---: | ---: |']
  for row in report['results']:
    for w, e in row['wrappers'].items():
      for phase in ('train', 'eval'):
        f = e[phase]
        ips = f['images_per_s_per_device']
        t = row.get('torch', {}).get(phase, {}).get('images_per_s')
        tc = row.get('torch_compile', {}).get(phase, {}).get('images_per_s')
        tc_compile = row.get('torch_compile', {}).get('compile_s', {}).get(phase)
        name = f"{row['model']} {row['image_size']}px" + (
            f" {row['dtype']}" if row['dtype'] != 'float32' else '') + (
            f" mb{row['microbatch_size']}" if row.get('microbatch_size') else '') + (
            f" ({row['conv_impl']})" if row.get('conv_impl') else '')
        cells = [name, str(row['batch_size']), w, phase,
                 f"{ips['median']:.0f} [{ips['min']:.0f}-{ips['max']:.0f}]",
                 f"{e['compile_s'][phase]:.1f}",
                 _fmt(f.get('flops_per_image'), 1e-6, '.1f'),
                 _fmt(f.get('achieved_flops_per_s'), 1e-9, '.1f'),
                 _fmt(f.get('fraction_of_peak'), 100, '.1f'),
                 f"{t['median']:.0f} [{t['min']:.0f}-{t['max']:.0f}]" if t else '-',
                 (f"{tc['median']:.0f} [{tc['min']:.0f}-{tc['max']:.0f}] ({tc_compile:.0f})"
                  if tc else '-'),
                 _fmt(f.get('ratio_vs_torch'), 1, '.2f'),
                 _fmt(f.get('ratio_vs_torch_compile'), 1, '.2f'),
                 _fmt(f.get('ratio_vs_faster_peer'), 1, '.2f')]
        lines.append('| ' + ' | '.join(cells) + ' |')
  e2e = [r for r in report['results'] if 'e2e' in r]
  if e2e:
    lines += ['', '| model | batch | source | input path | augment | first epoch img/s (decoding) '
              '| / step | later epochs img/s | / pure step rate | verdict |',
              '| --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | --- |']
    for r in e2e:
      for v in r['e2e']['runs']:
        starved = v['ratio_to_step_rate'] < STARVED_BELOW
        verdict = 'STARVED: the input is the bottleneck' if starved else 'fed'
        source = v['source'] + (' (not real data)' if v['source'] == 'synthetic' else '')
        lines.append(f"| {r['model']} {v['image_size']}px | {r['batch_size']} | {source} "
                     f"| {v['path']} | {'flips+rot90' if v['augment'] else 'none'} "
                     f"| {v['first_epoch_images_per_s']:.0f} | {v['first_epoch_ratio']:.2f} "
                     f"| {v['images_per_s']:.0f} | {v['ratio_to_step_rate']:.2f} | {verdict} |")
  peaks = {r.get('peak_source') for r in report['results']} - {None}
  if peaks:
    lines += [''] + [f'Peak: {p}.' for p in sorted(peaks)]
  return '\n'.join(lines)


def _ints(s: str) -> list[int]:
  return [int(x) for x in s.split(',') if x]


def main(argv=None) -> dict[str, Any]:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--models', default='cnn,cnn_lstm', help='comma-separated: cnn,cnn_lstm')
  p.add_argument('--batch_sizes', default='128', type=_ints,
                 help='global batch sizes (default 128, the CPU goal)')
  p.add_argument('--parallel', default=','.join(WRAPPERS), help='pmap,shard_map')
  p.add_argument('--repeats', type=int, default=None, help='timed calls (default 10; 3 for cnn_lstm)')
  p.add_argument('--warmup', type=int, default=1, help='untimed calls after the compile')
  p.add_argument('--peer', default='',
                 help='time PyTorch alongside: torch (eager), torch_compile, or both, comma-separated')
  p.add_argument('--e2e', action='store_true',
                 help='add real training epochs over the pure step rate (benchmarks/e2e.py)')
  p.add_argument('--e2e_source', default='synthetic', choices=E2E_SOURCES,
                 help='config.data.source of --e2e: pbc (the real folder), packed, synthetic')
  p.add_argument('--data_path', default='', help='config.data.path of --e2e (pbc, packed)')
  p.add_argument('--e2e_augment', default='off',
                 help='off, on (flips + rot90) or off,on: --e2e with and without augmentation')
  p.add_argument('--e2e_epochs', type=int, default=2, help='epochs per --e2e measurement (>= 2)')
  p.add_argument('--placement', default='', choices=['', 'auto', 'device', 'stream'],
                 help="config.data.placement of --e2e (default: the config's, stream)")
  p.add_argument('--e2e_examples', type=int, default=1024, help='synthetic examples for --e2e')
  p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'],
                 help='compute dtype of the bcjax steps (config.dtype)')
  p.add_argument('--microbatch_size', type=int, default=None,
                 help="config.microbatch_size of the bcjax train steps (default: the config's)")
  p.add_argument('--tiny', action='store_true',
                 help="the configs' tiny variants, batch 4, 1 repeat: a smoke run")
  p.add_argument('--json', default='', help='write the report here')
  p.add_argument('--markdown', default='', help='write the table here')
  args = p.parse_args(argv)
  models_ = [m for m in args.models.split(',') if m]
  unknown = set(models_) - set(CONFIGS)
  if unknown:
    p.error(f'unknown model(s) {sorted(unknown)}; known: {", ".join(CONFIGS)}')
  peers = [x for x in args.peer.split(',') if x]
  if set(peers) - set(PEERS):
    p.error(f'unknown peer(s) {sorted(set(peers) - set(PEERS))}; known: {", ".join(PEERS)}')
  augment = {'off': False, 'on': True}
  if not args.e2e_augment or set(args.e2e_augment.split(',')) - set(augment):
    p.error('--e2e_augment is off, on or off,on')
  if args.e2e and args.e2e_source != 'synthetic' and not args.data_path:
    p.error(f'--e2e_source {args.e2e_source} needs --data_path')
  wrappers = [w for w in args.parallel.split(',') if w]
  if set(wrappers) - set(WRAPPERS):
    p.error(f'unknown wrapper(s); known: {", ".join(WRAPPERS)}')
  batch_sizes = args.batch_sizes
  repeats = args.repeats
  if args.tiny:
    batch_sizes = [max(4, jax.device_count())] if args.batch_sizes == [128] else batch_sizes
    repeats = repeats or 1
  report = None
  results, env, settings = [], None, None
  for m in models_:  # cnn_lstm at 224 px is heavy on CPU: fewer repeats by default.
    r = repeats or (3 if m == 'cnn_lstm' else 10)
    part = run([m], batch_sizes, wrappers, repeats=r, warmup=args.warmup, peer=','.join(peers),
               tiny=args.tiny, e2e=args.e2e, e2e_examples=64 if args.tiny else args.e2e_examples,
               dtype=args.dtype, microbatch_size=args.microbatch_size,
               e2e_source=args.e2e_source, data_path=args.data_path,
               e2e_augment=[augment[a] for a in args.e2e_augment.split(',')],
               e2e_epochs=args.e2e_epochs, placement=args.placement,
               log=functools.partial(print, file=sys.stderr))
    results += part['results']
    env, settings = part['environment'], part['settings']
    settings['repeats_' + m] = r
  settings['models'] = models_
  settings.pop('repeats', None)
  settings['repeats'] = repeats or 'per model'
  report = {'environment': env, 'settings': settings, 'results': results}
  table = markdown(report)
  print(table)
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(report, f, indent=2)
  if args.markdown:
    with open(args.markdown, 'w') as f:
      f.write(table + '\n')
  return report


if __name__ == '__main__':
  main()
