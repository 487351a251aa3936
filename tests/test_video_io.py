"""Tests of echojax.data.video_io: AVI/MP4 round trips, gray conversion, pad+resize, fps, read errors, and the
build checks (non-video files, truncation, too few frames, implausible fps, colour)."""
import os

import cv2
import numpy as np
import pytest

from echojax.data import video_io


def _smooth_frames(num_frames, height, width, seed=0):
  """Blurred random frames: MJPG keeps these within a few grey levels (pure noise it would not)."""
  rng = np.random.default_rng(seed)
  frames = rng.integers(0, 256, (num_frames, height, width)).astype(np.uint8)
  return np.stack([cv2.GaussianBlur(f, (9, 9), 3) for f in frames])


def test_avi_round_trip_keeps_shape_fps_and_values(tmp_path):
  frames = _smooth_frames(20, 112, 112)
  path = tmp_path / 'a.avi'
  video_io.write_video(path, frames, fps=25)
  decoded = video_io.read_video(path)
  got, fps = decoded   # unpacks as (frames, fps)
  assert got.dtype == np.uint8 and got.shape == (20, 112, 112)
  assert fps == pytest.approx(25.0)
  assert decoded.fps_from_container and not decoded.truncated and decoded.source_shape == (112, 112)
  assert np.abs(got.astype(int) - frames).mean() < 3.0


def test_three_identical_channels_come_back_as_that_channel():
  rng = np.random.default_rng(1)
  gray = rng.integers(0, 256, (40, 112), dtype=np.uint8)
  frame = np.stack([gray] * 3, axis=-1)
  np.testing.assert_array_equal(video_io.to_square_gray(frame, 112)[36:76], gray)  # centred in the pad


def test_non_square_video_is_padded_centred_then_resized(tmp_path):
  frames = np.full((6, 64, 80), 200, np.uint8)   # 80 wide: 8 rows of zeros above and below after padding
  path = tmp_path / 'wide.avi'
  video_io.write_video(path, frames, fps=30)
  got = video_io.read_video(path, size=112)
  assert got.frames.shape == (6, 112, 112)
  assert got.source_shape == (64, 80)
  # the 8/80 pad becomes ~11 rows of 112: top and bottom stay black, the middle bright, columns full
  assert got.frames[:, :9].max() < 20 and got.frames[:, -9:].max() < 20
  assert np.abs(got.frames[:, 20:92].astype(int) - 200).max() < 6
  assert got.frames[:, 56, :].min() > 190


def test_resize_of_larger_square_video_matches_inter_area(tmp_path):
  frames = _smooth_frames(4, 224, 224, seed=2)
  path = tmp_path / 'big.avi'
  video_io.write_video(path, frames, fps=50)
  got = video_io.read_video(path)
  expected = np.stack([cv2.resize(f, (112, 112), interpolation=cv2.INTER_AREA) for f in frames])
  assert got.frames.shape == (4, 112, 112)
  assert np.abs(got.frames.astype(int) - expected).mean() < 3.0


def test_max_frames_caps_and_marks_truncation(tmp_path):
  path = tmp_path / 'long.avi'
  video_io.write_video(path, _smooth_frames(12, 32, 32), fps=10)
  got = video_io.read_video(path, max_frames=5, size=16)
  assert got.frames.shape == (5, 16, 16) and got.truncated
  assert not video_io.read_video(path, max_frames=12, size=16).truncated
  assert video_io.read_video(path, max_frames=None, size=16).frames.shape[0] == 12
  with pytest.raises(ValueError, match='max_frames'):
    video_io.read_video(path, max_frames=0)


def test_mp4_round_trip(tmp_path):
  path = tmp_path / 'a.mp4'
  frames = _smooth_frames(10, 112, 112, seed=3)
  try:
    video_io.write_video(path, frames, fps=12.5)
  except OSError as e:
    pytest.skip(f'OpenCV here cannot write mp4v: {e}')
  got, fps = video_io.read_video(path)
  assert got.shape == (10, 112, 112) and fps == pytest.approx(12.5)
  assert np.abs(got.astype(int) - frames).mean() < 6.0


def test_default_fps_when_container_has_none(tmp_path, monkeypatch):
  path = tmp_path / 'a.avi'
  video_io.write_video(path, _smooth_frames(3, 32, 32), fps=25)
  real_capture = cv2.VideoCapture

  class NoFpsCapture:
    """Delegates to a real capture (subclassing the cv2 type crashes the interpreter at GC)."""

    def __init__(self, *args):
      self._capture = real_capture(*args)

    def get(self, prop):
      return float('nan') if prop == cv2.CAP_PROP_FPS else self._capture.get(prop)

    def __getattr__(self, name):
      return getattr(self._capture, name)

  monkeypatch.setattr(video_io.cv2, 'VideoCapture', NoFpsCapture)
  got = video_io.read_video(path, size=32)
  assert got.fps == video_io.DEFAULT_FPS and not got.fps_from_container


@pytest.mark.parametrize('make, reason', [
    (lambda p: None, 'file not found'),
    (lambda p: p.write_bytes(b''), 'empty file'),
    (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4000)), 'not a video file (unrecognised content)'),
    (lambda p: p.write_bytes(b'RIFF\x00\x00\x00\x00AVI LIST' + bytes(4000)), 'cannot open'),
    (lambda p: video_io.write_video(p, np.zeros((0, 32, 32), np.uint8), fps=25), 'no decodable frames'),
    (lambda p: p.mkdir(), 'not a regular file'),
])
def test_bad_files_raise_video_read_error_with_reason(tmp_path, make, reason):
  path = tmp_path / 'bad.avi'
  make(path)
  with pytest.raises(video_io.VideoReadError) as info:
    video_io.read_video(path)
  assert info.value.path == os.fspath(path) and reason in info.value.reason
  assert os.fspath(path) in str(info.value)


def test_write_video_rejects_bad_input(tmp_path):
  with pytest.raises(ValueError, match='uint8'):
    video_io.write_video(tmp_path / 'a.avi', np.zeros((2, 8, 8), np.float32), fps=25)
  with pytest.raises(ValueError, match='fps'):
    video_io.write_video(tmp_path / 'a.avi', np.zeros((2, 8, 8), np.uint8), fps=0)
  with pytest.raises(ValueError, match='extension'):
    video_io.write_video(tmp_path / 'a.mkv', np.zeros((2, 8, 8), np.uint8), fps=25)


def test_opencv_errors_become_video_read_errors(tmp_path, monkeypatch):
  path = tmp_path / 'a.avi'
  video_io.write_video(path, np.zeros((2, 16, 16), np.uint8), fps=25)

  def failing_capture(*args):
    raise cv2.error('decoder exploded')

  monkeypatch.setattr(video_io.cv2, 'VideoCapture', failing_capture)
  with pytest.raises(video_io.VideoReadError, match='OpenCV error: .*decoder exploded'):
    video_io.read_video(path)


# ---------------------------------------------------------------------------------------------------------
# Build checks (VideoChecks)

CHECKS = video_io.VideoChecks()


def _write(path, num_frames=40, fps=25.0, size=32):
  video_io.write_video(path, _smooth_frames(num_frames, size, size), fps=fps)
  return path


def test_checked_read_counts_every_frame_but_keeps_max_frames(tmp_path):
  got = video_io.read_video(_write(tmp_path / 'a.avi'), max_frames=10, size=32, checks=CHECKS)
  assert got.frames.shape == (10, 32, 32) and got.truncated
  assert got.source_frames == 40 and got.frames_missing == 0 and not got.colour
  assert video_io.read_video(tmp_path / 'a.avi', max_frames=10, size=32).source_frames is None


def test_half_truncated_avi_is_rejected_and_a_small_loss_is_flagged(tmp_path):
  data = _write(tmp_path / 'a.avi').read_bytes()
  (tmp_path / 'half.avi').write_bytes(data[:len(data) // 2])
  with pytest.raises(video_io.VideoReadError, match=r'truncated: \d+ of the 40 frames'):
    video_io.read_video(tmp_path / 'half.avi', max_frames=10, checks=CHECKS)   # the cut is after frame 10
  assert video_io.read_video(tmp_path / 'half.avi', max_frames=10).frames.shape[0] == 10   # unchecked: as before
  frame_bytes = len(data) // 40
  (tmp_path / 'short.avi').write_bytes(data[:len(data) - 2 * frame_bytes])
  got = video_io.read_video(tmp_path / 'short.avi', checks=CHECKS)
  assert 1 <= got.frames_missing <= 3 and got.source_frames + got.frames_missing == 40


def test_files_that_are_no_video_are_rejected_by_content(tmp_path):
  png = tmp_path / 'still.avi'
  cv2.imwrite(str(tmp_path / 'still.png'), _smooth_frames(1, 32, 32)[0])
  os.replace(tmp_path / 'still.png', png)
  with pytest.raises(video_io.VideoReadError, match=r'not a video file \(PNG image\)'):
    video_io.read_video(png)
  (tmp_path / 'doc.avi').write_bytes(b'%PDF-1.4 ...' + bytes(300))
  with pytest.raises(video_io.VideoReadError, match='PDF document'):
    video_io.read_video(tmp_path / 'doc.avi')
  (tmp_path / 'x.dcm.avi').write_bytes(bytes(128) + b'DICM' + bytes(300))
  with pytest.raises(video_io.VideoReadError, match='DICOM file'):
    video_io.read_video(tmp_path / 'x.dcm.avi')
  assert video_io.sniff_container(str(_write(tmp_path / 'ok.mp4'))) is None


@pytest.mark.parametrize('fps', [0.01, 1000.0])
def test_implausible_frame_rates_are_rejected(tmp_path, fps):
  path = _write(tmp_path / 'a.avi', num_frames=20, fps=fps)
  with pytest.raises(video_io.VideoReadError, match=f'frame rate {fps:g} fps outside \\[5, 500\\]'):
    video_io.read_video(path, checks=CHECKS)
  assert video_io.read_video(path).fps == pytest.approx(fps)   # unchecked reads still return it


def test_one_frame_and_short_videos_are_rejected(tmp_path):
  for frames in (1, 15):
    with pytest.raises(video_io.VideoReadError, match=f'too short: {frames} frame'):
      video_io.read_video(_write(tmp_path / f'{frames}.avi', num_frames=frames), checks=CHECKS)
  assert video_io.read_video(_write(tmp_path / '16.avi', num_frames=16), checks=CHECKS).source_frames == 16
  loose = video_io.VideoChecks(min_frames=1)
  assert video_io.read_video(tmp_path / '1.avi', checks=loose).frames.shape[0] == 1
  with pytest.raises(ValueError, match='min_fps < max_fps'):
    video_io.VideoChecks(min_fps=50, max_fps=10)


def test_colour_video_is_converted_and_marked(tmp_path):
  path = str(tmp_path / 'colour.avi')
  writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*'MJPG'), 25.0, (32, 32), True)
  for frame in _smooth_frames(20, 32, 32):
    bgr = np.stack([frame, frame, frame], -1)
    bgr[8:24, 8:24] = (20, 40, 230)   # a red colour-flow patch
    writer.write(bgr)
  writer.release()
  got = video_io.read_video(path, checks=CHECKS)
  assert got.colour and got.frames.ndim == 3
  assert not video_io.read_video(_write(tmp_path / 'gray.avi'), checks=CHECKS).colour
