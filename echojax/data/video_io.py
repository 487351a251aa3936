"""Reads echo videos (AVI/MP4 via OpenCV) as uint8 grayscale T×size×size arrays, and writes test videos.

Only cv2 and numpy: the TFDS builders and the DICOM converter call these, and problems surface as
`VideoReadError(path, reason)` so a builder can skip the file and list it in its rejects. With `checks`
(VideoChecks) a read also verifies what a build must not take silently: files that are no video
container, truncation (fewer decodable frames than the container lists), too few frames, implausible fps.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, Optional

import cv2
import numpy as np

# Used when the container reports no frame rate (0 or NaN); the result's `fps_from_container` says so.
# 30 fps is a middle value for echo cines (EchoNet-Dynamic spans about 38-73, many exports 25-30).
DEFAULT_FPS = 30.0
DEFAULT_SIZE = 112
_FOURCC_BY_EXTENSION = {'.avi': 'MJPG', '.mp4': 'mp4v'}
# Colour test: a frame is colour when over 1 % of its pixels have channels more than 24 levels apart (grey
# stored as 3 channels comes back from MJPG within ~3 levels); every 8th kept frame is tested.
_COLOUR_SPREAD, _COLOUR_FRACTION, _COLOUR_STRIDE = 24, 0.01, 8


@dataclasses.dataclass(frozen=True)
class VideoChecks:
  """What a build rejects. fps limits: no echo cine is recorded outside them (high-frame-rate echo reaches
  a few hundred fps), so such a value is a broken header; 16 frames match the DICOM converter's minimum."""
  min_frames: int = 16                  # decodable frames in the whole file
  min_fps: float = 5.0
  max_fps: float = 500.0
  min_decoded_fraction: float = 0.9     # decodable / the container's frame count; below: truncated, rejected

  def __post_init__(self):
    if not isinstance(self.min_frames, int) or isinstance(self.min_frames, bool) or self.min_frames < 1:
      raise ValueError(f'min_frames must be a positive integer, got {self.min_frames!r}')
    if not 0 < self.min_fps < self.max_fps:
      raise ValueError(f'need 0 < min_fps < max_fps, got {self.min_fps!r}, {self.max_fps!r}')
    if not 0.0 <= self.min_decoded_fraction <= 1.0:
      raise ValueError(f'min_decoded_fraction must be in [0, 1], got {self.min_decoded_fraction!r}')

  def to_dict(self) -> Dict[str, Any]:
    return dataclasses.asdict(self)


def sniff_container(path: str) -> Optional[str]:
  """None for a file that starts like a video container (AVI, MP4/MOV, Matroska/WebM, MPEG, ASF, FLV), else
  what it looks like ('PNG image', ...), so a still or a document renamed .avi is rejected, not decoded."""
  with open(path, 'rb') as f:
    head = f.read(132)
  if head[:4] == b'RIFF' and head[8:11] == b'AVI':
    return None
  mp4_box = head[4:8] in (b'ftyp', b'moov', b'mdat', b'free', b'wide', b'skip')
  other = head[:4] in (b'\x1a\x45\xdf\xa3', b'\x00\x00\x01\xba', b'\x00\x00\x01\xb3', b'\x30\x26\xb2\x75')
  if mp4_box or other or head[:3] == b'FLV':   # Matroska, MPEG-PS/ES, ASF, FLV
    return None
  known = [(b'\x89PNG', 'PNG image'), (b'\xff\xd8\xff', 'JPEG image'), (b'GIF8', 'GIF image'),
           (b'%PDF', 'PDF document'), (b'PK\x03\x04', 'ZIP archive'), (b'BM', 'BMP image'),
           (b'II*\x00', 'TIFF image'), (b'MM\x00*', 'TIFF image')]
  for magic, kind in known:
    if head.startswith(magic):
      return kind
  if head[128:132] == b'DICM':
    return 'DICOM file (convert it with echojax.data.convert_dicom)'
  return 'unrecognised content'


class VideoReadError(Exception):
  """A video that cannot be used; `reason` is a short human string (e.g. 'file not found')."""

  def __init__(self, path, reason: str):
    self.path = os.fspath(path)
    self.reason = reason
    super().__init__(f'{self.path}: {reason}')


class DecodedVideo(tuple):
  """`(frames, fps)` pair (so `frames, fps = read_video(p)` works) with details as attributes.

  Attributes: frames (uint8 T×size×size), fps, fps_from_container (False when DEFAULT_FPS was used),
  source_shape ((H, W) of the stored frames), truncated (True when frames were dropped by max_frames),
  colour (the stored frames were colour; converted to gray), and, read with checks: source_frames (decodable
  frames in the file), frames_missing (the container lists this many more frames than could be decoded).
  """

  def __new__(cls, frames: np.ndarray, fps: float, *, fps_from_container: bool,
              source_shape: tuple, truncated: bool, colour: bool = False,
              source_frames: Optional[int] = None, frames_missing: int = 0):
    self = super().__new__(cls, (frames, fps))
    self.fps_from_container = fps_from_container
    self.source_shape = source_shape
    self.truncated = truncated
    self.colour = colour
    self.source_frames = source_frames
    self.frames_missing = frames_missing
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


def read_video(path, max_frames: Optional[int] = 100, size: int = DEFAULT_SIZE,
               checks: Optional[VideoChecks] = None) -> DecodedVideo:
  """Reads the first `max_frames` frames (None: all) of an AVI/MP4 as uint8 (T, size, size) gray.

  Returns a DecodedVideo, i.e. `(frames, fps)`; fps is the container's, or DEFAULT_FPS (with
  `fps_from_container=False`) when the container reports 0/NaN. Raises VideoReadError for a missing file,
  one that is no video container, one OpenCV cannot open or decode, or a video without frames; with
  `checks`, also for a truncated file, too few frames or an fps outside the limits (the rest of the file is
  then read, frames counted, to compare with the container's frame count).
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
    looks_like = sniff_container(path)
    if looks_like:
      raise VideoReadError(path, f'not a video file ({looks_like})')
    return _decode(path, max_frames, size, checks)
  except cv2.error as e:   # an OpenCV failure on a bad file must not stop a whole dataset build
    raise VideoReadError(path, f'OpenCV error: {e.err or e}') from None
  except (OSError, MemoryError) as e:
    raise VideoReadError(path, f'read failed: {type(e).__name__}') from None


def is_colour(frame: np.ndarray) -> bool:
  if frame.ndim != 3 or frame.shape[2] < 3:
    return False
  b, g, r = frame[..., 0], frame[..., 1], frame[..., 2]
  spread = cv2.max(cv2.max(cv2.absdiff(b, g), cv2.absdiff(g, r)), cv2.absdiff(b, r))
  return np.count_nonzero(spread > _COLOUR_SPREAD) > _COLOUR_FRACTION * spread.size


def _decode(path: str, max_frames: Optional[int], size: int, checks: Optional[VideoChecks]) -> DecodedVideo:
  capture = cv2.VideoCapture(path)
  try:
    if not capture.isOpened():
      raise VideoReadError(path, 'cannot open (corrupt or unsupported container/codec)')
    fps = float(capture.get(cv2.CAP_PROP_FPS) or 0.0)
    fps_from_container = math.isfinite(fps) and fps > 0
    listed = float(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0.0)
    frames = []
    source_shape = None
    truncated = colour = False
    while True:
      ok, frame = capture.read()
      if not ok or frame is None:
        break
      if max_frames is not None and len(frames) == max_frames:
        truncated = True
        break
      source_shape = source_shape or tuple(frame.shape[:2])
      if len(frames) % _COLOUR_STRIDE == 0 and not colour:
        colour = is_colour(frame)
      try:
        frames.append(to_square_gray(frame, size))
      except ValueError as e:
        raise VideoReadError(path, f'frame {len(frames)}: {e}') from None
    decodable = len(frames) + truncated
    if checks is not None and truncated:
      while capture.grab():   # count the rest: only then does a cut-off end show
        decodable += 1
  finally:
    capture.release()
  if not frames:
    raise VideoReadError(path, 'no decodable frames')
  missing = 0
  if checks is not None:
    listed = int(listed) if math.isfinite(listed) and listed > 0 else 0
    missing = max(0, listed - decodable)
    if missing and decodable < checks.min_decoded_fraction * listed:
      raise VideoReadError(path, f'truncated: {decodable} of the {listed} frames the container lists are '
                                 'decodable')
    if decodable < checks.min_frames:
      raise VideoReadError(path, f'too short: {decodable} frame(s) (min_frames {checks.min_frames})')
    if fps_from_container and not checks.min_fps <= fps <= checks.max_fps:
      raise VideoReadError(path, f'frame rate {fps:g} fps outside [{checks.min_fps:g}, {checks.max_fps:g}]')
  return DecodedVideo(np.stack(frames), fps if fps_from_container else DEFAULT_FPS,
                      fps_from_container=fps_from_container, source_shape=source_shape,
                      truncated=truncated, colour=colour,
                      source_frames=decodable if checks is not None else None, frames_missing=missing)


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
