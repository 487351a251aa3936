"""Temporal statistics of echo cines inside the imaging sector: frame correlation vs time lag (ms), the
frame-order cue 1 − MAD(lag 1)/MAD(lag 2) and the speckle-tracking correlation, on a real cine (pydicom's
SonoSite test file, 30 fps, through the project's DICOM converter) and on synthetic_echo videos (2.0.0, 1.0.0;
the first video of train studies 0..N-1). Prints the curves and writes docs/temporal_correlation.png: the
calibration behind synthetic_echo 2.0.0.

  python scripts/temporal_stats.py [--videos 32] [--out docs/temporal_correlation.png]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Optional, Tuple

import cv2
import numpy as np

from echojax.data import synthetic

LAGS_MS = tuple(k * 1000 / 30 for k in range(1, 16))   # the real cine's lags: 33.3 … 500 ms


def sector(video: np.ndarray) -> np.ndarray:
  """Boolean (H, W): convex hull of the pixels non-zero in any frame (a converted cine is zero outside its
  fan, a synthetic one exactly so), so dark tissue and blood inside the fan count."""
  pts = cv2.findNonZero((video.max(0) > 0).astype(np.uint8))
  mask = np.zeros(video.shape[1:], np.uint8)
  if pts is not None:
    cv2.fillConvexPoly(mask, cv2.convexHull(pts), 1)
  return mask.astype(bool)


def pair_correlations(video: np.ndarray, mask: Optional[np.ndarray] = None) -> list:
  """[lag k-1] → (T-k,) Pearson correlations inside the sector of every frame pair k frames apart."""
  mask = sector(video) if mask is None else mask
  x = video[:, mask].astype(np.float64)
  x -= x.mean(1, keepdims=True)
  x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
  gram = x @ x.T
  return [np.diagonal(gram, k) for k in range(1, len(video))]


def correlation_curve(video: np.ndarray, fps: float, lags_ms=LAGS_MS,
                      mask: Optional[np.ndarray] = None) -> np.ndarray:
  """Mean frame correlation at each lag in ms (linear between frame lags; NaN beyond the video)."""
  per_lag = np.array([c.mean() for c in pair_correlations(video, mask)])
  lag_ms = np.arange(1, len(video)) * 1000.0 / fps
  lags_ms = np.asarray(lags_ms, np.float64)
  curve = np.interp(lags_ms, lag_ms, per_lag)
  curve[(lags_ms > lag_ms[-1] * 1.001) | (lags_ms < lag_ms[0] * 0.999)] = np.nan   # not measurable
  return curve


def order_cue(video: np.ndarray, mask: Optional[np.ndarray] = None) -> float:
  """1 − MAD(lag 1)/MAD(lag 2) inside the sector: 0 when frames change independently, > 0 when they drift."""
  mask = sector(video) if mask is None else mask
  x = video[:, mask].astype(np.float32)
  return float(1 - np.abs(x[1:] - x[:-1]).mean() / max(np.abs(x[2:] - x[:-2]).mean(), 1e-12))


def tracking_correlation(video: np.ndarray, lag: int = 1, block: int = 8, search: int = 4,
                         min_level: float = 60) -> float:
  """Mean peak normalised cross-correlation of bright 8×8 blocks searched ±4 px in the frame `lag` later:
  what speckle tracking relies on (high when speckle moves with the tissue, low when it is redrawn)."""
  peaks = []
  size = video.shape[1]
  for t in range(0, len(video) - lag, 2):
    a, b = video[t].astype(np.float32), video[t + lag].astype(np.float32)
    for y in range(search, size - block - search, block):
      for x in range(search, size - block - search, block):
        patch = a[y:y + block, x:x + block]
        if patch.mean() >= min_level and patch.std() > 2:
          window = b[y - search:y + block + search, x - search:x + block + search]
          peaks.append(cv2.matchTemplate(window, patch, cv2.TM_CCOEFF_NORMED).max())
  return float(np.mean(peaks)) if peaks else float('nan')


def real_cine() -> Optional[Tuple[np.ndarray, float]]:
  """(uint8 (T, 112, 112), fps) of pydicom's `examples_ybr_color.dcm` (a real SonoSite cine), or None when
  that file is not installed. Converted as any DICOM input (sector masked, cropped, 112²) when the project's
  converter takes it, else read with pydicom directly; no header value but the frame rate is used."""
  try:
    from pydicom.data import get_testdata_file
    path = get_testdata_file('examples_ybr_color.dcm', download=False)
  except Exception:  # pylint: disable=broad-except  (pydicom missing or its test data not shipped)
    return None
  if not path or not os.path.exists(str(path)):
    return None
  try:
    import secrets
    from echojax.data import dicom
    video, metadata = dicom.convert_one(path, salt=secrets.token_urlsafe(24), min_frames=2)
    return video, float(metadata['fps'])
  except Exception:  # pylint: disable=broad-except  (the converter's API or checks changed)
    return _read_cine_directly(path)


def _read_cine_directly(path) -> Tuple[np.ndarray, float]:
  """pydicom frames → luma → the fan (convex hull of pixels that change) cropped, squared, 112² (area)."""
  import pydicom
  ds = pydicom.dcmread(path)
  frames = ds.pixel_array                                         # (T, H, W, 3) RGB
  gray = np.stack([cv2.cvtColor(np.ascontiguousarray(f), cv2.COLOR_RGB2GRAY) for f in frames])
  moving = (gray.std(0) > 2).astype(np.uint8)
  mask = np.zeros_like(moving)
  cv2.fillConvexPoly(mask, cv2.convexHull(cv2.findNonZero(moving)), 1)
  x, y, w, h = cv2.boundingRect(mask)
  side = max(w, h)
  square = np.zeros((len(gray), side, side), np.uint8)
  square[:, :h, :w] = (gray * mask)[:, y:y + h, x:x + w]
  video = np.stack([cv2.resize(f, (112, 112), interpolation=cv2.INTER_AREA) for f in square])
  return video, 1000.0 / float(ds.FrameTime)


def synthetic_videos(count: int, version: str, *, seed: int = 0, split: str = 'train', fps: Optional[float] = None):
  """(video, fps) of the first video of studies 0..count-1 of a synthetic_echo split (`fps` overrides the
  drawn frame rate, everything else as the dataset)."""
  for index in range(count):
    latents = synthetic.sample_study(synthetic.study_seed(seed, split, index))
    vseed = synthetic.video_seed(seed, split, index, 0)
    acq = synthetic.video_acquisition(latents, vseed)
    if fps:
      acq = dataclasses.replace(acq, fps=float(fps))
    yield synthetic.render_video(latents, vseed, acquisition=acq, version=version)


def summarise(videos) -> dict:
  """Curves (N, L), order cues and tracking correlations (at ≈ 33 ms) of (video, fps) pairs."""
  curves, cues, tracks = [], [], []
  for video, fps in videos:
    curves.append(correlation_curve(video, fps))
    cues.append(order_cue(video))
    tracks.append(tracking_correlation(video, lag=max(1, int(round(fps / 30)))))
  return dict(curves=np.array(curves), cue=float(np.mean(cues)), track=float(np.nanmean(tracks)))


def plot(path: str, real: Optional[dict], synthetic: dict) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  lags = np.asarray(LAGS_MS)
  if real is not None:
    ax.fill_between(lags, real['p10'], real['p90'], color='black', alpha=0.12, lw=0,
                    label='real: 10–90 % over start frames')
    ax.plot(lags, real['mean'], 'k-o', ms=3, label=f'real cine, 30 fps (order cue {real["cue"]:.2f})')
  styles = {'2.0.0': ('tab:blue', '-'), '1.0.0': ('tab:red', '--')}
  for version, stats in synthetic.items():
    color, style = styles.get(version, ('tab:gray', ':'))
    mean, sd = np.nanmean(stats['curves'], 0), np.nanstd(stats['curves'], 0)
    ax.plot(lags, mean, style, color=color, label=f'synthetic_echo {version}, {len(stats["curves"])} videos '
            f'30–80 fps (order cue {stats["cue"]:.2f})')
    ax.fill_between(lags, mean - sd, mean + sd, color=color, alpha=0.15, lw=0)
  ax.set_xlabel('time lag (ms)')
  ax.set_ylabel('frame correlation inside the sector')
  ax.set_xlim(0, lags[-1] + 10)
  ax.set_ylim(0.5, 1.0)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, loc='lower left')
  ax.set_title('Frame-to-frame correlation vs time lag (synthetic ± sd over videos)', fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=130)
  plt.close(fig)


def real_summary(video: np.ndarray, fps: float) -> dict:
  pairs = pair_correlations(video)
  lag_ms = np.arange(1, len(video)) * 1000.0 / fps
  quantile = lambda q: np.interp(LAGS_MS, lag_ms, [np.percentile(c, q) for c in pairs])
  return dict(mean=correlation_curve(video, fps), p10=quantile(10), p90=quantile(90), cue=order_cue(video),
              track=tracking_correlation(video, lag=max(1, int(round(fps / 30)))))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--videos', type=int, default=32, help='synthetic videos per generator version')
  parser.add_argument('--versions', default='2.0.0,1.0.0')
  parser.add_argument('--out', default='docs/temporal_correlation.png')
  args = parser.parse_args(argv)

  cine = real_cine()
  real = None if cine is None else real_summary(*cine)
  synthetic = {v: summarise(synthetic_videos(args.videos, v)) for v in args.versions.split(',') if v}
  print('frame correlation inside the sector vs lag (ms)')
  header = ['lag_ms'] + (['real', 'real_p10', 'real_p90'] if real else []) + [
      f'syn_{v}{s}' for v in synthetic for s in ('', '_sd')]
  print(' '.join(f'{h:>12}' for h in header))
  for i, lag in enumerate(LAGS_MS):
    row = [lag] + ([real['mean'][i], real['p10'][i], real['p90'][i]] if real else [])
    for stats in synthetic.values():
      row += [np.nanmean(stats['curves'][:, i]), np.nanstd(stats['curves'][:, i])]
    print(' '.join(f'{x:12.3f}' for x in row))
  if real is None:
    print('real cine: pydicom test file examples_ybr_color.dcm not available; synthetic only')
  else:
    print(f'real cine: order cue 1-MAD1/MAD2 {real["cue"]:.3f}, speckle-tracking correlation {real["track"]:.3f}')
  for version, stats in synthetic.items():
    print(f'synthetic_echo {version}: order cue {stats["cue"]:.3f}, speckle-tracking correlation '
          f'{stats["track"]:.3f}')
  plot(args.out, real, synthetic)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
