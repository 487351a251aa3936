"""scripts/temporal_stats.py: frame correlation vs lag in ms inside the sector, the frame-order cue and the
speckle-tracking correlation on generated videos with known answers, and on the real cine pydicom ships (the
calibration target of synthetic_echo 2.0.0; skipped when that file is not installed)."""
import cv2
import numpy as np
import pytest

from scripts import temporal_stats as ts
from tests import test_synthetic_echo as syn_tests


def _texture(rng, grain, size=160):
  texture = cv2.GaussianBlur(rng.uniform(0, 255, (size, size)).astype(np.float32), (0, 0), grain)
  return (texture - texture.mean()) / texture.std() * 40 + 128


def _translating(frames=20, step=1, seed=0, grain=1.2):
  """A speckle-like texture moving `step` px per frame inside a disc (zero outside, as a masked cine)."""
  texture = _texture(np.random.default_rng(seed), grain)
  yy, xx = np.mgrid[0:64, 0:64]
  disc = (yy - 32) ** 2 + (xx - 32) ** 2 < 30 ** 2
  video = np.stack([texture[20:84, 20 + step * t:84 + step * t] for t in range(frames)])
  return (np.clip(video, 1, 255) * disc).astype(np.uint8)


def test_sector_is_the_fan_including_its_dark_pixels():
  video = np.zeros((3, 20, 20), np.uint8)
  video[:, 5:15, 5:15] = 9
  video[:, 8:12, 8:12] = 0                  # dark blood inside the fan still counts
  mask = ts.sector(video)
  assert mask[9, 9] and mask[5, 5] and not mask[2, 2] and mask.sum() == 100


def test_correlation_curve_is_in_milliseconds():
  video = _translating(frames=24, grain=4.0)
  at_60 = ts.correlation_curve(video, 60.0, [1000 / 30, 2000 / 30])
  at_30 = ts.correlation_curve(video[::2], 30.0, [1000 / 30, 2000 / 30])
  np.testing.assert_allclose(at_60, at_30, atol=0.02)        # same motion per ms, either frame rate
  curve = ts.correlation_curve(video, 60.0)
  assert (np.diff(curve[:6]) < 0).all()                      # a moving texture decorrelates with the lag
  assert np.isnan(ts.correlation_curve(video[:5], 30.0, [500.0])).all()   # longer than the video
  assert np.isnan(ts.correlation_curve(video, 30.0, [10.0])).all()        # shorter than a frame


def test_static_and_independent_frames():
  rng = np.random.default_rng(1)
  frame = rng.integers(1, 255, (32, 32), dtype=np.uint8)
  np.testing.assert_allclose(ts.correlation_curve(np.stack([frame] * 6), 30.0, [33.4, 66.7]), 1.0)
  noise = rng.integers(1, 255, (12, 32, 32), dtype=np.uint8)
  assert np.abs(ts.correlation_curve(noise, 30.0, [1000 / 30, 100.0])).max() < 0.05
  assert abs(ts.order_cue(noise)) < 0.03                       # no order to find
  assert ts.order_cue(_translating()) > 0.2                     # frames drift: lag 1 closer than lag 2


def test_tracking_correlation_tells_locked_from_redrawn_texture():
  moving = _translating(frames=12, step=2)
  rng = np.random.default_rng(3)
  redrawn = np.stack([_translating(frames=1, seed=s)[0] for s in rng.integers(0, 1000, 12)])
  assert ts.tracking_correlation(moving, min_level=40) > 0.95
  assert ts.tracking_correlation(redrawn, min_level=40) < 0.7


@pytest.fixture(scope='module')
def real():
  cine = ts.real_cine()
  if cine is None:
    pytest.skip("pydicom's examples_ybr_color.dcm is not installed")
  return cine


def test_real_cine_statistics(real):
  video, fps = real
  assert video.shape == (30, 112, 112) and abs(fps - 30) < 0.1
  summary = ts.real_summary(video, fps)
  assert 0.95 < summary['mean'][0] < 0.99                     # ≈ 0.97 at 33 ms (the issue's ≈ 0.95)
  assert (np.diff(summary['mean'][:10]) < 0).all()             # falls smoothly
  assert 0.2 < summary['cue'] < 0.35 and summary['track'] > 0.9
  # The band test_synthetic_echo holds synthetic_echo 2.0.0 to is this cine's, as measured here.
  pairs = ts.pair_correlations(video)
  lag_ms = np.arange(1, len(video)) * 1000 / fps
  for q, band in ((10, syn_tests.REAL_P10), (90, syn_tests.REAL_P90)):
    measured = np.interp(syn_tests.REAL_LAG_MS, lag_ms, [np.percentile(c, q) for c in pairs])
    np.testing.assert_allclose(measured, band, atol=0.02)


def test_main_prints_both_curves_and_writes_the_plot(tmp_path, capsys):
  out = tmp_path / 'temporal.png'
  ts.main(['--videos', '2', '--versions', '2.0.0', '--out', str(out)])
  printed = capsys.readouterr().out
  assert out.stat().st_size > 10_000
  assert 'syn_2.0.0' in printed and 'order cue' in printed and printed.count('\n') > len(ts.LAGS_MS)
  assert 'examples_ybr_color' in printed or 'real_p10' in printed
