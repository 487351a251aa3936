"""Networks from a run's `model` config block, big_vision style: `ssl_model(**cfg.model, ...)` and
`classifier(**cfg.model, ...)` take the block's keys as keyword arguments (no defaults here: the config file
is the one place they live), and an encoder artifact's spec overrides the architecture."""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from echojax.models.heads import Classifier, SSLModel
from echojax.models.resnet3d import ResNet3D


class NormalizedClassifier(Classifier):
  """Classifier whose grayscale [0, 1] input is replicated to `in_channels` and standardised with the init
  weights' statistics (Kinetics mean/std for torchvision weights), as the seed code does."""
  input_mean: tuple = (0.0,)
  input_std: tuple = (1.0,)
  in_channels: int = 1

  def __call__(self, video, train: bool, return_feature_map: bool = False):
    if video.shape[-1] != self.in_channels:
      video = jnp.repeat(video[..., :1], self.in_channels, axis=-1)
    mean = jnp.asarray(self.input_mean, video.dtype)
    std = jnp.asarray(self.input_std, video.dtype)
    return super().__call__((video - mean) / std, train, return_feature_map)


def resolve_dtype(dtype: str, backend: Optional[str] = None) -> jnp.dtype:
  """The compute dtype of a model block's `dtype`: 'auto' is bfloat16 on GPU/TPU (their matmul units run
  bf16 at 2× or more the f32 rate) and float32 on CPU (XLA:CPU gains nothing from bf16, see BENCHMARKS.md)."""
  if dtype == 'auto':
    return jnp.dtype(jnp.float32 if (backend or jax.default_backend()) == 'cpu' else jnp.bfloat16)
  return jnp.dtype(dtype)


def encoder_kwargs(*, width: int, stage_depths: Sequence[int], conv_impl: str, dtype: str, remat: bool,
                   stem_motion_fraction: float = 0.0, **_heads) -> dict:
  """The encoder's share of a model block (the head keys are the SSL model's; bn_group_size is applied by
  the network that owns the encoder, in its own units). stem_motion_fraction defaults to 0 only for run
  configs saved before the key existed."""
  return dict(width=int(width), stage_depths=tuple(stage_depths), conv_impl=conv_impl,
              dtype=resolve_dtype(dtype), remat=bool(remat), stem_motion_fraction=float(stem_motion_fraction))


def encoder(**model_cfg) -> ResNet3D:
  return ResNet3D(**encoder_kwargs(**model_cfg))


# bn_group_size defaults to 0 (global BN) only for run configs saved before the key existed.
def ssl_model(*, projection: str, proj_hidden: int, proj_dim: int, bn_mode: str, num_order_classes: int,
              bn_group_size: int = 0, gradient_balance: str = 'none', **encoder_cfg) -> SSLModel:
  """bn_group_size: ghost BatchNorm groups in pairs (0 = the whole global batch); gradient_balance: how
  NT-Xent's and the frame-order CE's gradients combine into the encoder (models.gradient_fork)."""
  return SSLModel(encoder=encoder_kwargs(**encoder_cfg), projection=projection, proj_hidden=proj_hidden,
                  proj_dim=proj_dim, num_order_classes=num_order_classes, bn_mode=bn_mode,
                  bn_group_size=int(bn_group_size), gradient_balance=str(gradient_balance))


def classifier(*, dropout: float, dropout_on: str, num_outputs: int = 1,
               spec: Optional[Mapping[str, Any]] = None, bn_group_size: int = 0, **model_cfg) -> Classifier:
  """The fine-tuning network; an encoder artifact's `spec` fixes architecture and input handling.
  bn_group_size: ghost BatchNorm groups in clips (0 = the whole global batch)."""
  kwargs = dict(encoder_kwargs(**model_cfg), bn_group_size=int(bn_group_size))
  norm = None
  if spec is not None:
    kwargs.update(width=int(spec['width']), stage_depths=tuple(spec['stage_depths']))
    norm = spec.get('input_normalization')
  common = dict(encoder_kwargs=kwargs, num_outputs=num_outputs, dropout_rate=dropout, dropout_on=dropout_on)
  in_channels = int(spec.get('in_channels', 1)) if spec else 1
  if norm or in_channels != 1:
    norm = norm or {'mean': [0.0], 'std': [1.0]}
    return NormalizedClassifier(**common, input_mean=tuple(norm['mean']), input_std=tuple(norm['std']),
                                in_channels=in_channels)
  return Classifier(**common)
