"""BatchNorm with PyTorch's exact semantics (BatchNorm3d / BatchNorm1d), channels-last.

Normalises with the biased batch variance but updates `running_var` with the unbiased one, and uses torch's
momentum convention (new = (1 - m)·old + m·batch). Statistics reduce over every non-channel axis of the
(global, under jit) batch, so no `axis_name` is needed when the batch is sharded over a mesh; `group_size`
> 0 makes it ghost BatchNorm (statistics per group of consecutive rows).
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


def float32_or_wider(x):
  """x in float32, or float64 when it already is (the float64 exactness tests); bf16 is widened."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm*d on the last axis. `momentum` is in torch's convention (0.1 = 10 % new batch).

  Params `scale`/`bias` (torch weight/bias) and batch_stats `mean`/`var` (torch running_mean/var) stay
  float32; the affine map is applied in `dtype` (the compute dtype) after statistics are taken in float32.

  group_size G > 0 (ghost BN): in train mode rows [kG, (k+1)G) of the leading axis are normalised with their
  own statistics, as if each group were a separate torch batch (e.g. one GPU of a DataParallel job). The
  running statistics move once per call, by the mean over groups of each group's mean and unbiased
  variance; with equal groups that is the same update however the groups are split between calls, which is
  what makes a microbatched step (gradcache.py) equal the unchunked one. G = 0: one group, the whole batch.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  group_size: int = 0

  @nn.compact
  def __call__(self, x, train: bool):
    features = x.shape[-1]
    running_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    running_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))
    scale = (self.param('scale', nn.initializers.ones, (features,), self.param_dtype)
             if self.use_scale else jnp.ones((features,), self.param_dtype))
    bias = (self.param('bias', nn.initializers.zeros, (features,), self.param_dtype)
            if self.use_bias else jnp.zeros((features,), self.param_dtype))

    if train:
      groups = self._grouped(x)
      axes = tuple(range(1, groups.ndim - 1))
      count = math.prod(groups.shape[1:-1])
      if count < 2:
        raise ValueError(f'BatchNorm in train mode needs more than 1 value per channel and group, got input '
                         f'{x.shape} (group_size={self.group_size})')
      x32 = float32_or_wider(groups)
      mean = jnp.mean(x32, axes, keepdims=True)
      # Two-pass variance: E[x²]−E[x]² loses precision on large activations.
      var = jnp.mean(jnp.square(x32 - mean), axes, keepdims=True)
      if not self.is_initializing():
        m = self.momentum
        flat = lambda stat: jnp.mean(stat.reshape(-1, features), axis=0)
        running_mean.value = (1.0 - m) * running_mean.value + m * flat(mean)
        running_var.value = (1.0 - m) * running_var.value + m * flat(var) * (count / (count - 1))
    else:
      groups, mean, var = x[None], running_mean.value, running_var.value

    multiplier = float32_or_wider(scale) * lax.rsqrt(var + self.epsilon)
    shift = float32_or_wider(bias) - mean * multiplier
    dtype = self.dtype or x.dtype
    y = groups.astype(dtype) * multiplier.astype(dtype) + shift.astype(dtype)
    return y.reshape(x.shape)

  def _grouped(self, x):
    """x (B, ...) → (B/G, G, ...) (G = B when group_size is 0): a free reshape of consecutive rows, which
    keeps a batch sharded over devices sharded (and local) when G divides the per-device batch."""
    size = self.group_size or x.shape[0]
    if size < 0 or x.shape[0] % size:
      raise ValueError(f'ghost BatchNorm: batch {x.shape[0]} is not a multiple of group_size '
                       f'{self.group_size}')
    return x.reshape((x.shape[0] // size, size) + x.shape[1:])
