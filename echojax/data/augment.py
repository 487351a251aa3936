"""Clip augmentations of the EchoCLR recipe as TensorFlow graph ops (no Python callbacks in the hot path),
plus the frame-order permutation table.

One random draw per clip, applied identically to all its frames: zero-pad + random crop (a -pad..pad-1 px
shift), horizontal flip, rotation by an integer angle (zero fill, bilinear); then per-clip min-max to [0, 1].
With a rotation the three spatial steps are fused into ONE projective resampling (interpolated once);
without one, shift + flip are exact slicing (same result, ~3x cheaper).
Randomness is stateless: the caller passes a per-clip seed (shape [2]), so results never depend on parallelism.
"""
from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf

from echojax.data import options

MAX_ORDER_CLIP_LEN = 8  # 8! = 40320 frame-order classes; beyond that a lookup table is absurd
DEFAULT_AUGMENT = options.AUGMENT


def _get(cfg: Any, key: str):
  """Reads `key` from a ConfigDict / mapping / None, falling back to DEFAULT_AUGMENT."""
  if cfg is None:
    return DEFAULT_AUGMENT[key]
  if isinstance(cfg, Mapping):
    return cfg.get(key, DEFAULT_AUGMENT[key])
  return getattr(cfg, key, DEFAULT_AUGMENT[key])


def sample_spatial_params(seed: tf.Tensor, cfg: Any = None) -> dict:
  """Draws one clip's augmentation parameters from a stateless seed (one uniform draw of 5 numbers).

  Returns dict(shift=int32 [2] (dx, dy) in [-pad, pad-1], flip=bool, angle_deg=int32 (0 when not rotated)).
  """
  u = tf.random.stateless_uniform([5], tf.cast(seed, tf.int64))
  pad = int(_get(cfg, 'pad'))
  max_deg = int(_get(cfg, 'max_rotate_deg'))
  shift = tf.cast(tf.floor(u[:2] * (2 * pad)), tf.int32) - pad
  angle = tf.cast(tf.floor(u[2] * (2 * max_deg + 1)), tf.int32) - max_deg
  rotate = u[3] < float(_get(cfg, 'rotate_prob'))
  return dict(shift=shift, flip=u[4] < float(_get(cfg, 'flip_prob')), angle_deg=tf.where(rotate, angle, 0))


def spatial_transform_matrix(height: int, width: int, shift, flip, angle_deg) -> tf.Tensor:
  """3x3 matrix mapping OUTPUT pixel (x, y, 1) to its SOURCE location in the input frame.

  Composition (forward): shift by -(dx, dy) [= pad-and-crop], then horizontal flip, then rotation by
  `angle_deg` about the frame centre with scipy.ndimage.rotate's sign convention (positive = counter-clockwise
  as displayed with row 0 on top). Closed form of shift @ flip @ inverse-rotation (few graph ops).
  """
  shift = tf.cast(shift, tf.float32)
  theta = tf.cast(angle_deg, tf.float32) * (math.pi / 180.0)
  cx, cy = (width - 1) / 2.0, (height - 1) / 2.0
  cos, sin = tf.cos(theta), tf.sin(theta)
  flip_f = tf.cast(flip, tf.float32)
  sign = 1.0 - 2.0 * flip_f
  rot_tx, rot_ty = cx - cos * cx + sin * cy, cy - sin * cx - cos * cy
  return tf.reshape(tf.stack([
      sign * cos, -sign * sin, sign * rot_tx + flip_f * (width - 1) + shift[0],
      sin, cos, rot_ty + shift[1],
      0.0, 0.0, 1.0]), [3, 3])


def apply_spatial(clip: tf.Tensor, matrix: tf.Tensor, interpolation: str = 'BILINEAR') -> tf.Tensor:
  """Resamples every frame of `clip` (T, H, W, C) float32 with the same 3x3 output->source `matrix`."""
  height, width = clip.shape[1], clip.shape[2]
  if height is None or width is None:
    height, width = tf.shape(clip)[1], tf.shape(clip)[2]
  transform = tf.reshape(tf.concat([tf.reshape(matrix[:2, :], [6]), tf.zeros([2])], 0), [1, 8])
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=clip, transforms=transform, output_shape=tf.stack([height, width]),
      fill_value=tf.constant(0.0), interpolation=interpolation, fill_mode='CONSTANT')


def minmax_scale(clip: tf.Tensor) -> tf.Tensor:
  """Per-clip min-max to [0, 1]; a constant clip maps to zeros (never NaN)."""
  clip = tf.cast(clip, tf.float32)
  lo, hi = tf.reduce_min(clip), tf.reduce_max(clip)
  return tf.math.divide_no_nan(clip - lo, hi - lo)


def augment_clip(clip: tf.Tensor, seed: tf.Tensor, cfg: Any = None) -> tf.Tensor:
  """Spatial augmentation of one clip (T, H, W, C), one draw for the whole clip; returns float32.

  Min-max is NOT applied here (the pipeline applies it after an optional resize and before zero-padding
  short clips); `cfg.enabled=False` returns the clip unchanged (as float32).
  """
  clip = tf.cast(clip, tf.float32)
  if not _get(cfg, 'enabled'):
    return clip
  params = sample_spatial_params(seed, cfg)
  height, width = clip.shape[1], clip.shape[2]
  if height is None or width is None:
    raise ValueError(f'augment_clip needs static frame sizes, got clip shape {clip.shape}')

  def resample():
    return apply_spatial(clip, spatial_transform_matrix(height, width, **params))

  def shift_and_flip():  # integer shift + flip need no interpolation: same result as resample(), ~3x cheaper
    pad = int(_get(cfg, 'pad'))
    padded = tf.pad(clip, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    dx, dy = params['shift'][0], params['shift'][1]
    out = tf.slice(padded, tf.stack([0, pad + dy, pad + dx, 0]), [-1, height, width, -1])
    return tf.cond(params['flip'], lambda: tf.reverse(out, [2]), lambda: out)

  return tf.cond(tf.equal(params['angle_deg'], 0), shift_and_flip, resample)


def permutation_table(clip_len: int) -> np.ndarray:
  """All permutations of range(clip_len) in lexicographic order, int32 (clip_len!, clip_len); row 0 = identity."""
  if not 1 <= clip_len <= MAX_ORDER_CLIP_LEN:
    raise ValueError(f'frame order needs 1 <= clip_len <= {MAX_ORDER_CLIP_LEN}, got {clip_len}')
  return np.array(list(itertools.permutations(range(clip_len))), np.int32)


def permutation_index(perm: Sequence[int]) -> int:
  """Lexicographic rank of `perm` among the permutations of range(len(perm)) (Lehmer code)."""
  perm = [int(p) for p in perm]
  if sorted(perm) != list(range(len(perm))):
    raise ValueError(f'not a permutation of range({len(perm)}): {perm}')
  rank = 0
  for i, p in enumerate(perm):
    rank += sum(q < p for q in perm[i + 1:]) * math.factorial(len(perm) - 1 - i)
  return rank
