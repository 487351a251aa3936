"""R3D-18 video encoder in Flax linen, numerically identical to torchvision's `r3d_18` (fc removed).

Linen, not NNX: the train state stays a plain pytree of params/batch_stats that jit shardings, Orbax and the
torchvision converter handle directly. Module names mirror torchvision's (`stem_conv` = stem.0,
`layer2_0/downsample_bn` = layer2.0.downsample.1, ...); see `torchvision_import.py` for the exact mapping.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from echojax.models.batchnorm import BatchNorm, float32_or_wider
from echojax.models.conv import conv3d

# torchvision's VideoResNet init: kaiming_normal_(mode='fan_out', nonlinearity='relu'), untruncated.
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

# Temporal profiles of motion-sensitive stem filters: forward, backward and central frame differences.
_MOTION_PROFILES = ((1.0, -1.0, 0.0), (0.0, 1.0, -1.0), (1.0, 0.0, -1.0))


def motion_stem_init(fraction: float, base=conv_kernel_init):
  """`base`, then the first round(fraction · Cout) stem filters become temporal differences of their own
  spatial pattern (time mean of the drawn kernel × a difference profile, norm kept). A 3D CNN started from
  static-looking filters takes thousands of steps to find frame-to-frame change; with these it sees motion
  energy from step 0 (the frame-order task then learns on a CPU budget; README "Frame order")."""
  def init(key, shape, dtype=jnp.float32):
    kernel = base(key, shape, dtype)
    count = int(round(fraction * shape[-1]))
    if not count:
      return kernel
    if shape[0] != 3:
      raise ValueError(f'motion_stem_init needs a 3-frame temporal kernel, got kernel shape {shape}')
    spatial = jnp.mean(kernel[..., :count], axis=0)                                   # (kh, kw, Cin, n)
    profiles = jnp.asarray([_MOTION_PROFILES[c % 3] for c in range(count)], dtype).T  # (3, n)
    motion = profiles[:, None, None, None, :] * spatial[None]
    norm = lambda k: jnp.sqrt(jnp.sum(k ** 2, axis=(0, 1, 2, 3), keepdims=True))
    motion = motion * norm(kernel[..., :count]) / jnp.maximum(norm(motion), 1e-12)
    return kernel.at[..., :count].set(motion.astype(dtype))
  return init


BLOCKS = ('basic',)
ARCHS = ('r3d',)


class Conv3D(nn.Module):
  """Bias-free 3D convolution with torch-style explicit symmetric padding (never 'SAME')."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1, 1)
  padding: Sequence[int] = (0, 0, 0)
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32
  kernel_init: Any = conv_kernel_init

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
    return conv3d(x.astype(self.dtype), kernel.astype(self.dtype), tuple(self.strides),
                  tuple(self.padding), self.conv_impl)


class BasicBlock(nn.Module):
  """torchvision BasicBlock with Conv3DSimple: conv-BN-ReLU, conv-BN, (+ 1×1×1 conv-BN shortcut), ReLU."""
  features: int
  stride: int = 1
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32
  bn_momentum: float = 0.1
  bn_eps: float = 1e-5
  bn_group_size: int = 0

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda feats, k, s, p, name: Conv3D(feats, (k,) * 3, (s,) * 3, (p,) * 3, self.conv_impl,
                                               self.dtype, name=name)
    bn = lambda name: BatchNorm(self.bn_momentum, self.bn_eps, dtype=self.dtype,
                                group_size=self.bn_group_size, name=name)
    residual = x
    y = conv(self.features, 3, self.stride, 1, 'conv1')(x)
    y = nn.relu(bn('bn1')(y, train))
    y = conv(self.features, 3, 1, 1, 'conv2')(y)
    y = bn('bn2')(y, train)
    if self.stride != 1 or x.shape[-1] != self.features:
      residual = conv(self.features, 1, self.stride, 0, 'downsample_conv')(x)
      residual = bn('downsample_bn')(residual, train)
    return nn.relu(y + residual.astype(y.dtype))


def global_average_pool(feature_map: jax.Array) -> jax.Array:
  """AdaptiveAvgPool3d(1) + flatten: (B,T,H,W,C) → (B,C), accumulated in float32."""
  return jnp.mean(float32_or_wider(feature_map), axis=(1, 2, 3))


class ResNet3D(nn.Module):
  """R3D encoder: (B,T,H,W,C) float → (B, 8·width) features after global average pooling.

  `dtype` is the compute dtype (params stay float32); `bn_momentum` is torch's convention; `remat`
  rematerialises each residual block in the backward pass; `bn_group_size` > 0 = ghost BatchNorm over
  groups of that many consecutive clips (train mode only). Input channels are taken from `x`.
  `stem_motion_fraction` > 0 starts that share of the stem's filters as temporal differences
  (`motion_stem_init`; initialisation only, the architecture and torchvision parity are unchanged).
  """
  width: int = 64
  stage_depths: Sequence[int] = (2, 2, 2, 2)
  block: str = 'basic'
  arch: str = 'r3d'
  conv_impl: str = 'auto'
  dtype: Any = jnp.float32
  bn_momentum: float = 0.1
  bn_eps: float = 1e-5
  remat: bool = False
  bn_group_size: int = 0
  stem_motion_fraction: float = 0.0

  @property
  def feature_dim(self) -> int:
    return self.width * 2 ** (len(self.stage_depths) - 1)

  @nn.compact
  def __call__(self, x, train: bool, return_feature_map: bool = False):
    if self.block not in BLOCKS or self.arch not in ARCHS:
      raise ValueError(f'unsupported block={self.block!r} / arch={self.arch!r}; have {BLOCKS} / {ARCHS}')
    if x.ndim != 5:
      raise ValueError(f'ResNet3D expects (B,T,H,W,C) input, got shape {x.shape}')
    if not 0.0 <= self.stem_motion_fraction <= 1.0:
      raise ValueError(f'stem_motion_fraction must be in [0, 1], got {self.stem_motion_fraction}')
    stem_init = motion_stem_init(self.stem_motion_fraction) if self.stem_motion_fraction else conv_kernel_init
    y = Conv3D(self.width, (3, 7, 7), (1, 2, 2), (1, 3, 3), self.conv_impl, self.dtype, stem_init,
               name='stem_conv')(x)
    y = BatchNorm(self.bn_momentum, self.bn_eps, dtype=self.dtype, group_size=self.bn_group_size,
                  name='stem_bn')(y, train)
    y = nn.relu(y)
    block_cls = nn.remat(BasicBlock, static_argnums=(2,)) if self.remat else BasicBlock
    for stage, depth in enumerate(self.stage_depths):
      for index in range(depth):
        stride = 2 if stage > 0 and index == 0 else 1
        y = block_cls(self.width * 2 ** stage, stride, self.conv_impl, self.dtype, self.bn_momentum,
                      self.bn_eps, self.bn_group_size, name=f'layer{stage + 1}_{index}')(y, train)
    features = global_average_pool(y)
    return (features, y) if return_feature_map else features


def encoder_param_count(width: int = 64, in_channels: int = 3,
                        stage_depths: Sequence[int] = (2, 2, 2, 2)) -> int:
  """Trainable parameters of the encoder (conv kernels + BN scale/bias; running stats excluded)."""
  model = ResNet3D(width=width, stage_depths=tuple(stage_depths), conv_impl='xla')
  shapes = encoder_variable_shapes(model, in_channels)
  return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(shapes['params']))


def encoder_variable_shapes(model: ResNet3D, in_channels: int) -> dict:
  """{'params','batch_stats'} as ShapeDtypeStructs, without running the (possibly 33M-param) init."""
  dummy = jax.ShapeDtypeStruct((1, 4, 16, 16, in_channels), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), dummy)
