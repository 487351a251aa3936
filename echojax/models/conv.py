"""3D convolution with a selectable implementation (`conv_impl`), shared by every encoder.

`xla` is `lax.conv_general_dilated`; `gemm` (the CPU fast path) computes the conv and both of its gradients
as strided slicing + one matmul (im2col), because XLA:CPU runs the backward of convolutions (lhs/rhs-dilated
convs) 10-100x slower than a matmul of the same FLOPs. `auto` picks per backend.
"""
from __future__ import annotations

import functools
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
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
# GEMM path. Every product below is a gather of shifted (strided) windows + one matmul; a tap whose windows
# lie entirely in the zero padding is dropped (e.g. the temporal taps once T has shrunk to 1), which changes
# no value: it only ever multiplies zeros.


def _out_size(n: int, k: int, s: int, p: int) -> int:
  return (n + 2 * p - k) // s + 1


def _live_taps(n: int, k: int, s: int, p: int) -> list[int]:
  """Kernel offsets along one dim that touch at least one real (unpadded) input element."""
  o = _out_size(n, k, s, p)
  return [j for j in range(k) if any(0 <= i * s + j - p < n for i in range(o))]


# Patch bytes per chunk: large enough for an efficient GEMM, small enough to stay cache-resident and to
# avoid one huge freshly-mapped temporary per step (page faults dominated unchunked im2col on CPU).
_CHUNK_BYTES = 4 << 20


def _largest_divisor(n: int, cap: int) -> int:
  return max(d for d in range(1, n + 1) if n % d == 0 and d <= max(cap, 1))


def _chunking(batch: int, out_sizes, row_bytes: int) -> tuple[int, int, int]:
  """Chunk (batch items, output frames, output rows) so a chunk's patch matrix fits _CHUNK_BYTES.

  Only the outermost split dim is partial, so stacking the chunks in loop order is already the output.
  """
  rows = max(1, _CHUNK_BYTES // row_bytes)
  frames, height, width = out_sizes
  frame, clip = height * width, frames * height * width
  if rows >= clip:
    return _largest_divisor(batch, rows // clip), frames, height
  if rows >= frame:
    return 1, _largest_divisor(frames, rows // frame), height
  return 1, 1, _largest_divisor(height, rows // width)


def _patches(src, corner, chunk, starts, strides):
  """im2col of one chunk: (bb,tb,hb,Wo, taps*C) windows of `src` for outputs starting at `corner`."""
  bb, tb, hb, wo = chunk
  base = [min(s) for s in starts]
  extent = [(n - 1) * st + max(s) - b + 1 for n, st, s, b in zip((tb, hb, wo), strides, starts, base)]
  b0, t0, h0 = corner
  window = lax.dynamic_slice(
      src, (b0, t0 * strides[0] + base[0], h0 * strides[1] + base[1], base[2], 0),
      (bb, *extent, src.shape[-1]))
  cols = []
  for origin in itertools.product(*starts):
    rel = [o - b for o, b in zip(origin, base)]
    limit = [r + (n - 1) * st + 1 for r, n, st in zip(rel, (tb, hb, wo), strides)]
    cols.append(lax.slice(window, (0, *rel, 0), (bb, *limit, src.shape[-1]), (1, *strides, 1)))
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _chunk_loop(batch, out_sizes, row_bytes):
  """(chunk shape, number of chunks, index → chunk corner)."""
  bb, tb, hb = _chunking(batch, out_sizes, row_bytes)
  counts = (batch // bb, out_sizes[0] // tb, out_sizes[1] // hb)
  def corner(i):
    return (i // (counts[1] * counts[2]) * bb, i // counts[2] % counts[1] * tb, i % counts[2] * hb)
  return (bb, tb, hb, out_sizes[2]), counts[0] * counts[1] * counts[2], corner


def _gather_matmul(src, starts, out_sizes, strides, wmat):
  """sum over taps of src[:, origin + stride*i] @ wmat[tap]: im2col + one dot, chunked over the output.

  src (B,T',H',W',C) already padded; starts: per-dim lists of window origins (the tap grid is their
  product, C-order, matching wmat's row blocks of C rows); out_sizes/strides per dim.
  """
  batch = src.shape[0]
  chunk, count, corner = _chunk_loop(batch, out_sizes, wmat.shape[0] * src.dtype.itemsize)
  def one(i):
    return lax.dot_general(_patches(src, corner(i), chunk, starts, strides), wmat, (((4,), (0,)), ((), ())))
  if count == 1:
    return one(0)
  out = lax.map(one, jnp.arange(count))
  return out.reshape(batch, *out_sizes, wmat.shape[1])


def _gather_matmul_transposed(src, starts, strides, dy):
  """patches(src)^T @ dy summed over batch and output positions: (taps*C, N), accumulated chunk by chunk."""
  batch, out_sizes, n = dy.shape[0], dy.shape[1:4], dy.shape[-1]
  taps = len(list(itertools.product(*starts)))
  chunk, count, corner = _chunk_loop(batch, out_sizes, taps * src.shape[-1] * src.dtype.itemsize)
  acc_dtype = jnp.promote_types(dy.dtype, jnp.float32)
  def one(i):
    b0, t0, h0 = corner(i)
    g = lax.dynamic_slice(dy, (b0, t0, h0, 0, 0), (*chunk, n))
    # dy^T @ patches contracts dy's small minor dim against the patches' rows (a plain NN GEMM); the
    # patches^T @ dy form made XLA transpose every patch matrix first.
    return lax.dot_general(g, _patches(src, (b0, t0, h0), chunk, starts, strides),
                           (((0, 1, 2, 3), (0, 1, 2, 3)), ((), ())), preferred_element_type=acc_dtype)
  if count == 1:
    return one(0).T
  def body(acc, i):
    return acc + one(i), None
  acc, _ = lax.scan(body, jnp.zeros((n, taps * src.shape[-1]), acc_dtype), jnp.arange(count))
  return acc.T


def _pad(x, lo, hi):
  if not any(lo) and not any(hi):
    return x
  return lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] + [(l, h, 0) for l, h in zip(lo, hi)] + [(0, 0, 0)])


def _forward_plan(in_sizes, ksize, strides, padding):
  out_sizes = [_out_size(n, k, s, p) for n, k, s, p in zip(in_sizes, ksize, strides, padding)]
  live = [_live_taps(n, k, s, p) for n, k, s, p in zip(in_sizes, ksize, strides, padding)]
  # Pad only as far as the live taps reach (a dropped tap may be what needed the padding).
  lo = [max(0, p - min(js)) for p, js in zip(padding, live)]
  hi = [max(0, max(js) - p + (o - 1) * s + 1 - n)
        for p, js, o, s, n in zip(padding, live, out_sizes, strides, in_sizes)]
  starts = [[j - p + l for j in js] for js, p, l in zip(live, padding, lo)]
  return out_sizes, live, lo, hi, starts


def _tap_matrix(kernel, taps):
  """Rows of the im2col weight matrix: kernel[a, b, c] (Cin, Cout) for each tap of the grid, C-order."""
  return jnp.concatenate([kernel[a, b, c] for a, b, c in itertools.product(*taps)], axis=0)


def _conv_forward(x, kernel, strides, padding):
  out_sizes, live, lo, hi, starts = _forward_plan(x.shape[1:4], kernel.shape[:3], strides, padding)
  wmat = _tap_matrix(kernel, live)
  return _gather_matmul(_pad(x, lo, hi), starts, out_sizes, strides, wmat)


def _conv_dkernel(x, dy, kernel_shape, strides, padding):
  """dL/dkernel = patches(x)^T @ dy, contracted over batch and output positions."""
  out_sizes, live, lo, hi, starts = _forward_plan(x.shape[1:4], kernel_shape[:3], strides, padding)
  dw_live = _gather_matmul_transposed(_pad(x, lo, hi), starts, strides, dy)
  cin, cout = kernel_shape[3], kernel_shape[4]
  dw_live = dw_live.reshape(len(live[0]), len(live[1]), len(live[2]), cin, cout)
  if all(len(js) == k for js, k in zip(live, kernel_shape[:3])):
    return dw_live
  # Dropped taps only ever saw padding: their gradient is exactly zero.
  index = {tap: i for i, tap in enumerate(itertools.product(*live))}
  flat = dw_live.reshape(-1, cin, cout)
  zero = jnp.zeros((cin, cout), dw_live.dtype)
  taps = [flat[index[t]] if t in index else zero for t in itertools.product(*[range(k) for k in kernel_shape[:3]])]
  return jnp.stack(taps).reshape(kernel_shape)


def _conv_dinput(dy, kernel, in_sizes, strides, padding):
  """dL/dx as stride-1 gather-matmuls over dy, one per residue class of x modulo the stride.

  x[m*s + r] receives dy[i] @ W[j]^T for every tap j with i*s + j - p = m*s + r, i.e. j ≡ r + p (mod s) and
  i = m + (r + p - j)/s: a stride-1 correlation of dy for each r, so no dilated conv and no zero-stuffing.
  """
  batch, cin = dy.shape[0], kernel.shape[3]
  ksize, out_sizes = kernel.shape[:3], dy.shape[1:4]
  per_dim = []  # per dim, per residue r: (taps j, offsets c_j, class length)
  for n, k, s, p, o in zip(in_sizes, ksize, strides, padding, out_sizes):
    classes = []
    for r in range(s):
      length = -(-(n - r) // s)
      taps = [j for j in range(k) if (j - r - p) % s == 0]
      offs = [(r + p - j) // s for j in taps]
      keep = [(j, c) for j, c in zip(taps, offs) if any(0 <= m + c < o for m in range(length))]
      classes.append(([j for j, _ in keep], [c for _, c in keep], length))
    per_dim.append(classes)
  lo = [max([0] + [-c for _, offs, _ in cl for c in offs]) for cl in per_dim]
  hi = [max([0] + [ln - 1 + c - (o - 1) for _, offs, ln in cl for c in offs])
        for cl, o in zip(per_dim, out_sizes)]
  dyp = _pad(dy, lo, hi)
  wt = jnp.swapaxes(kernel, 3, 4)  # (kt,kh,kw,Cout,Cin)
  blocks = {}
  for r in itertools.product(*[range(s) for s in strides]):
    cls = [per_dim[d][r[d]] for d in range(3)]
    lengths = [c[2] for c in cls]
    if any(not c[0] for c in cls) or any(ln <= 0 for ln in lengths):
      blocks[r] = jnp.zeros((batch, *[max(ln, 0) for ln in lengths], cin), dy.dtype)
      continue
    starts = [[c + l for c in cl[1]] for cl, l in zip(cls, lo)]
    wmat = _tap_matrix(wt, [c[0] for c in cls])
    blocks[r] = _gather_matmul(dyp, starts, lengths, (1, 1, 1), wmat)
  if all(s == 1 for s in strides):
    return blocks[(0, 0, 0)]
  # Interleave the residue classes back: pad each to the longest class, stack as a trailing stride axis.
  full = [-(-n // s) for n, s in zip(in_sizes, strides)]
  grid = {}
  for r, b in blocks.items():
    grid[r] = _pad(b, [0, 0, 0], [f - b.shape[d + 1] for d, f in enumerate(full)])
  def build(prefix):
    d = len(prefix)
    if d == 3:
      return grid[prefix]
    parts = [build(prefix + (r,)) for r in range(strides[d])]
    if strides[d] == 1:
      return parts[0]
    stacked = jnp.stack(parts, axis=d + 2)  # (..., full_d, s_d, ...)
    shape = list(stacked.shape)
    merged = shape[:d + 1] + [shape[d + 1] * shape[d + 2]] + shape[d + 3:]
    return stacked.reshape(merged)
  dx = build(())
  return dx[:, :in_sizes[0], :in_sizes[1], :in_sizes[2]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_gemm(x, kernel, strides, padding):
  return _conv_forward(x, kernel, strides, padding)


def _conv_gemm_fwd(x, kernel, strides, padding):
  return _conv_forward(x, kernel, strides, padding), (x, kernel)


def _conv_gemm_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  dx = _conv_dinput(dy, kernel, x.shape[1:4], strides, padding).astype(x.dtype)
  dk = _conv_dkernel(x, dy, kernel.shape, strides, padding).astype(kernel.dtype)
  return dx, dk


_conv_gemm.defvjp(_conv_gemm_fwd, _conv_gemm_bwd)


def conv3d_gemm(x, kernel, strides, padding):
  """im2col conv with a custom VJP whose gradients are gather-matmuls too (same value as XLA's conv)."""
  return _conv_gemm(x, kernel.astype(x.dtype), tuple(strides), tuple(padding))
