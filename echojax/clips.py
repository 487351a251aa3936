"""NumPy twin of the eval pipeline's clip preparation, for raw videos outside TFDS (predict, saliency):
N evenly spaced L-frame clips (starts 0, s, 2s, … with s = ⌊(T−L)/N⌋), per-clip min–max, zero padding."""
from __future__ import annotations

import numpy as np


def eval_clip_starts(num_frames: int, clip_len: int = 16, num_clips: int = 4) -> list[int]:
  step = max((num_frames - clip_len) // num_clips, 0)
  return [i * step for i in range(num_clips)]


def minmax(clip: np.ndarray) -> np.ndarray:
  clip = clip.astype(np.float32)
  lo, hi = clip.min(), clip.max()
  return (clip - lo) / (hi - lo) if hi > lo else np.zeros_like(clip)


def resize_frames(video: np.ndarray, size: int) -> np.ndarray:
  """(T,H,W) → (T,size,size) with area interpolation (no-op at the native size)."""
  if video.shape[1] == size and video.shape[2] == size:
    return video
  import cv2
  return np.stack([cv2.resize(f, (size, size), interpolation=cv2.INTER_AREA) for f in video])


def eval_clips(video: np.ndarray, clip_len: int = 16, num_clips: int = 4, size: int = 112) -> np.ndarray:
  """uint8 (T,H,W) → float32 (N, L, size, size, 1) in [0,1]; frames past the end are zeros."""
  video = np.asarray(video)
  clips = []
  for start in eval_clip_starts(len(video), clip_len, num_clips):
    clip = minmax(video[start:start + clip_len])
    if size != clip.shape[1]:
      clip = resize_frames(clip, size)
    if len(clip) < clip_len:
      clip = np.concatenate([clip, np.zeros((clip_len - len(clip),) + clip.shape[1:], np.float32)])
    clips.append(clip)
  return np.stack(clips)[..., None]
