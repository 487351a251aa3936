"""Micro-benchmark of every R3D-18 conv shape: XLA's conv vs the GEMM path (vs torch if installed).

Times forward and forward+backward (value and VJP; the stem only needs dkernel) with A/B alternation in one
process and prints medians, GFLOP/s and ratios. Example:
  python scripts/bench_conv.py --batch 16 --frames 4 --repeats 5
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from echojax.models.conv import conv3d  # noqa: E402
from bench_train import r3d_convs  # noqa: E402  (scripts/ is on sys.path when run as a script)


def r3d18_convs(frames: int, size: int, width: int = 64, in_channels: int = 3):
  """(name, input shape without batch, kernel, stride, padding, cout) of each distinct R3D-18 conv."""
  seen, distinct = set(), []
  for name, shape, k, s, p, cout in r3d_convs(frames, size, width, in_channels):
    if (shape, k, s, p, cout) not in seen:
      seen.add((shape, k, s, p, cout))
      distinct.append((name, shape, k, s, p, cout))
  return distinct


def median_alternating(fns, repeats):
  for f in fns:
    f()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for i, f in enumerate(fns):
      start = time.perf_counter()
      f()
      times[i].append(time.perf_counter() - start)
  return [float(np.median(t)) for t in times]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--frames', type=int, default=4)
  parser.add_argument('--size', type=int, default=112)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--only', default='', help='comma-separated conv names to run')
  parser.add_argument('--no-torch', action='store_true')
  parser.add_argument('--no-xla', action='store_true', help='skip XLA conv (slow strided backward)')
  args = parser.parse_args(argv)
  try:
    if args.no_torch:
      raise ImportError
    import torch
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    print(f'torch {torch.__version__}, {threads} threads')
  except ImportError:
    torch = None
    print('torch not used')
  rng = np.random.default_rng(0)
  for name, shape, k, s, p, cout in r3d18_convs(args.frames, args.size):
    if args.only and name not in args.only.split(','):
      continue
    x_np = rng.standard_normal((args.batch, *shape), np.float32)
    w_np = rng.standard_normal((*k, shape[-1], cout), np.float32) * 0.05
    x, w = jnp.asarray(x_np), jnp.asarray(w_np)
    wrt = (1,) if name == 'stem' else (0, 1)
    fns, labels = [], []
    impls = ['gemm'] + ([] if args.no_xla else ['xla'])
    y_shape = None
    for impl in impls:
      fwd = jax.jit(lambda x, w, impl=impl: conv3d(x, w, s, p, impl))
      y_shape = jax.eval_shape(fwd, x, w).shape
      g = jnp.asarray(rng.standard_normal(y_shape, np.float32))
      grad = jax.jit(jax.grad(lambda x, w, g, impl=impl: jnp.vdot(conv3d(x, w, s, p, impl), g), wrt))
      fns += [lambda f=fwd: jax.block_until_ready(f(x, w)),
              lambda f=grad, g=g: jax.block_until_ready(f(x, w, g))]
      labels += [f'{impl}.fwd', f'{impl}.train']
    if torch is not None:
      xt = torch.from_numpy(x_np).permute(0, 4, 1, 2, 3).contiguous()
      wt = torch.from_numpy(w_np).permute(4, 3, 0, 1, 2).contiguous()
      xr = xt.clone().requires_grad_(name != 'stem')
      wr = wt.clone().requires_grad_()
      gt = torch.randn(args.batch, cout, *y_shape[1:4])
      def t_fwd():
        with torch.no_grad():
          torch.nn.functional.conv3d(xt, wt, stride=s, padding=p)
      def t_train():
        torch.nn.functional.conv3d(xr, wr, stride=s, padding=p).backward(gt)
      fns += [t_fwd, t_train]
      labels += ['torch.fwd', 'torch.train']
    times = dict(zip(labels, median_alternating(fns, args.repeats)))
    macs = float(np.prod(y_shape)) * np.prod(k) * shape[-1]
    row = []
    for label, sec in times.items():
      flops = 2 * macs * (1 + len(wrt) if label.endswith('train') else 1)
      row.append(f'{label} {sec * 1e3:7.1f} ms {flops / sec / 1e9:5.0f} GF/s')
    print(f'{name:14s} ' + ' | '.join(row), flush=True)
    if torch is not None:
      print(f'{"":14s} gemm/torch fwd {times["gemm.fwd"] / times["torch.fwd"]:.2f}  '
            f'train {times["gemm.train"] / times["torch.train"]:.2f}', flush=True)


if __name__ == '__main__':
  main()
