"""Training-step benchmark of the R3D-18 encoder on synthetic on-device batches (optionally vs PyTorch).

Default: for the SSL (4×112², batch 16) and fine-tuning (16×112², batch 4) shapes, the jitted train step
(encoder + 1-logit head, BCE, Adam, donated state) and the eval-mode forward → compile time, median time,
clips/s, GFLOP/s against the analytic R3D-18 count (10.78 / 40.70 GMAC per clip, train = 3× forward) and
MFU against a GEMM of each compute dtype timed in the same alternation (same machine load; 8192² on an
accelerator). Last lines: `train_mfu=<float>` and `train_clips_per_s=<float>` for the first shape and
variant. Needs only jax/flax/optax/numpy. --conv-impl and --dtype take comma lists: all variants are
compiled and timed alternately in one process (A B A B ...), so their ratios are like for like.

--compare-torch: adds the equivalent PyTorch r3d_18 step and forward (torch_reference.make_torch_r3d18) to
the same alternation, torch on as many threads as XLA uses, with an idle --gap before every timed call so
neither side's spinning worker threads steal the other's cores; prints medians and ratios (ours ÷ torch).
Last line: `train_step_time_ratio_vs_torch=<float>` for the first shape (SSL unless --shapes says otherwise).
Timings on a shared machine are noisy: compare only numbers from one run, and report the ratios.

  python scripts/bench_train.py                                   # jax only, both shapes
  python scripts/bench_train.py --compare-torch --repeats 5       # ratio vs torch f32
  python scripts/bench_train.py --compare-torch --shapes ssl --dtype float32,bfloat16 --torch-variants f32,bf16,cl
  python scripts/bench_train.py --shapes ssl --dtype bfloat16 --ssl-batch 784 --no-forward   # GPU: 392 pairs

--memory (scripts/bench_memory.py): the compiled SSL step's peak memory from XLA's memory analysis at global
batches 64…784 clips for none / remat / microbatch / remat+microbatch, the largest batch per 24/40/80 GiB,
then the step-time cost of each option side by side on a small batch (--time-batch, 0 = skip):
  python scripts/bench_train.py --memory [--dtype bfloat16] [--memory-batches 64,256,784] [--time-batch 16]
"""
from __future__ import annotations

import argparse
import importlib
import itertools
import os
import statistics
import sys
import time

import numpy as np


import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from echojax.models.conv import resolve_conv_impl  # noqa: E402
from echojax.models.resnet3d import ResNet3D  # noqa: E402

SHAPES = {'ssl': (4, 112), 'finetune': (16, 112)}  # (frames, size)


# ------------------------------------------------------------------------------------------ FLOP count
def r3d_convs(frames: int, size: int, width: int = 64, in_channels: int = 3, depths=(2, 2, 2, 2)):
  """Every conv of R3D-18 in order: (name, input (T,H,W,C), kernel, stride, padding, Cout)."""
  convs = [('stem', (frames, size, size, in_channels), (3, 7, 7), (1, 2, 2), (1, 3, 3), width)]
  t, h, c = frames, (size - 1) // 2 + 1, width
  for stage, depth in enumerate(depths):
    cout = width * 2 ** stage
    for index in range(depth):
      stride = 2 if stage > 0 and index == 0 else 1
      name = f'layer{stage + 1}_{index}'
      convs.append((f'{name}.conv1', (t, h, h, c), (3, 3, 3), (stride,) * 3, (1, 1, 1), cout))
      if stride != 1 or c != cout:
        convs.append((f'{name}.downsample', (t, h, h, c), (1, 1, 1), (stride,) * 3, (0, 0, 0), cout))
      t, h = (t - 1) // stride + 1, (h - 1) // stride + 1
      convs.append((f'{name}.conv2', (t, h, h, cout), (3, 3, 3), (1, 1, 1), (1, 1, 1), cout))
      c = cout
  return convs


def conv_macs(shape, kernel, stride, padding, cout) -> int:
  out = [(n + 2 * p - k) // s + 1 for n, k, s, p in zip(shape[:3], kernel, stride, padding)]
  return int(np.prod(out)) * int(np.prod(kernel)) * shape[3] * cout


def r3d_macs_per_clip(frames: int, size: int, width: int = 64, in_channels: int = 3) -> int:
  """Analytic multiply-accumulates of one forward pass (every tap counted, padding included)."""
  return sum(conv_macs(*c[1:]) for c in r3d_convs(frames, size, width, in_channels))


# ------------------------------------------------------------------------------------------ timing
def alternating_medians(fns, repeats: int, gap_s: float = 0.0):
  """Run fns round-robin `repeats` times (after one warm-up each); per-fn median seconds.

  gap_s: idle pause before each timed call, so one framework's spinning worker threads (OpenMP keeps
  spinning after a parallel region) do not steal cores from the next measurement.
  """
  for f in fns:
    f()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for i, f in enumerate(fns):
      time.sleep(gap_s)
      start = time.perf_counter()
      f()
      times[i].append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


def make_jax_gemm(dtype: str = 'float32', n: int = 2048, count: int = 8):
  """(callable, FLOPs per call): `count` chained n×n matmuls in `dtype`, timed inside the alternation so the
  GEMM peak is measured under the same machine load as the steps it is compared with. bfloat16 keeps the
  default bf16 output (f32 accumulation inside the GEMM on GPU/TPU; XLA:CPU's fallback dot rejects
  bf16×bf16→f32), which is the rate an MFU against "the card's bf16 matmul peak" refers to."""
  a = (jax.random.normal(jax.random.key(1), (n, n), jnp.float32) / n ** 0.5).astype(dtype)
  chain = jax.jit(lambda a: jax.lax.fori_loop(0, count, lambda _, b: b @ a, a))
  return (lambda: chain(a).block_until_ready()), 2 * n ** 3 * count


def default_gemm_size() -> int:
  """2048² saturates a CPU's GEMM; an accelerator needs 8192² to reach its matmul peak."""
  return 2048 if jax.default_backend() == 'cpu' else 8192


# ------------------------------------------------------------------------------------------ our step
class BenchNet(nn.Module):
  """Encoder + 1-logit linear head: the fine-tuning network's shape without its extras."""
  conv_impl: str
  dtype: object
  remat: bool

  @nn.compact
  def __call__(self, x, train: bool):
    features = ResNet3D(conv_impl=self.conv_impl, dtype=self.dtype, remat=self.remat, name='encoder')(x, train)
    return nn.Dense(1, name='head')(features.astype(jnp.float32))[:, 0]


def make_jax_step(conv_impl, dtype, remat, in_channels, batch, frames, size):
  """(train_step(), forward(), compile seconds) closed over on-device state and a synthetic batch."""
  net = BenchNet(conv_impl, jnp.dtype(dtype), remat)
  key_x, key_y, key_init = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(key_x, (batch, frames, size, size, in_channels), jnp.float32)
  y = jax.random.bernoulli(key_y, 0.5, (batch,)).astype(jnp.float32)
  variables = jax.jit(lambda: net.init(key_init, x[:1], train=False))()
  tx = optax.adam(1e-4)
  state = {'params': variables['params'], 'batch_stats': variables['batch_stats'],
           'opt_state': tx.init(variables['params'])}

  def train_step(state, x, y):
    def loss_fn(params):
      logits, updates = net.apply({'params': params, 'batch_stats': state['batch_stats']}, x, train=True,
                                  mutable=['batch_stats'])
      return optax.sigmoid_binary_cross_entropy(logits, y).mean(), updates['batch_stats']
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state['params'])
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    return {'params': optax.apply_updates(state['params'], updates), 'batch_stats': batch_stats,
            'opt_state': opt_state}, loss

  start = time.perf_counter()
  step = jax.jit(train_step, donate_argnums=(0,)).lower(state, x, y).compile()
  compile_s = time.perf_counter() - start
  forward = jax.jit(lambda v, x: net.apply(v, x, train=False))
  holder = {'state': state}

  def run_step():
    holder['state'], loss = step(holder['state'], x, y)
    loss.block_until_ready()

  def run_forward():
    s = holder['state']
    forward({'params': s['params'], 'batch_stats': s['batch_stats']}, x).block_until_ready()
  return run_step, run_forward, compile_s


# ------------------------------------------------------------------------------------------ torch step
TORCH_VARIANTS = ('f32', 'cl', 'bf16')  # NCDHW float32, channels_last_3d float32, bf16 autocast


def make_torch_step(torch, variant, in_channels, batch, frames, size):
  """torch r3d_18 (+1-logit fc), Adam, BCE: (train_step(), eval forward()) for one TORCH_VARIANTS entry."""
  from echojax.models.torch_reference import make_torch_r3d18
  torch.manual_seed(0)
  model = make_torch_r3d18(64, in_channels, num_classes=1)
  x = torch.randn(batch, in_channels, frames, size, size)
  if variant == 'cl':
    model = model.to(memory_format=torch.channels_last_3d)
    x = x.contiguous(memory_format=torch.channels_last_3d)
  y = torch.randint(0, 2, (batch,)).float()
  opt = torch.optim.Adam(model.parameters(), lr=1e-4)
  loss_fn = torch.nn.BCEWithLogitsLoss()
  autocast = lambda: torch.autocast('cpu', dtype=torch.bfloat16, enabled=variant == 'bf16')

  def run_step():
    model.train()
    opt.zero_grad(set_to_none=True)
    with autocast():
      loss = loss_fn(model(x)[:, 0].float(), y)
    loss.backward()
    opt.step()

  def run_forward():
    model.eval()
    with torch.no_grad(), autocast():
      model(x)
  return run_step, run_forward


# ------------------------------------------------------------------------------------------ main
def _split(text):
  return [t.strip() for t in text.split(',') if t.strip()]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--shapes', default='ssl,finetune', help='comma list of ssl, finetune')
  parser.add_argument('--ssl-batch', type=int, default=16)
  parser.add_argument('--finetune-batch', type=int, default=4)
  parser.add_argument('--in-channels', type=int, default=3)
  parser.add_argument('--conv-impl', default='auto',
                      help='comma list of auto|xla|gemm; several are measured alternately in one run')
  parser.add_argument('--dtype', default='float32', help='comma list of float32|bfloat16 (compute dtype)')
  parser.add_argument('--remat', action='store_true', help='rematerialise each residual block')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--gap', type=float, default=1.0,
                      help='seconds idle before each timed call (lets the other side\'s threads stop spinning)')
  parser.add_argument('--no-forward', action='store_true', help='skip the eval-mode forward timing')
  parser.add_argument('--gemm-size', type=int, default=0,
                      help='n of the n×n peak-rate GEMM (default: 2048 on CPU, 8192 on GPU/TPU)')
  parser.add_argument('--compare-torch', action='store_true')
  parser.add_argument('--torch-variants', default='f32',
                      help='comma list of f32 (NCDHW), cl (channels_last_3d f32), bf16 (autocast); '
                           'ratios are against the first')
  parser.add_argument('--memory', action='store_true',
                      help='peak-memory table of the SSL step per batch and option (see scripts/bench_memory.py)')
  parser.add_argument('--memory-batches', default='64,128,256,392,512,784', help='global batches in clips')
  parser.add_argument('--memory-options', default='none,remat,microbatch,remat+microbatch')
  parser.add_argument('--microbatch', type=int, default=8, help='--memory: pairs per chunk (= bn_group_size)')
  parser.add_argument('--time-batch', type=int, default=16, help='--memory: clips of the timed steps (0 = none)')
  parser.add_argument('--time-microbatch', type=int, default=2, help='--memory: pairs per chunk when timing')
  args = parser.parse_args(argv)
  if args.memory:
    # A sibling module whether this file runs as a script or is imported as scripts.bench_train.
    bench_memory = importlib.import_module(f'{__package__}.bench_memory' if __package__ else 'bench_memory')
    print(f'jax {jax.__version__} backend={jax.default_backend()} devices={len(jax.devices())} '
          f'device={getattr(jax.devices()[0], "device_kind", "?")} load_avg={os.getloadavg()[0]:.1f}')
    return bench_memory.run(args, alternating_medians)
  shapes, impls, dtypes = _split(args.shapes), _split(args.conv_impl), _split(args.dtype)
  torch_variants = _split(args.torch_variants)
  for value, allowed, flag in ((shapes, SHAPES, '--shapes'), (impls, ('auto', 'xla', 'gemm'), '--conv-impl'),
                               (dtypes, ('float32', 'bfloat16'), '--dtype'),
                               (torch_variants, TORCH_VARIANTS, '--torch-variants')):
    bad = [v for v in value if v not in allowed]
    if bad or not value:
      parser.error(f'{flag}: unknown {bad or value!r}; choose from {sorted(allowed)}')

  threads = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  torch = None
  if args.compare_torch:
    try:
      import torch
      torch.set_num_threads(threads)
    except ImportError:
      print('torch is not installed: skipping --compare-torch (pip install torch to enable it)')
  print(f'jax {jax.__version__} backend={jax.default_backend()} devices={len(jax.devices())} '
        f'cpus={threads} remat={args.remat} load_avg={os.getloadavg()[0]:.1f}' +
        (f' | torch {torch.__version__} threads={torch.get_num_threads()}' if torch else ''))
  gemm_size = args.gemm_size or default_gemm_size()
  gemms = {dtype: make_jax_gemm(dtype, gemm_size) for dtype in dtypes}  # one peak per compute dtype
  device = jax.devices()[0]
  print(f'device: {getattr(device, "device_kind", device.platform)} ({device.platform})')
  first = first_mfu = None
  for name in shapes:
    frames, size = SHAPES[name]
    batch = args.ssl_batch if name == 'ssl' else args.finetune_batch
    macs = r3d_macs_per_clip(frames, size, 64, args.in_channels)
    train, forward, compiles, dtype_of = {}, {}, [], {}
    for impl, dtype in itertools.product(impls, dtypes):
      label = f'jax[{resolve_conv_impl(impl)},{dtype}]'
      dtype_of[label] = dtype
      train[label], forward[label], seconds = make_jax_step(impl, dtype, args.remat, args.in_channels,
                                                             batch, frames, size)
      compiles.append(f'{label} {seconds:.1f} s')
    if torch:
      for variant in torch_variants:
        label = f'torch[{variant}]'
        dtype_of[label] = 'bfloat16' if variant == 'bf16' else 'float32'
        train[label], forward[label] = make_torch_step(torch, variant, args.in_channels, batch, frames, size)
    fns = {f'{k}.train': f for k, f in train.items()}
    if not args.no_forward:
      fns.update({f'{k}.forward': f for k, f in forward.items()})
    fns.update({f'gemm[{dtype}]': fn for dtype, (fn, _) in gemms.items()})
    med = dict(zip(fns, alternating_medians(list(fns.values()), args.repeats, args.gap)))
    peaks = {dtype: flops / med.pop(f'gemm[{dtype}]') / 1e9 for dtype, (_, flops) in gemms.items()}
    print(f'[{name}] {frames}x{size}² batch {batch}: {macs / 1e9:.2f} GMAC/clip forward (train = 3×); '
          f'{args.repeats} alternating repeats; compile: {", ".join(compiles)}')
    for dtype, peak in peaks.items():
      print(f'  jax {dtype} GEMM peak ({gemm_size}², same alternation): {peak:.0f} GFLOP/s')
    mfu = {}
    for label, sec in med.items():
      flops = 2 * macs * batch * (3 if label.endswith('train') else 1)
      gf = flops / sec / 1e9
      # MFU: analytic FLOPs over the GEMM rate measured for the variant's compute dtype.
      dtype = dtype_of[label.rsplit('.', 1)[0]]
      mfu[label] = gf / peaks[dtype] if dtype in peaks else float('nan')
      ref = f'{mfu[label]:.0%} of jax {dtype} GEMM peak' if dtype in peaks else 'no GEMM peak of its dtype'
      print(f'  {label:26s} median {sec:7.3f} s  {batch / sec:8.2f} clips/s  {gf:8.0f} GFLOP/s ({ref})')
    jax_labels = [k for k in train if k.startswith('jax')]
    if first_mfu is None:
      first_mfu = mfu[jax_labels[0] + '.train']
    if torch:
      ref = f'torch[{torch_variants[0]}]'
      for label in jax_labels:
        parts = [f'train {med[label + ".train"] / med[ref + ".train"]:.2f}']
        if not args.no_forward:
          parts.append(f'forward {med[label + ".forward"] / med[ref + ".forward"]:.2f}')
        print(f'  {label} / {ref}: ' + ', '.join(parts))
      if first is None:
        first = ('train_step_time_ratio_vs_torch', med[jax_labels[0] + '.train'] / med[ref + '.train'])
    elif first is None:
      first = ('train_clips_per_s', batch / med[jax_labels[0] + '.train'])
    sys.stdout.flush()
  print(f'train_mfu={first_mfu:.4f}')
  print(f'{first[0]}={first[1]:.4f}')


if __name__ == '__main__':
  main()
