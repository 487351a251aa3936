"""Procedural PLAX-like echo cines with an aortic-stenosis cue (the generative model of `synthetic_echo`).

Pure numpy + OpenCV (no TensorFlow). Renders the study latents and per-video acquisitions drawn in
`synthetic_latents` (re-exported here): cardiac motion, heart geometry, B-mode image formation, whole studies.
Everything derives from (seed, split, study index[, video index]); the model is documented in the builder.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence, Tuple

import cv2
import numpy as np

from echojax.data.synthetic_latents import (  # noqa: F401 (public API: builders, tests and scripts use it here)
    GRADE_SEVERITY, GRADES, Acquisition, StudyLatents, sample_acquisition, sample_grade, sample_study,
    study_seed, video_seed)

FRAME_SIZE = 112
_SUB = 16                                     # cv2 sub-pixel shift=4
_REFL = dict(blood=0.002, deep=0.015, chest=0.07, myo=0.075, fibrous=0.22, pericardium=0.8, calc=1.0)
# The tissue canvas is uint8 holding sqrt(reflectivity): finer steps where echo is dark, as the eye sees it.
_POWER_OF_LEVEL = (np.arange(256, dtype=np.float32) / 255) ** 4  # echo power = reflectivity²


def _level(reflectivity: float) -> int:
  return int(round(math.sqrt(min(max(reflectivity, 0.0), 1.0)) * 255))


# ----------------------------------------------------------------------------------------------- motion
def cardiac_phase(latents: StudyLatents, acq: Acquisition) -> np.ndarray:
  """Cycle phase in [0, 1) of every frame; 0 = end-diastole, systole occupies [0, systolic_fraction)."""
  t = np.arange(acq.num_frames)
  return (acq.phase0 + t * latents.heart_rate / 60.0 / acq.fps) % 1.0


def systolic_fraction(latents: StudyLatents) -> float:
  return float(np.clip(0.3 * latents.heart_rate / 60.0 + 0.05, 0.3, 0.5))


def cycle_envelopes(latents: StudyLatents, phase: np.ndarray):
  """(LV contraction 0..1, aortic valve opening 0..1, mitral opening 0..1) at each phase."""
  s = systolic_fraction(latents)
  contraction = np.where(phase < s, 0.5 - 0.5 * np.cos(np.pi * phase / s),
                         np.where(phase < s + 0.15, 0.5 + 0.5 * np.cos(np.pi * (phase - s) / 0.15), 0.0))
  aortic = np.clip((phase - 0.03) / 0.05, 0, 1) * np.clip((s - phase) / 0.05, 0, 1)
  early = np.exp(-0.5 * ((phase - s - 0.12) / 0.06) ** 2)
  atrial = 0.7 * np.exp(-0.5 * ((phase - 0.9) / 0.04) ** 2)
  mitral = np.where(phase < s, 0.0, np.maximum(early, atrial))
  return contraction, aortic, mitral


# --------------------------------------------------------------------------------------------- geometry
def _poly(*points):
  """Polygon (T, N, 2) from N points whose coordinates are scalars or (T,) arrays."""
  cols = np.broadcast_arrays(*(np.asarray(c, np.float64) for p in points for c in p))
  return np.stack(cols, -1).reshape(cols[0].shape + (len(points), 2))


def _ellipse(cu, cv, au, av, n=20):
  a = np.linspace(0, 2 * np.pi, n, endpoint=False)
  cu, cv, au, av = (x[..., None] for x in np.broadcast_arrays(*(np.asarray(x, np.float64)
                                                                  for x in (cu, cv, au, av))))
  return np.stack([cu + au * np.cos(a), cv + av * np.sin(a)], -1)


def _segment(p0, p1, w0, w1):
  """Quadrilateral (T, 4, 2) of a tapered stroke from p0 (width w0) to p1 (width w1)."""
  d = p1 - p0
  n = np.stack([-d[..., 1], d[..., 0]], -1) / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-6)
  return np.stack([p0 + n * w0 / 2, p1 + n * w1 / 2, p1 - n * w1 / 2, p0 - n * w0 / 2], -2)


def _leaflets(lat: StudyLatents, aortic, root_dv):
  """Aortic leaflets: hinges and tips (each (T, 2, 2): [top, bottom]) in heart coordinates."""
  d, hinge_u = lat.aortic_root, 7.0
  length = lat.av_leaflet_len * d
  top = np.stack([np.full_like(root_dv, hinge_u), root_dv + 0.3], -1)
  bottom = np.stack([np.full_like(root_dv, hinge_u), root_dv + d - 0.3], -1)
  closed = np.arctan2(d / 2, -lat.av_bow)  # direction from a hinge to the coaptation point (toward the LV)
  tips = []
  for hinge, sign, asym in ((top, 1.0, 1 + lat.av_asymmetry), (bottom, -1.0, 1 - lat.av_asymmetry)):
    opening = np.clip(lat.av_opening * asym, 0.05, 0.98)
    open_angle = np.arcsin(np.clip((1 - opening) * d / 2 / length, 0, 1))
    angle = closed + (open_angle - closed) * aortic
    tips.append(hinge + length * np.stack([np.cos(angle), sign * np.sin(angle)], -1))
  return np.stack([top, bottom], 1), np.stack(tips, 1)


def _heart_layers(lat: StudyLatents, contraction, aortic, mitral, valve_gain: float):
  """[(reflectivity, polygons (T, N, 2) in heart coordinates)] in painting order."""
  cmax = lat.frac_shortening / 0.35
  delta = lat.lvid * lat.frac_shortening * contraction
  sb = 0.3 * delta                                          # septum, LV side
  st = sb - lat.septum * (1 + 0.35 * cmax * contraction)    # septum, RV side
  pt = lat.lvid - 0.7 * delta                               # posterior wall, LV side
  pb = pt + lat.posterior_wall * (1 + 0.5 * cmax * contraction)
  rv_top = -lat.septum - lat.rv
  root_dv = -2.5 * contraction                              # the root moves anteriorly in systole
  ao_t, ao_b = root_dv, root_dv + lat.aortic_root
  la_t = ao_b + 3
  la_b = la_t + lat.left_atrium * (1 + 0.08 * contraction)
  apex_taper = 0.55 * (pt - sb)  # the posterior wall converges on the septum toward the (off-sector) apex
  myo, blood = _REFL['myo'] * lat.myo_echo, _REFL['blood']
  hu, zeros = 7.0, np.zeros_like(contraction)
  layers = [
      (myo, _poly((-95, rv_top - 4), (62, rv_top - 4), (62, la_b + 2), (0, la_b + 2), (0, pb), (-35, pb),
                  (-95, pb - apex_taper))),
      (blood, _poly((-95, rv_top), (42, rv_top), (42, ao_t - 3.5), (2, ao_t - 3.5), (-2, st), (-95, st))),
      (blood, _poly((2, sb), (-95, sb), (-95, pt - apex_taper), (-35, pt), (2, pt))),
  ]
  top_edge = [(0, ao_t), (hu - 2, ao_t), (hu + 2, ao_t - 2), (hu + 12, ao_t - 2), (hu + 16, ao_t), (62, ao_t)]
  bot_edge = [(u, ao_b + (ao_t - v)) for u, v in top_edge]  # the sinus bulges mirror each other
  layers.append((_REFL['fibrous'], _poly(*top_edge, *[(u, v - 2.5) for u, v in top_edge[::-1]])))
  layers.append((blood, _ellipse(22, (la_t + la_b) / 2, 21, (la_b - la_t) / 2)))
  layers.append((blood, _poly(*top_edge, *bot_edge[::-1])))
  layers.append((_REFL['fibrous'] * 1.1, _poly(*bot_edge[1:], *[(u, v + 3) for u, v in bot_edge[:0:-1]])))
  layers.append((_REFL['pericardium'], _poly(
      (-95, pb - apex_taper), (-35, pb), (0, pb), (0, la_b), (50, la_b), (50, la_b + 2.5), (2.5, la_b + 2.5),
      (2.5, pb + 2.5), (-35, pb + 2.5), (-95, pb + 2.5 - apex_taper))))
  dao_v = np.maximum(pb, la_b) + 9
  layers += [(_REFL['fibrous'], _ellipse(4, dao_v, 7, 7, 14)), (blood, _ellipse(4, dao_v, 5.5, 5.5, 14)),
             (myo, _ellipse(0, pt, 3, 3, 10))]
  # Mitral valve: anterior leaflet hangs off the posterior aortic wall, posterior one off the annulus.
  aml_hinge = np.stack([zeros + 2, ao_b + 1.5], -1)
  aml_angle = np.deg2rad(105 + 95 * mitral)
  aml_tip = aml_hinge + 0.45 * lat.lvid * np.stack([np.cos(aml_angle), np.sin(aml_angle)], -1)
  pml_hinge = np.stack([zeros, pt], -1)
  pml_angle = np.deg2rad(-100 - 110 * mitral)
  pml_tip = pml_hinge + 0.22 * lat.lvid * np.stack([np.cos(pml_angle), np.sin(pml_angle)], -1)
  layers += [(lat.mitral_echo, _segment(aml_hinge, aml_tip, 1.6, 1.1)),
             (lat.mitral_echo, _segment(pml_hinge, pml_tip, 1.6, 1.1))]
  hinges, tips = _leaflets(lat, aortic, root_dv)
  th, av_refl = lat.av_thickness, lat.av_brightness * valve_gain
  for k in range(2):
    layers.append((av_refl, _segment(hinges[:, k], tips[:, k], 0.7 * th, th)))
    layers.append((av_refl, _ellipse(tips[:, k, 0], tips[:, k, 1], th / 2, th / 2, 8)))
  for leaflet, pos, radius in lat.av_calcium:
    c = hinges[:, leaflet] + pos * (tips[:, leaflet] - hinges[:, leaflet])
    layers.append((_REFL['calc'] * valve_gain, _ellipse(c[:, 0], c[:, 1], radius, radius, 8)))
  return layers


def _to_pixels(lat: StudyLatents, acq: Acquisition, shift: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
  """2×3 affine from heart coordinates to frame pixels (tilt, placement, zoom about the apex, jitter)."""
  def rot(deg):
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
  origin = np.array([50 + lat.heart_dx, lat.chest_wall + 11 + lat.rv + lat.septum + lat.heart_dy])
  linear = acq.zoom * rot(acq.rotation_deg) @ rot(lat.tilt_deg)
  offset = (np.array(acq.apex) + acq.zoom * rot(acq.rotation_deg) @ (origin - np.array([56.0, 0.0]))
            + np.array(acq.translate) + np.asarray(shift, np.float64))
  return np.concatenate([linear, offset[:, None]], 1)


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
  return pts @ m[:, :2].T + m[:, 2]


def aortic_leaflets(latents: StudyLatents, acq: Acquisition, frames=None, *,
                    shift: Sequence[float] = (0.0, 0.0)) -> Tuple[np.ndarray, np.ndarray]:
  """Pixel (x, y) of the aortic leaflets' hinges and tips, each (F, 2 leaflets, 2) for `frames` (None: all)."""
  frames = np.arange(acq.num_frames) if frames is None else np.atleast_1d(np.asarray(frames, int))
  if frames.size == 0 or frames.min() < 0 or frames.max() >= acq.num_frames:
    raise ValueError(f'frames {frames.tolist()} outside a video of {acq.num_frames} frames')
  contraction, aortic, _ = cycle_envelopes(latents, cardiac_phase(latents, acq)[frames])
  hinges, tips = _leaflets(latents, aortic, -2.5 * contraction)
  m = _to_pixels(latents, acq, shift)
  return _apply(m, hinges), _apply(m, tips)


def valve_box(latents: StudyLatents, acq: Acquisition, frame: Optional[int] = None, *,
              shift: Sequence[float] = (0.0, 0.0), margin: float = 1.0) -> Tuple[int, int, int, int]:
  """Pixel box (x0, y0, x1, y1), end-exclusive, around the aortic leaflets at `frame` (None: all frames)."""
  hinges, tips = aortic_leaflets(latents, acq, frame, shift=shift)
  pts = np.concatenate([hinges, tips], 1).reshape(-1, 2)
  pad = margin + acq.zoom * max([latents.av_thickness / 2] + [r for _, _, r in latents.av_calcium])
  lo = np.clip(np.floor(pts.min(0) - pad).astype(int), 0, FRAME_SIZE)
  hi = np.clip(np.ceil(pts.max(0) + pad).astype(int) + 1, 0, FRAME_SIZE)
  return int(lo[0]), int(lo[1]), int(hi[0]), int(hi[1])


# ------------------------------------------------------------------------------------------ image model
def sector_mask(acq: Acquisition) -> np.ndarray:
  """Boolean (112, 112): inside the transducer fan."""
  y, x = np.mgrid[0:FRAME_SIZE, 0:FRAME_SIZE].astype(np.float64) + 0.5
  dx, dy = x - acq.apex[0], y - acq.apex[1]
  angle = np.degrees(np.arctan2(np.abs(dx), dy))
  return (angle <= acq.half_angle_deg) & (np.hypot(dx, dy) <= acq.sector_radius) & (dy > 0)


def _background(lat: StudyLatents, acq: Acquisition) -> np.ndarray:
  """Static uint8 reflectivity canvas: deep tissue, chest wall arcs and near-field ring-down."""
  canvas = np.full((FRAME_SIZE, FRAME_SIZE), _level(_REFL['deep']), np.uint8)
  center = tuple(int(round(c * _SUB)) for c in acq.apex)
  radius = lat.chest_wall * acq.zoom
  for r, refl, thick in ((radius, _REFL['chest'], -1), (radius * 0.45, 0.3, 1), (radius, 0.35, 1), (5, 0.5, -1)):
    axes = (int(r * _SUB), int(r * _SUB))
    cv2.ellipse(canvas, center, axes, 0, 0, 180, _level(refl), thick, cv2.LINE_AA, 4)
  return canvas


def _speckle_power(rng: np.random.Generator, acq: Acquisition) -> np.ndarray:
  """Speckle power |z|² with mean 1, (T, 112, 112) float32 (exponential, i.e. Rayleigh amplitude).

  z is a complex field of blurred uniform bytes (≈ Gaussian by the central limit; bytes are ~10× cheaper to
  draw than normals); a share of it persists over the video like tissue texture, the rest decorrelates.
  """
  t, pad, n = acq.num_frames, 3, FRAME_SIZE
  sx, sy = 0.9 * acq.speckle_size, 0.6 * acq.speckle_size  # lateral resolution is coarser than axial
  raw = np.frombuffer(rng.bytes(2 * (t + 1) * (n + 2 * pad) * n), np.uint8)
  field = raw.astype(np.float32).reshape(2 * (t + 1) * (n + 2 * pad), n)
  field -= np.float32(127.5)
  # Frames are stacked along rows, padded so the blur does not mix neighbours.
  field = cv2.GaussianBlur(field, (0, 0), sigmaX=sx, sigmaY=sy, borderType=cv2.BORDER_REFLECT)
  field = field.reshape(2, t + 1, n + 2 * pad, n)[:, :, pad:-pad]
  # OpenCV's default kernel size for float images is round(8σ+1)|1; Σw² sets the blurred field's variance.
  kx, ky = (cv2.getGaussianKernel(int(round(8 * s + 1)) | 1, s) for s in (sx, sy))
  variance = (256.0 ** 2 - 1) / 12 * float((kx ** 2).sum() * (ky ** 2).sum())
  rho = acq.speckle_persistence
  z = field[:, 1:] * np.float32(math.sqrt((1 - rho) / (2 * variance)))
  z += field[:, :1] * np.float32(math.sqrt(rho / (2 * variance)))
  power = np.square(z[0])
  power += np.square(z[1])
  return power


def render_video(latents: StudyLatents, video_rng_seed, *, acquisition: Optional[Acquisition] = None,
                 shift: Sequence[float] = (0.0, 0.0), min_frames: int = 32,
                 max_frames: int = 100) -> Tuple[np.ndarray, float]:
  """Renders one cine: (uint8 (T, 112, 112), fps). `shift` (dx, dy) px moves the heart (and its valve)
  inside a fixed sector; `acquisition` overrides the one drawn from `video_rng_seed`."""
  rng = np.random.default_rng(video_rng_seed)
  acquisition_rng = rng.spawn(1)[0]  # always spawned, so the speckle stream never depends on `acquisition`
  acq = acquisition or sample_acquisition(latents, acquisition_rng, min_frames=min_frames,
                                          max_frames=max_frames)
  contraction, aortic, mitral = cycle_envelopes(latents, cardiac_phase(latents, acq))
  m = _to_pixels(latents, acq, shift)
  layers = [(_level(refl), np.round(_apply(m, polys) * _SUB).astype(np.int32))
            for refl, polys in _heart_layers(latents, contraction, aortic, mitral, acq.valve_gain)]
  background = _background(latents, acq)
  tissue = np.empty((acq.num_frames, FRAME_SIZE, FRAME_SIZE), np.uint8)
  for t in range(acq.num_frames):
    canvas = tissue[t]
    canvas[:] = background
    for level, polys in layers:
      cv2.fillPoly(canvas, [polys[t]], level, cv2.LINE_AA, 4)
  power = _speckle_power(rng, acq)
  y, x = np.mgrid[0:FRAME_SIZE, 0:FRAME_SIZE].astype(np.float32)
  depth = np.hypot(x - acq.apex[0], y - acq.apex[1]) / FRAME_SIZE
  gain = np.float32(acq.gain ** 2) * np.exp(-2 * acq.attenuation * depth).astype(np.float32)
  power *= np.take(_POWER_OF_LEVEL, tissue)
  power *= gain
  power += np.float32(acq.noise ** 2)  # electronic noise floor
  # B-mode log compression: the top `dynamic_range` dB span black..white (10·log10 of power).
  display = cv2.log(power.reshape(-1, FRAME_SIZE)).reshape(power.shape)
  display *= np.float32(10 / math.log(10) * 255 / acq.dynamic_range)
  display += np.float32(255)
  np.clip(display, 0, 255, out=display)
  video = display.astype(np.uint8)
  video *= sector_mask(acq)
  return video, acq.fps


def video_acquisition(latents: StudyLatents, video_rng_seed, *, min_frames: int = 32,
                      max_frames: int = 100) -> Acquisition:
  """The acquisition `render_video(latents, video_rng_seed)` uses (for valve boxes, plax_prob, ...)."""
  rng = np.random.default_rng(video_rng_seed)
  return sample_acquisition(latents, rng.spawn(1)[0], min_frames=min_frames, max_frames=max_frames)


class SyntheticVideo(tuple):
  """(video_id, video uint8 (T,112,112), fps); `.acquisition` carries the video's nuisances."""

  def __new__(cls, video_id: str, video: np.ndarray, fps: float, acquisition: Acquisition):
    self = super().__new__(cls, (video_id, video, fps))
    self.acquisition = acquisition
    return self


class SyntheticStudy(tuple):
  """(study_id, grade, [SyntheticVideo, ...]); `.latents` carries the study's latents."""

  def __new__(cls, study_id: str, grade: str, videos: list, latents: StudyLatents):
    self = super().__new__(cls, (study_id, grade, videos))
    self.latents = latents
    return self


def study_id_for(split: str, index: int) -> str:
  return f'syn-{split}-{index:05d}'


def render_study(seed: int, split: str, index: int, *, difficulty: float = 0.5, severe_fraction: float = 0.22,
                 min_frames: int = 32, max_frames: int = 100) -> SyntheticStudy:
  """Study `index` of `split`: its latents and every rendered video (a pure function of its arguments)."""
  latents = sample_study(study_seed(seed, split, index), difficulty=difficulty,
                         severe_fraction=severe_fraction)
  study_id = study_id_for(split, index)
  videos = []
  for v in range(latents.num_videos):
    vseed = video_seed(seed, split, index, v)
    acq = video_acquisition(latents, vseed, min_frames=min_frames, max_frames=max_frames)
    video, fps = render_video(latents, vseed, acquisition=acq)
    videos.append(SyntheticVideo(f'{study_id}_{v}', video, fps, acq))
  return SyntheticStudy(study_id, latents.grade, videos, latents)


def generate_split(split: str, num_studies: int, seed: int = 0, difficulty: float = 0.5,
                   severe_fraction: float = 0.22, *, min_frames: int = 32, max_frames: int = 100,
                   start: int = 0) -> Iterator[SyntheticStudy]:
  """Yields studies `start .. num_studies-1` of a split in order, each with its rendered videos."""
  for index in range(start, num_studies):
    yield render_study(seed, split, index, difficulty=difficulty, severe_fraction=severe_fraction,
                       min_frames=min_frames, max_frames=max_frames)


def encode_png(video: np.ndarray) -> list:
  """One lossless PNG per frame (OpenCV is ~4× faster than TFDS's TF-graph encoder; same decoded pixels)."""
  return [cv2.imencode('.png', frame, [cv2.IMWRITE_PNG_COMPRESSION, 3])[1].tobytes() for frame in video]


def render_study_for_records(task: Tuple) -> dict:
  """Process-pool worker of the TFDS builder: (seed, split, index, kwargs) → picklable study + PNG frames."""
  seed, split, index, kwargs = task
  study = render_study(seed, split, index, **kwargs)
  return dict(study_id=study[0], grade=study[1], latents=study.latents, videos=[
      dict(video_id=v[0], video=v[1], png=encode_png(v[1]), fps=v[2], acquisition=v.acquisition,
           valve_box=valve_box(study.latents, v.acquisition)) for v in study[2]])
