"""Heads on the encoder's pooled features (projection MLP, frame-order, AS classifier) and the two networks
built from encoder + heads: `SSLModel` (pretraining) and `Classifier` (fine-tuning, Grad-CAM).

Heads compute in float32 (they are tiny, and the losses read their outputs directly). The encoder submodule
is always named `encoder`, so its variables are `params['encoder']` / `batch_stats['encoder']`.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import FrozenDict

from echojax.models import gradient_fork
from echojax.models.batchnorm import BatchNorm, float32_or_wider
from echojax.models.resnet3d import ResNet3D, global_average_pool

# torch.nn.Linear's default weight init: U(±1/sqrt(fan_in)) (kaiming_uniform with a=sqrt(5)).
torch_linear_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')

PROJECTION_KINDS = ('paper', 'simclr_v2')
DROPOUT_POSITIONS = ('logit', 'features')
BN_MODES = ('global', 'per_view')


class ProjectionHead(nn.Module):
  """SimCLR projection g(h).

  'paper': Linear(F→hidden, no bias) → ReLU → Linear(hidden→out, no bias); paper: 512→256→128.
  'simclr_v2': 3 Linear layers each followed by BN (ReLU on the first two; the last BN has no bias),
  as in SimCLR v2. bn_group_size: ghost BatchNorm groups in rows (0 = the whole batch).
  """
  kind: str = 'paper'
  hidden_dim: int = 256
  out_dim: int = 128
  bn_momentum: float = 0.1
  bn_group_size: int = 0

  @nn.compact
  def __call__(self, features, train: bool = False):
    if self.kind not in PROJECTION_KINDS:
      raise ValueError(f'projection kind must be one of {PROJECTION_KINDS}, got {self.kind!r}')
    x = float32_or_wider(features)
    if self.kind == 'paper':
      x = nn.Dense(self.hidden_dim, use_bias=False, kernel_init=torch_linear_init, name='dense1')(x)
      x = nn.relu(x)
      return nn.Dense(self.out_dim, use_bias=False, kernel_init=torch_linear_init, name='dense2')(x)
    dims = (self.hidden_dim, self.hidden_dim, self.out_dim)
    for i, dim in enumerate(dims):
      last = i == len(dims) - 1
      x = nn.Dense(dim, use_bias=False, kernel_init=torch_linear_init, name=f'dense{i + 1}')(x)
      x = BatchNorm(self.bn_momentum, use_bias=not last, group_size=self.bn_group_size,
                    name=f'bn{i + 1}')(x, train)
      if not last:
        x = nn.relu(x)
    return x


class FrameOrderHead(nn.Module):
  """Linear(F → T!) predicting which permutation shuffled the clip's frames."""
  num_classes: int = 24

  @nn.compact
  def __call__(self, features):
    return nn.Dense(self.num_classes, kernel_init=torch_linear_init, name='dense')(
        float32_or_wider(features))


class ClassifierHead(nn.Module):
  """Linear(F → num_outputs) with Dropout(rate) on the logit (released code) or on the features."""
  num_outputs: int = 1
  dropout_rate: float = 0.25
  dropout_on: str = 'logit'

  @nn.compact
  def __call__(self, features, train: bool = False):
    if self.dropout_on not in DROPOUT_POSITIONS:
      raise ValueError(f'dropout_on must be one of {DROPOUT_POSITIONS}, got {self.dropout_on!r}')
    dropout = nn.Dropout(self.dropout_rate, deterministic=not train)
    x = float32_or_wider(features)
    if self.dropout_on == 'features':
      x = dropout(x)
    x = nn.Dense(self.num_outputs, kernel_init=torch_linear_init, name='dense')(x)
    if self.dropout_on == 'logit':
      x = dropout(x)
    return x


def _encoder(encoder_kwargs: Optional[Mapping[str, Any]], **overrides) -> ResNet3D:
  return ResNet3D(**{**dict(encoder_kwargs or {}), **overrides}, name='encoder')


def _frozen(kwargs: Optional[Mapping[str, Any]]) -> Optional[FrozenDict]:
  """Hashable encoder kwargs (lists → tuples), so the model can be a static jit argument."""
  if kwargs is None:
    return None
  return FrozenDict({k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})


class SSLModel(nn.Module):
  """Encoder + projection head (+ optional frame-order head) on two-view batches.

  `encoder` holds the ResNet3D kwargs (the submodule itself is also named 'encoder'); `projection` is the
  head kind ('paper' | 'simclr_v2') with dims `proj_hidden` → `proj_dim`; `num_order_classes` 0 = no
  frame-order head. bn_mode 'global': both views go through ONE encoder call as a (2B,...) batch, so
  BatchNorm statistics span all 2B clips of the global batch. 'per_view': two encoder calls (views[:,0], then
  views[:,1]) with BatchNorm statistics per view, as the paper's code did (running stats update twice).
  bn_group_size G > 0 (ghost BN, in PAIRS): every BatchNorm takes its statistics over groups of G
  consecutive pairs — 2G clips in 'global' mode, G clips of one view in 'per_view' mode.
  gradient_balance ('none' | 'equal_norm'; only with a frame-order head): how the two heads'
  gradients combine where they enter the encoder (models.gradient_fork; forward values unchanged).
  """
  encoder: Optional[Mapping[str, Any]] = None
  projection: str = 'paper'
  proj_hidden: int = 256
  proj_dim: int = 128
  num_order_classes: int = 0
  bn_mode: str = 'global'
  bn_group_size: int = 0
  gradient_balance: str = 'none'

  def __post_init__(self):
    object.__setattr__(self, 'encoder', _frozen(self.encoder))
    super().__post_init__()

  @nn.compact
  def __call__(self, views, train: bool, contrastive_encoder_share=None, order_views=None):
    """contrastive_encoder_share (a scalar, None = 1): the share of the projection's gradient passed back
    into the encoder; the forward values, the projection head's and the frame-order head's gradients are
    unchanged (the frame-order-first curriculum, core.losses.contrastive_encoder_share_at).
    order_views (B,2,T,H,W,C) or None: clips for the frame-order head only (ssl.order_input='separate'; the
    projection then reads `views` alone); None = the order head reads `views` too (the paper)."""
    if views.ndim != 6 or views.shape[1] != 2:
      raise ValueError(f'SSLModel expects views (B,2,T,H,W,C), got shape {views.shape}')
    if self.bn_mode not in BN_MODES:
      raise ValueError(f'bn_mode must be one of {BN_MODES}, got {self.bn_mode!r}')
    if self.gradient_balance not in gradient_fork.GRADIENT_BALANCES:
      raise ValueError(f'gradient_balance must be one of {gradient_fork.GRADIENT_BALANCES}, '
                       f'got {self.gradient_balance!r}')
    if order_views is not None and (order_views.shape != views.shape or not self.num_order_classes):
      raise ValueError(f'order_views must match views {views.shape} and need a frame-order head, got '
                       f'{order_views.shape} with num_order_classes={self.num_order_classes}')
    if order_views is not None and self.gradient_balance != 'none':
      raise ValueError('gradient_balance balances the two heads on shared features; with separate '
                       'order_views there is no shared feature to fork')
    batch = views.shape[0]
    # Rows of one BatchNorm call per pair: global mode stacks both views pair-major (row 2i + view).
    group_rows = self.bn_group_size * (2 if self.bn_mode == 'global' else 1)
    encoder = _encoder(self.encoder, bn_group_size=group_rows)
    clips = views if order_views is None else jnp.concatenate([views, order_views], axis=0)
    if self.bn_mode == 'global':   # one call: statistics over every clip of the step
      encoded = encoder(clips.reshape((-1,) + clips.shape[2:]), train).reshape(clips.shape[0], 2, -1)
    else:
      encoded = jnp.stack([encoder(clips[:, 0], train), encoder(clips[:, 1], train)], axis=1)
    features, order_features = (encoded, encoded) if order_views is None else (encoded[:batch], encoded[batch:])
    to_projection, to_order = features, order_features
    if self.num_order_classes and self.gradient_balance != 'none':
      to_projection, to_order = gradient_fork.fork(features, self.gradient_balance)
    if contrastive_encoder_share is not None:
      share = jnp.asarray(contrastive_encoder_share, features.dtype)
      to_projection = share * to_projection + (1 - share) * jax.lax.stop_gradient(to_projection)
    projection = ProjectionHead(self.projection, self.proj_hidden, self.proj_dim,
                                bn_group_size=group_rows, name='projection')
    if self.projection == 'simclr_v2' and self.bn_mode == 'per_view':
      embeddings = jnp.stack([projection(to_projection[:, 0], train), projection(to_projection[:, 1], train)], 1)
    else:
      embeddings = projection(to_projection.reshape(2 * batch, -1), train).reshape(batch, 2, -1)
    outputs = dict(embeddings=embeddings, features=features)
    if self.num_order_classes:
      order = FrameOrderHead(self.num_order_classes, name='frame_order')(to_order.reshape(2 * batch, -1))
      outputs['order_logits'] = order.reshape(batch, 2, -1)
    return outputs


class Classifier(nn.Module):
  """Encoder + ClassifierHead: video (B,T,H,W,C) → logits (B, num_outputs).

  For Grad-CAM: `__call__(..., return_feature_map=True)` also returns the layer4 map, and
  `logits_from_feature_map` maps a layer4 map to logits, so d logit / d map is a plain `jax.grad`.
  """
  encoder_kwargs: Optional[Mapping[str, Any]] = None
  num_outputs: int = 1
  dropout_rate: float = 0.25
  dropout_on: str = 'logit'

  def __post_init__(self):
    object.__setattr__(self, 'encoder_kwargs', _frozen(self.encoder_kwargs))
    super().__post_init__()

  @property
  def bn_group_size(self) -> int:
    """Ghost-BN group of the encoder in clips (0 = the whole batch); read by the chunked train step."""
    return int((self.encoder_kwargs or {}).get('bn_group_size', 0))

  def setup(self):
    self.encoder = _encoder(self.encoder_kwargs)
    self.head = ClassifierHead(self.num_outputs, self.dropout_rate, self.dropout_on)

  def __call__(self, video, train: bool, return_feature_map: bool = False):
    features, feature_map = self.encoder(video, train, return_feature_map=True)
    logits = self.head(features, train)
    return (logits, feature_map) if return_feature_map else logits

  def logits_from_feature_map(self, feature_map, train: bool = False):
    return self.head(global_average_pool(feature_map), train)
