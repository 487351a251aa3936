"""Memory model of the SSL train step (`bench_train.py --memory`): XLA's memory analysis of the compiled
step — R3D-18, 4×112² grayscale pairs, the echoclr config's heads (projection + frame order), Adam, donated
state — per global batch and option (none | remat | microbatch | remat+microbatch), compiled from shapes
only (nothing is allocated, so batches far beyond this machine's memory can be measured), then the
step-time cost of each option measured side by side (alternating) on a small batch.
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from echojax.core import optim, steps
from echojax.models import factory

OPTIONS = ('none', 'remat', 'microbatch', 'remat+microbatch')
GIB = 2.0 ** 30
CARDS_GIB = (24, 40, 80)
# Share of a card XLA may plan for: cuDNN workspaces, fragmentation and the CUDA context need the rest.
# (JAX preallocates 75 % by default: set XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 to use this much.)
USABLE = 0.9


def ssl_step(option: str, pairs: int, dtype: str, conv_impl: str, microbatch: int):
  """(jitted step, init() -> real state, abstract batch) of the echoclr SSL step for one option."""
  from configs import ssl as ssl_config  # the paper's model/optimiser blocks, not a copy of them
  cfg = ssl_config.get_config('echoclr')
  remat = option.startswith('remat')
  chunk = microbatch if option.endswith('microbatch') else 0
  model_cfg = dict(cfg.model.to_dict(), dtype=dtype, conv_impl=conv_impl, remat=remat, bn_group_size=chunk)
  model = factory.ssl_model(**model_cfg, num_order_classes=math.factorial(cfg.data.clip_len))
  tx = optim.make_optimizer(cfg.optim, total_steps=1000, global_batch_size=pairs)
  view = (cfg.data.clip_len, cfg.data.image_size, cfg.data.image_size, 1)
  init = lambda: steps.create_train_state(model, tx, jax.random.key(0), jnp.zeros((2, 2) + view))
  batch = {'views': jax.ShapeDtypeStruct((pairs, 2) + view, jnp.float32),
           'order_label': jax.ShapeDtypeStruct((pairs, 2), jnp.int32)}
  step = steps.make_ssl_train_step(model, tx, temperature=cfg.ssl.temperature, order_weight=cfg.ssl.order_weight,
                                   compute_dtype=factory.resolve_dtype(dtype), microbatch_size=chunk)
  return jax.jit(step, donate_argnums=(0,)), init, batch


def peak_bytes(stats) -> int:
  """What XLA reserves for the step: arguments + outputs + the temporary block (sized by its heap
  simulation's peak), donated buffers counted once. (XLA:CPU's own peak_memory_in_bytes leaves the
  temporaries out, so it is only used where it is the larger figure.)"""
  planned = (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
             - stats.alias_size_in_bytes)
  return int(max(planned, getattr(stats, 'peak_memory_in_bytes', 0)))


def measure(option, clips, dtype, conv_impl, microbatch):
  step, init, batch = ssl_step(option, clips // 2, dtype, conv_impl, microbatch)
  start = time.perf_counter()
  stats = step.lower(jax.eval_shape(init), batch, jax.random.key(0)).compile().memory_analysis()
  return {'option': option, 'clips': clips, 'peak': peak_bytes(stats), 'temp': stats.temp_size_in_bytes,
          'args': stats.argument_size_in_bytes, 'compile_s': time.perf_counter() - start}


def largest_batch(rows, capacity_bytes):
  """Largest global batch (clips) under capacity from one option's measured points: linear between the two
  measured points bracketing it; beyond the last, extrapolated by a least-squares quadratic over all points
  (the NT-Xent similarity matrix grows as the square of the batch) or, with two points, their line."""
  pts = sorted((r['clips'], r['peak']) for r in rows)
  if pts[0][1] > capacity_bytes:
    return f'< {pts[0][0]}'
  for (b0, p0), (b1, p1) in zip(pts, pts[1:]):
    if p1 > capacity_bytes:
      return f'{int(b0 + (capacity_bytes - p0) * (b1 - b0) / (p1 - p0))}'
  clips, peaks = np.array(pts, np.float64).T
  c, b, a = np.polyfit(clips, peaks, 2) if len(pts) >= 3 else (0.0, *np.polyfit(clips, peaks, 1))
  if c * clips[-1] ** 2 < 1e-3 * peaks[-1]:  # no measurable curvature: the line through the last two
    c, b = 0.0, (peaks[-1] - peaks[-2]) / (clips[-1] - clips[-2])
    a = peaks[-1] - b * clips[-1]
  if b <= 0 and c <= 0:
    return f'> {int(clips[-1])}'
  roots = np.roots([c, b, a - capacity_bytes]) if c else [(capacity_bytes - a) / b]
  best = max(float(np.real(r)) for r in roots if abs(np.imag(r)) < 1e-9)
  return f'≈ {int(best):,} (extrapolated)'


def time_options(options, clips, dtype, microbatch, repeats, gap, alternating_medians):
  """Median step seconds per option on real data (CPU: conv_impl auto → the GEMM path), alternating."""
  fns = []
  rng = np.random.default_rng(0)
  for option in options:
    step, init, shapes = ssl_step(option, clips // 2, dtype, 'auto', microbatch)
    batch = {'views': jnp.asarray(rng.uniform(size=shapes['views'].shape), jnp.float32),
             'order_label': jnp.asarray(rng.integers(0, 24, size=shapes['order_label'].shape), jnp.int32)}
    holder = {'state': jax.jit(init)()}

    def run_step(step=step, holder=holder, batch=batch):
      holder['state'], metrics = step(holder['state'], batch, jax.random.key(1))
      metrics['loss'].block_until_ready()
    fns.append(run_step)
  return dict(zip(options, alternating_medians(fns, repeats, gap)))


def run(args, alternating_medians) -> None:
  """The --memory table, then (args.time_batch > 0) the step-time cost of each option."""
  batches = [int(b) for b in args.memory_batches.split(',') if b.strip()]
  options = [o.strip() for o in args.memory_options.split(',') if o.strip()]
  bad = [o for o in options if o not in OPTIONS] + [b for b in batches if b % 2 or b <= 0]
  if bad:
    raise SystemExit(f'--memory: bad options/batches {bad}; options: {OPTIONS}; batches: even clip counts')
  dtype = args.dtype.split(',')[0]
  print(f'[memory] SSL step (echoclr config: R3D-18, 4x112² x1, projection + frame order, Adam, donated), '
        f'compute {dtype}, conv_impl=xla (the GPU/TPU path), microbatch {args.microbatch} pairs with '
        f'bn_group_size={args.microbatch}; XLA {jax.default_backend()} memory analysis, 1 device')
  rows = []
  for option in options:
    for clips in batches:
      if option.endswith('microbatch') and (clips // 2) % args.microbatch:
        continue
      row = measure(option, clips, dtype, 'xla', args.microbatch)
      rows.append(row)
      print(f'  {option:17s} batch {clips:5d} clips: peak {row["peak"] / GIB:7.2f} GiB (temp '
            f'{row["temp"] / GIB:6.2f}, args {row["args"] / GIB:5.2f}); compile {row["compile_s"]:.0f} s',
            flush=True)
  print(f'  largest global batch (clips) within {USABLE:.0%} of the card (linear between measured points):')
  print('  | option | ' + ' | '.join(f'{c} GiB' for c in CARDS_GIB) + ' |')
  for option in options:
    mine = [r for r in rows if r['option'] == option]
    if len(mine) >= 2:
      cells = [largest_batch(mine, USABLE * c * GIB) for c in CARDS_GIB]
      print(f'  | {option} | ' + ' | '.join(cells) + ' |')
  if args.time_batch > 0:
    medians = time_options(options, args.time_batch, dtype, args.time_microbatch, args.repeats, args.gap,
                           alternating_medians)
    base = medians.get('none')
    print(f'[memory] step time, batch {args.time_batch} clips (microbatch {args.time_microbatch} pairs), '
          f'{args.repeats} alternating repeats, conv_impl=auto:')
    for option, sec in medians.items():
      ratio = f' ({sec / base:.2f}× none)' if base else ''
      print(f'  {option:17s} median {sec:7.3f} s{ratio}')
