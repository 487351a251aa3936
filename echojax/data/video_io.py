"""Reads echo videos (AVI/MP4 via OpenCV) as uint8 grayscale T×size×size arrays, and writes test videos.

Only cv2 and numpy: the TFDS builders and the DICOM converter call these, and problems surface as
`VideoReadError(path, reason)` so a builder can skip the file and list it in its rejects.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import cv2
import numpy as np

# Used when the container reports no frame rate (0 or NaN); the result's `fps_from_container` says so.
# 30 fps is a middle value for echo cines (EchoNet-Dynamic spans about 38-73, many exports 25-30).
DEFAULT_FPS = 30.0
DEFAULT_SIZE = 112
_FOURCC_BY_EXTENSION = {'.avi': 'MJPG', '.mp4': 'mp4v'}


class VideoReadError(Exception):
  """A video that cannot be used; `reason` is a short human string (e.g. 'file not found')."""

  def __init__(self, path, reason: str):
    self.path = os.fspath(path)
    self.reason = reason
    super().__init__(f'{self.path}: {reason}')


class DecodedVideo(tuple):
  """`(frames, fps)` pair (so `frames, fps = read_video(p)` works) with details as attributes.

  Attributes: frames (uint8 T×size×size), fps, fps_from_container (False when DEFAULT_FPS was used),
  source_shape ((H, W) of the stored frames), truncated (True when frames were dropped by max_frames).
  """

  def __new__(cls, frames: np.ndarray, fps: float, *, fps_from_container: bool,
              source_shape: tuple, truncated: bool):
    self = super().__new__(cls, (frames, fps))
    self.fps_from_container = fps_from_container
    self.source_shape = source_shape
    self.truncated = truncated
    return self

  @property
  def frames(self) -> np.ndarray:
    return self[0]

  @property
  def fps(self) -> float:
    return self[1]


def to_square_gray(frame: np.ndarray, size: int = DEFAULT_SIZE) -> np.ndarray:
  """One decoded frame (BGR H×W×3 or gray H×W) → uint8 size×size gray.

  Colour goes through OpenCV's BGR→gray luma, whose integer weights sum to exactly 1, so a frame stored as
  three identical channels comes back as that channel. A non-square frame is first padded with zeros to a
  centred square (echo sectors sit on black backgrounds, and padding keeps the aspect ratio), then resized
  with INTER_AREA when its side is not `size` (OpenCV treats an INTER_AREA upscale like bilinear).
  """
  if frame.dtype != np.uint8:
    raise ValueError(f'expected 8-bit frames, got {frame.dtype}')
  if frame.ndim == 3 and frame.shape[2] == 1:
    frame = frame[..., 0]
  elif frame.ndim == 3 and frame.shape[2] == 3:
    frame = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
  elif frame.ndim == 3 and frame.shape[2] == 4:
    frame = cv2.cvtColor(frame, cv2.COLOR_BGRA2GRAY)
  elif frame.ndim != 2:
    raise ValueError(f'unsupported frame shape {frame.shape}')
  height, width = frame.shape
  if height != width:
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    frame = cv2.copyMakeBorder(frame, top, side - height - top, left, side - width - left,
                               cv2.BORDER_CONSTANT, value=0)
  if frame.shape[0] != size:
    frame = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
  return np.ascontiguousarray(frame)


def read_video(path, max_frames: Optional[int] = 100, size: int = DEFAULT_SIZE) -> DecodedVideo:
  """Reads the first `max_frames` frames (None: all) of an AVI/MP4 as uint8 (T, size, size) gray.

  Returns a DecodedVideo, i.e. `(frames, fps)`; fps is the container's, or DEFAULT_FPS (with
  `fps_from_container=False`) when the container reports 0/NaN. Raises VideoReadError for a missing file,
  a file OpenCV cannot open or decode, or a video without frames.
  """
  if max_frames is not None and max_frames < 1:
    raise ValueError(f'max_frames must be >= 1 or None, got {max_frames}')
  path = os.fspath(path)
  if not os.path.exists(path):
    raise VideoReadError(path, 'file not found')
  if not os.path.isfile(path):
    raise VideoReadError(path, 'not a regular file')
  if os.path.getsize(path) == 0:
    raise VideoReadError(path, 'empty file')
  try:
    return _decode(path, max_frames, size)
  except cv2.error as e:   # an OpenCV failure on a bad file must not stop a whole dataset build
    raise VideoReadError(path, f'OpenCV error: {e.err or e}') from None


def _decode(path: str, max_frames: Optional[int], size: int) -> DecodedVideo:
  capture = cv2.VideoCapture(path)
  try:
    if not capture.isOpened():
      raise VideoReadError(path, 'cannot open (corrupt or unsupported container/codec)')
    fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
    fps_from_container = math.isfinite(fps) and fps > 0
    frames = []
    source_shape = None
    truncated = False
    while True:
      ok, frame = capture.read()
      if not ok or frame is None:
        break
      if max_frames is not None and len(frames) == max_frames:
        truncated = True
        break
      source_shape = source_shape or tuple(frame.shape[:2])
      try:
        frames.append(to_square_gray(frame, size))
      except ValueError as e:
        raise VideoReadError(path, f'frame {len(frames)}: {e}') from None
  finally:
    capture.release()
  if not frames:
    raise VideoReadError(path, 'no decodable frames')
  return DecodedVideo(np.stack(frames), fps if fps_from_container else DEFAULT_FPS,
                      fps_from_container=fps_from_container, source_shape=source_shape,
                      truncated=truncated)


def write_video(path, frames: np.ndarray, fps: float) -> None:
  """Writes uint8 gray frames (T, H, W) as 3 identical channels: `.avi` → MJPG (as the seed data), `.mp4` →
  mp4v. T may be 0 (an empty container, for tests). Raises OSError when OpenCV has no encoder for it."""
  frames = np.asarray(frames)
  if frames.ndim == 4 and frames.shape[-1] == 1:
    frames = frames[..., 0]
  if frames.dtype != np.uint8 or frames.ndim != 3:
    raise ValueError(f'expected uint8 (T, H, W) frames, got {frames.dtype} {frames.shape}')
  if not (math.isfinite(fps) and fps > 0):
    raise ValueError(f'fps must be a positive number, got {fps}')
  path = os.fspath(path)
  extension = os.path.splitext(path)[1].lower()
  if extension not in _FOURCC_BY_EXTENSION:
    raise ValueError(f'{path}: unsupported extension {extension!r} (use {sorted(_FOURCC_BY_EXTENSION)})')
  height, width = frames.shape[1:]
  writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*_FOURCC_BY_EXTENSION[extension]), float(fps),
                           (width, height), True)
  try:
    if not writer.isOpened():
      raise OSError(f'{path}: OpenCV cannot open a {_FOURCC_BY_EXTENSION[extension]} writer here')
    for frame in frames:
      writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
  finally:
    writer.release()
