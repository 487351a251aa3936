"""BatchNorm with PyTorch's exact semantics (BatchNorm3d / BatchNorm1d), channels-last.

Normalises with the biased batch variance but updates `running_var` with the unbiased one, and uses torch's
momentum convention (new = (1 - m)·old + m·batch). Statistics reduce over every non-channel axis of the
(global, under jit) batch, so no `axis_name` is needed when the batch is sharded over a mesh.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


class BatchNorm(nn.Module):
  """torch.nn.BatchNorm*d on the last axis. `momentum` is in torch's convention (0.1 = 10 % new batch).

  Params `scale`/`bias` (torch weight/bias) and batch_stats `mean`/`var` (torch running_mean/var) stay
  float32; the affine map is applied in `dtype` (the compute dtype) after statistics are taken in float32.
  """
  momentum: float = 0.1
  epsilon: float = 1e-5
  use_scale: bool = True
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32

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
      axes = tuple(range(x.ndim - 1))
      count = math.prod(x.shape[:-1])
      if count < 2:
        raise ValueError(f'BatchNorm in train mode needs more than 1 value per channel, got input {x.shape}')
      x32 = x.astype(jnp.float32)
      mean = jnp.mean(x32, axes)
      # Two-pass variance: E[x²]−E[x]² loses precision on large activations.
      var = jnp.mean(jnp.square(x32 - mean), axes)
      if not self.is_initializing():
        m = self.momentum
        running_mean.value = (1.0 - m) * running_mean.value + m * mean
        running_var.value = (1.0 - m) * running_var.value + m * var * (count / (count - 1))
    else:
      mean, var = running_mean.value, running_var.value

    multiplier = scale.astype(jnp.float32) * lax.rsqrt(var + self.epsilon)
    shift = bias.astype(jnp.float32) - mean * multiplier
    dtype = self.dtype or x.dtype
    return x.astype(dtype) * multiplier.astype(dtype) + shift.astype(dtype)
