"""3D convolution with a selectable implementation (`conv_impl`), shared by every encoder.

`xla` is `lax.conv_general_dilated`. `gemm` (the CPU fast path) computes the conv and both of its gradients
(custom VJP) as strided slicing + matmuls, chunked over the output, because XLA:CPU runs the backward of
convolutions (lhs/rhs-dilated convs) 10-100x slower than a matmul of the same FLOPs; it equals XLA's conv to
rounding. `auto` picks XLA's conv on GPU/TPU and the GEMM path on CPU. Measurements: notes/perf_findings.md.
"""
from __future__ import annotations

import functools
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CONV_IMPLS = ('auto', 'xla', 'gemm')
_DIMS = ('NDHWC', 'DHWIO', 'NDHWC')


def resolve_conv_impl(impl: str) -> str:
  """'auto' → XLA's own conv on GPU/TPU, the GEMM path on CPU."""
  if impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {impl!r}')
  if impl == 'auto':
    return 'xla' if jax.default_backend() in ('gpu', 'tpu', 'cuda', 'rocm') else 'gemm'
  return impl


def conv3d(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Sequence[int],
           impl: str = 'xla') -> jax.Array:
  """x (B,T,H,W,Cin) ⊛ kernel (kt,kh,kw,Cin,Cout), symmetric zero padding per spatial dim (torch style)."""
  impl = resolve_conv_impl(impl)
  strides, padding = tuple(int(s) for s in strides), tuple(int(p) for p in padding)
  if x.ndim != 5 or kernel.ndim != 5 or len(strides) != 3 or len(padding) != 3:
    raise ValueError(f'conv3d wants x (B,T,H,W,C), kernel (kt,kh,kw,Cin,Cout), 3 strides and 3 paddings; '
                     f'got x {x.shape}, kernel {kernel.shape}, strides {strides}, padding {padding}')
  if x.shape[-1] != kernel.shape[3]:
    raise ValueError(f'conv3d: input has {x.shape[-1]} channels, kernel expects {kernel.shape[3]}')
  kernel = kernel.astype(x.dtype)
  if impl == 'gemm':
    return conv3d_gemm(x, kernel, strides, padding)
  return lax.conv_general_dilated(x, kernel, window_strides=strides, padding=[(p, p) for p in padding],
                                  dimension_numbers=_DIMS)


# ----------------------------------------------------------------------------------------------------------
# GEMM path. Every product is a gather of shifted (strided) windows + a matmul, chunked over the output so
# the patch matrix stays cache-sized and no step allocates a huge fresh temporary. Two engines:
#  * im2col (any stride): patches over all taps, one dot with K = taps·C.
#  * temporal fold (temporal stride 1, i.e. ~90% of R3D-18's FLOPs): patches over the spatial taps only,
#    Q = P @ [W_t0 | W_t1 | W_t2], and out[t] = Σ_j Q[t + d_j][block j]: the temporal taps move to the
#    output side, so each frame's patches are built once instead of once per temporal tap (3× fewer bytes).
# A tap whose windows lie entirely in the zero padding (e.g. temporal taps once T = 1) is dropped: it only
# ever multiplies zeros, so values are unchanged and its kernel gradient is exactly zero.

# Patch bytes per chunk: large enough for a GEMM at full speed, small enough to stay cache-resident
# (unchunked im2col wrote a 1.4 GB patch matrix per layer-1 conv and ran 3.7x slower; 1-16 MiB all similar).
_CHUNK_BYTES = 4 << 20


def _out_size(n: int, k: int, s: int, p: int) -> int:
  return (n + 2 * p - k) // s + 1


def _live_taps(n: int, k: int, s: int, p: int) -> list[int]:
  """Kernel offsets along one dim that touch at least one real (unpadded) input element."""
  return [j for j in range(k) if any(0 <= i * s + j - p < n for i in range(_out_size(n, k, s, p)))]


def _largest_divisor(n: int, cap: int) -> int:
  return max(d for d in range(1, n + 1) if n % d == 0 and d <= max(cap, 1))


def _pad(x, lo, hi):
  if not any(lo) and not any(hi):
    return x
  return lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] + [(l, h, 0) for l, h in zip(lo, hi)] + [(0, 0, 0)])


def _acc_dtype(dtype):
  # Every dot accumulates (and returns) at least float32: for bfloat16 operands that is also what lets
  # XLA:CPU use its native bf16 GEMM kernels (a bf16-output dot runs as a float32 dot).
  return jnp.promote_types(dtype, jnp.float32)


def _patches(src, corner, chunk, starts, strides):
  """im2col of one chunk: (bb,tb,hb,wo, taps·C) windows of `src` for the outputs starting at `corner`."""
  base = [min(s) for s in starts]
  extent = [(n - 1) * st + max(s) - b + 1 for n, st, s, b in zip(chunk[1:], strides, starts, base)]
  b0, t0, h0 = corner
  window = lax.dynamic_slice(src, (b0, t0 * strides[0] + base[0], h0 * strides[1] + base[1], base[2], 0),
                             (chunk[0], *extent, src.shape[-1]))
  cols = []
  for origin in itertools.product(*starts):
    rel = [o - b for o, b in zip(origin, base)]
    limit = [r + (n - 1) * st + 1 for r, n, st in zip(rel, chunk[1:], strides)]
    cols.append(lax.slice(window, (0, *rel, 0), (chunk[0], *limit, src.shape[-1]), (1, *strides, 1)))
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _chunks(batch, frames, height, width, row_bytes):
  """Chunk (batch items, frames, rows) of the output so one chunk's patches fit _CHUNK_BYTES.

  Only the outermost split dim is partial, so chunks in loop order tile the output contiguously.
  """
  rows = max(1, _CHUNK_BYTES // row_bytes)
  frame, clip = height * width, frames * height * width
  if rows >= clip:
    return _largest_divisor(batch, rows // clip), frames, height
  if rows >= frame:
    return 1, _largest_divisor(frames, rows // frame), height
  return 1, 1, _largest_divisor(height, rows // width)


def _corner(i, counts, chunk):
  """Output corner (batch, frame, row) of chunk number i; chunks run batch-major, rows fastest."""
  return (i // (counts[1] * counts[2]) * chunk[0], i // counts[2] % counts[1] * chunk[1],
          i % counts[2] * chunk[2])


def _loop(out_shape, chunk, compute, dtype):
  """Assemble `compute(corner)` (one chunk of the output) over every chunk: one call, or a scan."""
  counts = [n // c for n, c in zip(out_shape[:3], chunk)]
  if counts == [1, 1, 1]:
    return compute((0, 0, 0))
  def body(out, i):
    c = _corner(i, counts, chunk)
    return lax.dynamic_update_slice(out, compute(c), (*c, 0, 0)), None
  out, _ = lax.scan(body, jnp.zeros(out_shape, dtype), jnp.arange(counts[0] * counts[1] * counts[2]))
  return out


def _accumulate(count_shape, chunk, compute, acc_shape, dtype):
  """Σ over chunks of compute(corner), as a scan with an accumulator (one call if a single chunk)."""
  counts = [n // c for n, c in zip(count_shape, chunk)]
  if counts == [1, 1, 1]:
    return compute((0, 0, 0))
  def body(acc, i):
    return acc + compute(_corner(i, counts, chunk)), None
  acc, _ = lax.scan(body, jnp.zeros(acc_shape, dtype), jnp.arange(counts[0] * counts[1] * counts[2]))
  return acc


def _select_taps(kernel, taps):
  """kernel restricted to the given tap offsets per dim: strided slices (one gather-free copy at most)."""
  for axis, js in enumerate(taps):
    step = js[1] - js[0] if len(js) > 1 else 1
    if js == list(range(js[0], js[-1] + 1, step)):
      kernel = lax.slice_in_dim(kernel, js[0], js[-1] + 1, step, axis)
    else:
      kernel = jnp.concatenate([lax.slice_in_dim(kernel, j, j + 1, 1, axis) for j in js], axis)
  return kernel


def _tap_matrix(kernel, taps):
  """im2col weights: (taps·Cin, Cout) with rows in tap-grid C-order, then input channel."""
  k = _select_taps(kernel, taps)
  return k.reshape(-1, k.shape[-1])


def _fold_matrix(kernel, taps, transposed=False):
  """Temporal-fold weights (hw·Cin, t·Cout): rows (spatial tap, Cin), one column block per temporal tap.

  transposed: the weights of the transposed conv (dL/dx), i.e. the roles of Cin and Cout swapped.
  """
  k = _select_taps(kernel, taps)
  k = k.transpose(1, 2, 4, 0, 3) if transposed else k.transpose(1, 2, 3, 0, 4)
  return k.reshape(k.shape[0] * k.shape[1] * k.shape[2], k.shape[3] * k.shape[4])


# ------------------------------------------------------------------------------------------ engines
def _im2col_matmul(src, starts, out_sizes, strides, wmat):
  """out[b,t,h,w] = Σ_taps src[b, t·st + ot, h·sh + oh, w·sw + ow] @ W_tap; src padded, origins `starts`."""
  batch, isz = src.shape[0], src.dtype.itemsize
  chunk = _chunks(batch, *out_sizes, wmat.shape[0] * isz)
  def compute(corner):
    p = _patches(src, corner, (*chunk, out_sizes[2]), starts, strides)
    return lax.dot_general(p, wmat, (((4,), (0,)), ((), ())),
                           preferred_element_type=_acc_dtype(src.dtype)).astype(src.dtype)
  return _loop((batch, *out_sizes, wmat.shape[1]), chunk, compute, src.dtype)


def _matmul_tn(a, b, acc):
  """a^T @ b over all leading dims, as a transpose of the small operand `a` + a plain NN matmul.

  The barrier keeps XLA from folding the transpose back into the dot: XLA:CPU's fast (YNNPACK) GEMM only
  takes NN dots, and its fallback DotThunk cannot run bf16 x bf16 -> f32 at all.
  """
  a_t = lax.optimization_barrier(a.reshape(-1, a.shape[-1]).T)
  return lax.dot_general(a_t, b.reshape(-1, b.shape[-1]), (((1,), (0,)), ((), ())), preferred_element_type=acc)


def _im2col_matmul_t(src, starts, strides, dy):
  """Σ_{b,positions} patches^T ⊗ dy as (N, taps·C): dy^T @ patches is a plain NN GEMM per chunk (the
  patches^T @ dy form made XLA transpose every patch matrix first)."""
  batch, out_sizes, n = dy.shape[0], dy.shape[1:4], dy.shape[-1]
  k = len(list(itertools.product(*starts))) * src.shape[-1]
  chunk = _chunks(batch, *out_sizes, k * src.dtype.itemsize)
  acc = _acc_dtype(dy.dtype)
  def compute(corner):
    g = lax.dynamic_slice(dy, (*corner, 0, 0), (*chunk, out_sizes[2], n))
    p = _patches(src, corner, (*chunk, out_sizes[2]), starts, strides)
    return _matmul_tn(g, p, acc)
  return _accumulate((batch, *out_sizes[:2]), chunk, compute, (n, k), acc)


def _frame_chunks(batch, frames, height, width, row_bytes):
  """(batch items, rows) per temporal-fold chunk; a chunk always holds every frame."""
  bb, _, hb = _chunks(batch, 1, height, width, row_bytes * frames)
  return bb, frames, hb


def _shift_frames(q, offsets, frames, n):
  """Σ_j q[:, t + d_j, ..., block j] for t < frames, zero where t + d_j falls outside q's frames."""
  lo, hi = max(0, -min(offsets)), max(0, max(offsets) + frames - q.shape[1])
  q = _pad(q, (lo, 0, 0), (hi, 0, 0))
  terms = [q[:, d + lo:d + lo + frames, ..., j * n:(j + 1) * n] for j, d in enumerate(offsets)]
  return functools.reduce(jnp.add, terms)


def _tfold_matmul(src, offsets, starts_hw, out_sizes, strides_hw, wq):
  """out[b,t] = Σ_j (P[b, t + d_j] @ W_j): src padded in H,W only (frames outside it count as zero)."""
  batch, frames = src.shape[:2]
  n = wq.shape[1] // len(offsets)
  bb, _, hb = _frame_chunks(batch, frames, *out_sizes[1:], wq.shape[0] * src.dtype.itemsize)
  acc = _acc_dtype(src.dtype)
  def compute(corner):
    p = _patches(src, (corner[0], 0, corner[2]), (bb, frames, hb, out_sizes[2]), [[0], *starts_hw],
                 (1, *strides_hw))
    q = lax.dot_general(p, wq, (((4,), (0,)), ((), ())), preferred_element_type=acc)
    return _shift_frames(q, offsets, out_sizes[0], n).astype(src.dtype)
  return _loop((batch, *out_sizes, n), (bb, out_sizes[0], hb), compute, src.dtype)


def _tfold_matmul_t(src, offsets, starts_hw, strides_hw, dy):
  """Kernel gradient of _tfold_matmul as (t·N, hw·C): Σ dy3^T @ P with dy3[f, block j] = dy[f - d_j]."""
  batch, frames = src.shape[:2]
  out_frames, ho, wo, n = dy.shape[1:]
  k = len(starts_hw[0]) * len(starts_hw[1]) * src.shape[-1]
  bb, _, hb = _frame_chunks(batch, frames, ho, wo, k * src.dtype.itemsize)
  acc = _acc_dtype(dy.dtype)
  lo, hi = max(0, max(offsets)), max(0, frames - min(offsets) - out_frames)
  def compute(corner):
    p = _patches(src, (corner[0], 0, corner[2]), (bb, frames, hb, wo), [[0], *starts_hw], (1, *strides_hw))
    g = lax.dynamic_slice(dy, (corner[0], 0, corner[2], 0, 0), (bb, out_frames, hb, wo, n))
    g = _pad(g, (lo, 0, 0), (hi, 0, 0))  # per chunk: stays in cache, unlike padding all of dy
    g3 = jnp.concatenate([g[:, lo - d:lo - d + frames] for d in offsets], axis=-1)
    return _matmul_tn(g3, p, acc)
  return _accumulate((batch, 1, ho), (bb, 1, hb), compute, (len(offsets) * n, k), acc)


# ------------------------------------------------------------------------------------------ conv + VJP
def _plan(in_sizes, ksize, strides, padding):
  """Output sizes, live taps per dim, and the (lo, hi) padding the live taps need (≤ the conv's)."""
  out_sizes = [_out_size(n, k, s, p) for n, k, s, p in zip(in_sizes, ksize, strides, padding)]
  live = [_live_taps(n, k, s, p) for n, k, s, p in zip(in_sizes, ksize, strides, padding)]
  lo = [max(0, p - min(js)) for p, js in zip(padding, live)]
  hi = [max(0, max(js) - p + (o - 1) * s + 1 - n)
        for p, js, o, s, n in zip(padding, live, out_sizes, strides, in_sizes)]
  return out_sizes, live, lo, hi


def _conv_forward(x, kernel, strides, padding):
  out_sizes, live, lo, hi = _plan(x.shape[1:4], kernel.shape[:3], strides, padding)
  if strides[0] == 1:
    starts_hw = [[j - p + l for j in js] for js, p, l in zip(live[1:], padding[1:], lo[1:])]
    return _tfold_matmul(_pad(x, (0, *lo[1:]), (0, *hi[1:])), [j - padding[0] for j in live[0]], starts_hw,
                         out_sizes, strides[1:], _fold_matrix(kernel, live))
  starts = [[j - p + l for j in js] for js, p, l in zip(live, padding, lo)]
  return _im2col_matmul(_pad(x, lo, hi), starts, out_sizes, strides, _tap_matrix(kernel, live))


def _conv_dkernel(x, dy, kernel_shape, strides, padding):
  """dL/dkernel = Σ patches(x)^T dy over batch and output positions; zero for dropped taps."""
  out_sizes, live, lo, hi = _plan(x.shape[1:4], kernel_shape[:3], strides, padding)
  cin, cout = kernel_shape[3:]
  counts = [len(js) for js in live]
  if strides[0] == 1:
    starts_hw = [[j - p + l for j in js] for js, p, l in zip(live[1:], padding[1:], lo[1:])]
    g = _tfold_matmul_t(_pad(x, (0, *lo[1:]), (0, *hi[1:])), [j - padding[0] for j in live[0]], starts_hw,
                        strides[1:], dy)
    dw = g.reshape(counts[0], cout, counts[1], counts[2], cin).transpose(0, 2, 3, 4, 1)
  else:
    starts = [[j - p + l for j in js] for js, p, l in zip(live, padding, lo)]
    g = _im2col_matmul_t(_pad(x, lo, hi), starts, strides, dy)
    dw = g.T.reshape(*counts, cin, cout)
  if counts == list(kernel_shape[:3]):
    return dw
  return jnp.zeros(kernel_shape, dw.dtype).at[np.ix_(*live)].set(dw)


def _conv_dinput(dy, kernel, in_sizes, strides, padding):
  """dL/dx as stride-1 correlations of dy, one per residue class of x modulo the stride.

  x[m·s + r] receives dy[i] @ W[j]^T for every tap j with i·s + j - p = m·s + r, i.e. j ≡ r + p (mod s) and
  i = m + (r + p - j)/s: a stride-1 correlation of dy for each r — no dilated conv, no zero-stuffing.
  """
  batch, cin = dy.shape[0], kernel.shape[3]
  out_sizes = dy.shape[1:4]
  per_dim = []  # per dim, per residue r: (taps j, dy offsets c_j, class length)
  for n, k, s, p, o in zip(in_sizes, kernel.shape[:3], strides, padding, out_sizes):
    classes = []
    for r in range(s):
      length = -(-(n - r) // s)
      pairs = [(j, (r + p - j) // s) for j in range(k) if (j - r - p) % s == 0]
      pairs = [(j, c) for j, c in pairs if any(0 <= m + c < o for m in range(length))]
      classes.append(([j for j, _ in pairs], [c for _, c in pairs], length))
    per_dim.append(classes)
  # dy is padded in H and W only: frames outside dy count as zero inside the temporal fold.
  lo = [0] + [max([0] + [-c for _, cs, _ in cl for c in cs]) for cl in per_dim[1:]]
  hi = [0] + [max([0] + [ln - 1 + c - (o - 1) for _, cs, ln in cl for c in cs])
              for cl, o in zip(per_dim[1:], out_sizes[1:])]
  dyp = _pad(dy, lo, hi)
  blocks = {}
  for r in itertools.product(*[range(s) for s in strides]):
    cls = [per_dim[d][r[d]] for d in range(3)]
    lengths = [c[2] for c in cls]
    if any(not c[0] for c in cls) or min(lengths) <= 0:
      blocks[r] = jnp.zeros((batch, *[max(ln, 0) for ln in lengths], cin), dy.dtype)
      continue
    starts_hw = [[c + l for c in cl[1]] for cl, l in zip(cls[1:], lo[1:])]
    blocks[r] = _tfold_matmul(dyp, cls[0][1], starts_hw, lengths, (1, 1),
                              _fold_matrix(kernel, [c[0] for c in cls], transposed=True))
  if all(s == 1 for s in strides):
    return blocks[(0, 0, 0)]
  # Interleave the residue classes: pad each to the longest class, stack as a trailing stride axis.
  full = [-(-n // s) for n, s in zip(in_sizes, strides)]
  def build(prefix):
    d = len(prefix)
    if d == 3:
      b = blocks[prefix]
      return _pad(b, [0, 0, 0], [f - b.shape[i + 1] for i, f in enumerate(full)])
    parts = [build(prefix + (r,)) for r in range(strides[d])]
    if strides[d] == 1:
      return parts[0]
    stacked = jnp.stack(parts, axis=d + 2)
    shape = stacked.shape
    return stacked.reshape(*shape[:d + 1], shape[d + 1] * shape[d + 2], *shape[d + 3:])
  return build(())[:, :in_sizes[0], :in_sizes[1], :in_sizes[2]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_gemm(x, kernel, strides, padding):
  return _conv_forward(x, kernel, strides, padding)


def _conv_gemm_fwd(x, kernel, strides, padding):
  return _conv_forward(x, kernel, strides, padding), (x, kernel)


def _conv_gemm_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  # The barrier keeps XLA from specialising the GEMMs on a constant cotangent (e.g. d sum(y)): the
  # simplified dots are no longer plain NN GEMMs, and XLA:CPU's fallback cannot run bf16 x bf16 -> f32.
  dy = lax.optimization_barrier(dy)
  dx = _conv_dinput(dy, kernel, x.shape[1:4], strides, padding).astype(x.dtype)
  dk = _conv_dkernel(x, dy, kernel.shape, strides, padding).astype(kernel.dtype)
  return dx, dk


_conv_gemm.defvjp(_conv_gemm_fwd, _conv_gemm_bwd)


def conv3d_gemm(x, kernel, strides, padding):
  """GEMM-path conv3d (same arguments): value, dx and dkernel are all chunked gather-matmuls."""
  return _conv_gemm(x, kernel.astype(x.dtype), tuple(strides), tuple(padding))
