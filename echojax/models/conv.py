"""3D convolution with a selectable implementation (`conv_impl`), shared by every encoder.

`xla` is `lax.conv_general_dilated`; `gemm` (the CPU fast path) computes convs as slicing + matmul so
their gradients avoid XLA:CPU's slow dilated convolutions. `auto` picks per backend.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ('auto', 'xla', 'gemm')


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
  if impl == 'gemm':
    return conv3d_gemm(x, kernel, strides, padding)
  return lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=tuple(strides),
      padding=[(p, p) for p in padding], dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))


def conv3d_gemm(x, kernel, strides, padding):
  """Placeholder until the GEMM path lands (performance issue): falls back to XLA's conv."""
  return lax.conv_general_dilated(
      x, kernel.astype(x.dtype), window_strides=tuple(strides),
      padding=[(p, p) for p in padding], dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'))
