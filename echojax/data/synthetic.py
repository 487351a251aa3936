"""Procedural PLAX-like echo cines with an aortic-stenosis cue (the generative model of `synthetic_echo`).

Pure numpy + OpenCV (no TensorFlow). Renders the study latents and per-video acquisitions drawn in
`synthetic_latents` (re-exported here) with the anatomy of `synthetic_anatomy`: cardiac cycle, valve boxes,
B-mode image formation, whole studies. Two generator versions: 1.x (speckle partly frozen in the image, partly
redrawn each frame) and 2.x (speckle locked to the moving tissue, `synthetic_motion`). Everything derives from
(seed, split, study index[, video index]) and the version; the model is documented in the builder.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence, Tuple

import cv2
import numpy as np

from echojax.data import synthetic_motion
from echojax.data.synthetic_anatomy import REFL, apply_affine, heart_layers, leaflets, to_pixels, wall_positions
from echojax.data.synthetic_latents import (  # noqa: F401 (public API: builders, tests and scripts use it here)
    GRADE_SEVERITY, GRADES, Acquisition, Motion, StudyLatents, sample_acquisition, sample_grade, sample_motion,
    sample_study, study_seed, video_seed)

FRAME_SIZE = 112
GENERATOR_VERSIONS = ('1.0.0', '2.0.0')
LATEST_VERSION = GENERATOR_VERSIONS[-1]
_SUB = 16                                     # cv2 sub-pixel shift=4
# The tissue canvas is uint8 holding sqrt(reflectivity): finer steps where echo is dark, as the eye sees it.
_POWER_OF_LEVEL = (np.arange(256, dtype=np.float32) / 255) ** 4  # echo power = reflectivity²
_DISPLAY_SMOOTH = 0.85  # 2.x: σ (px) of the resampling blur of the log image, calibrated on a real cine


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


def aortic_leaflets(latents: StudyLatents, acq: Acquisition, frames=None, *,
                    shift: Sequence[float] = (0.0, 0.0),
                    motion: Optional[Motion] = None) -> Tuple[np.ndarray, np.ndarray]:
  """Pixel (x, y) of the aortic leaflets' hinges and tips, each (F, 2 leaflets, 2) for `frames` (None: all).
  `motion` (2.x videos) adds the base descent and drift of the 2.x generator."""
  frames = np.arange(acq.num_frames) if frames is None else np.atleast_1d(np.asarray(frames, int))
  if frames.size == 0 or frames.min() < 0 or frames.max() >= acq.num_frames:
    raise ValueError(f'frames {frames.tolist()} outside a video of {acq.num_frames} frames')
  contraction, aortic, _ = cycle_envelopes(latents, cardiac_phase(latents, acq)[frames])
  hinges, tips = leaflets(latents, aortic, -2.5 * contraction)
  m = to_pixels(latents, acq, shift)
  if motion is None:
    return apply_affine(m, hinges), apply_affine(m, tips)
  descent, moved = motion.base_descent * contraction, synthetic_motion.drift(acq, motion)[frames][:, None]
  return (apply_affine(m, synthetic_motion.descend(hinges, descent)) + moved,
          apply_affine(m, synthetic_motion.descend(tips, descent)) + moved)


def valve_boxes(latents: StudyLatents, acq: Acquisition, frames=None, *, shift: Sequence[float] = (0.0, 0.0),
                margin: float = 1.0, motion: Optional[Motion] = None) -> np.ndarray:
  """int (F, 4) pixel boxes (x0, y0, x1, y1), end-exclusive, around the aortic leaflets at each of `frames`
  (None: all); pass the video's `motion` for 2.x videos (`SyntheticVideo.motion`)."""
  hinges, tips = aortic_leaflets(latents, acq, frames, shift=shift, motion=motion)
  pts = np.concatenate([hinges, tips], 1)                                   # (F, 4, 2)
  pad = margin + acq.zoom * max([latents.av_thickness / 2] + [r for _, _, r in latents.av_calcium])
  lo = np.clip(np.floor(pts.min(1) - pad).astype(int), 0, FRAME_SIZE)
  hi = np.clip(np.ceil(pts.max(1) + pad).astype(int) + 1, 0, FRAME_SIZE)
  return np.concatenate([lo, hi], 1)


def valve_box(latents: StudyLatents, acq: Acquisition, frame: Optional[int] = None, *,
              shift: Sequence[float] = (0.0, 0.0), margin: float = 1.0,
              motion: Optional[Motion] = None) -> Tuple[int, int, int, int]:
  """Pixel box (x0, y0, x1, y1), end-exclusive, around the aortic leaflets at `frame` (None: the union over
  all frames); pass the video's `motion` for 2.x videos."""
  return union_box(valve_boxes(latents, acq, frame, shift=shift, margin=margin, motion=motion))


def union_box(boxes: np.ndarray) -> Tuple[int, int, int, int]:
  """The smallest (x0, y0, x1, y1) box holding every box of an (F, 4) array."""
  return (int(boxes[:, 0].min()), int(boxes[:, 1].min()), int(boxes[:, 2].max()), int(boxes[:, 3].max()))


# ------------------------------------------------------------------------------------------ image model
def sector_mask(acq: Acquisition) -> np.ndarray:
  """Boolean (112, 112): inside the transducer fan."""
  y, x = np.mgrid[0:FRAME_SIZE, 0:FRAME_SIZE].astype(np.float64) + 0.5
  dx, dy = x - acq.apex[0], y - acq.apex[1]
  angle = np.degrees(np.arctan2(np.abs(dx), dy))
  return (angle <= acq.half_angle_deg) & (np.hypot(dx, dy) <= acq.sector_radius) & (dy > 0)


def _background(lat: StudyLatents, acq: Acquisition) -> np.ndarray:
  """Static uint8 reflectivity canvas: deep tissue, chest wall arcs and near-field ring-down."""
  canvas = np.full((FRAME_SIZE, FRAME_SIZE), _level(REFL['deep']), np.uint8)
  center = tuple(int(round(c * _SUB)) for c in acq.apex)
  radius = lat.chest_wall * acq.zoom
  for r, refl, thick in ((radius, REFL['chest'], -1), (radius * 0.45, 0.3, 1), (radius, 0.35, 1), (5, 0.5, -1)):
    axes = (int(r * _SUB), int(r * _SUB))
    cv2.ellipse(canvas, center, axes, 0, 0, 180, _level(refl), thick, cv2.LINE_AA, 4)
  return canvas


def _speckle_sigmas(acq: Acquisition) -> Tuple[float, float]:
  return 0.9 * acq.speckle_size, 0.6 * acq.speckle_size  # lateral resolution is coarser than axial


def _speckle_power(rng: np.random.Generator, acq: Acquisition) -> np.ndarray:
  """1.x speckle power |z|² with mean 1, (T, 112, 112) float32 (exponential, i.e. Rayleigh amplitude).

  z is a complex field of blurred uniform bytes; a share of it persists over the video fixed in the image,
  the rest is redrawn every frame.
  """
  t, n = acq.num_frames, FRAME_SIZE
  field, variance = synthetic_motion.blurred_fields(rng, 2 * (t + 1), n, n, *_speckle_sigmas(acq))
  field = field.reshape(2, t + 1, n, n)
  rho = acq.speckle_persistence
  z = field[:, 1:] * np.float32(math.sqrt((1 - rho) / (2 * variance)))
  z += field[:, :1] * np.float32(math.sqrt(rho / (2 * variance)))
  power = np.square(z[0])
  power += np.square(z[1])
  return power


def _locked_speckle_power(rng: np.random.Generator, latents: StudyLatents, acq: Acquisition, motion: Motion,
                          m: np.ndarray, contraction: np.ndarray, descent: np.ndarray,
                          shifts: np.ndarray) -> np.ndarray:
  """2.x speckle power: scatterers advected with the tissue (`synthetic_motion`); inside the heart they
  decorrelate at a rate per second that rises with the wall's speed (out-of-plane motion)."""
  rest = np.zeros(1)
  # Motion is only needed where it is seen: blocks within ~a block of the sector.
  near_sector = cv2.dilate(sector_mask(acq).astype(np.uint8), np.ones((9, 9), np.uint8))[1::4, 1::4] > 0
  displacement = synthetic_motion.material_displacement(
      wall_positions(latents, contraction), wall_positions(latents, rest), descent, shifts, m, near_sector)
  outline = heart_layers(latents, rest, rest, rest, 1.0)[0][1][0]   # the heart's outer outline at rest
  speed = synthetic_motion.contraction_speed(lambda p: cycle_envelopes(latents, p % 1.0)[0],
                                             cardiac_phase(latents, acq), latents.heart_rate)
  rate = motion.decorrelation_rate + motion.motion_decorrelation * speed   # 1/s
  return synthetic_motion.tissue_locked_power(rng, displacement, apply_affine(m, outline), np.exp(-rate / acq.fps),
                                              motion.thermal_noise, _speckle_sigmas(acq))


def _paint_tissue(latents: StudyLatents, acq: Acquisition, layers) -> np.ndarray:
  """uint8 (T, 112, 112) reflectivity canvases: the static background, then the heart's layers."""
  background = _background(latents, acq)
  tissue = np.empty((acq.num_frames, FRAME_SIZE, FRAME_SIZE), np.uint8)
  for t in range(acq.num_frames):
    canvas = tissue[t]
    canvas[:] = background
    for level, polys in layers:
      cv2.fillPoly(canvas, [polys[t]], level, cv2.LINE_AA, 4)
  return tissue


def _b_mode(power: np.ndarray, tissue: np.ndarray, acq: Acquisition, *, psf: Optional[Sequence[float]] = None,
            smooth: float = 0.0) -> np.ndarray:
  """Speckle power × echo power × gain/attenuation + noise floor → log-compressed uint8 inside the sector.
  2.x: `psf` (σx, σy) blurs the echo power map (tissue edges are as sharp as the beam, not the polygon) and
  `smooth` (σ px) the log image (the scan-converted, resampled 112² image of a real cine is smoother)."""
  y, x = np.mgrid[0:FRAME_SIZE, 0:FRAME_SIZE].astype(np.float32)
  depth = np.hypot(x - acq.apex[0], y - acq.apex[1]) / FRAME_SIZE
  gain = np.float32(acq.gain ** 2) * np.exp(-2 * acq.attenuation * depth).astype(np.float32)
  echo = np.take(_POWER_OF_LEVEL, tissue)
  if psf is not None:
    echo = synthetic_motion.blur_frames(echo, *psf)
  power *= echo
  power *= gain
  power += np.float32(acq.noise ** 2)  # electronic noise floor
  # B-mode log compression: the top `dynamic_range` dB span black..white (10·log10 of power).
  display = cv2.log(power.reshape(-1, FRAME_SIZE)).reshape(power.shape)
  display *= np.float32(10 / math.log(10) * 255 / acq.dynamic_range)
  display += np.float32(255)
  if smooth:
    display = synthetic_motion.blur_frames(display, smooth, smooth)
  np.clip(display, 0, 255, out=display)
  video = display.astype(np.uint8)
  video *= sector_mask(acq)
  return video


def _check_version(version: str) -> int:
  if version not in GENERATOR_VERSIONS:
    raise ValueError(f'unknown synthetic_echo generator version {version!r}; one of {GENERATOR_VERSIONS}')
  return int(version.split('.')[0])


def render_video(latents: StudyLatents, video_rng_seed, *, acquisition: Optional[Acquisition] = None,
                 shift: Sequence[float] = (0.0, 0.0), min_frames: int = 32, max_frames: int = 100,
                 version: str = LATEST_VERSION, motion: Optional[Motion] = None) -> Tuple[np.ndarray, float]:
  """Renders one cine: (uint8 (T, 112, 112), fps). `shift` (dx, dy) px moves the heart (and its valve)
  inside a fixed sector; `acquisition` (and, 2.x, `motion`) override those drawn from `video_rng_seed`."""
  major = _check_version(version)
  rng = np.random.default_rng(video_rng_seed)
  # Always spawned, so the speckle stream never depends on `acquisition`; spawn(2)[0] is spawn(1)[0].
  acquisition_rng, motion_rng = rng.spawn(2) if major >= 2 else (rng.spawn(1)[0], None)
  acq = acquisition or sample_acquisition(latents, acquisition_rng, min_frames=min_frames,
                                          max_frames=max_frames)
  contraction, aortic, mitral = cycle_envelopes(latents, cardiac_phase(latents, acq))
  m = to_pixels(latents, acq, shift)
  layers = heart_layers(latents, contraction, aortic, mitral, acq.valve_gain)
  if major == 1:
    tissue = _paint_tissue(latents, acq, [(_level(refl), np.round(apply_affine(m, polys) * _SUB).astype(np.int32))
                                          for refl, polys in layers])
    return _b_mode(_speckle_power(rng, acq), tissue, acq), acq.fps
  motion = motion or sample_motion(latents, motion_rng)
  descent, shifts = motion.base_descent * contraction, synthetic_motion.drift(acq, motion)
  tissue = _paint_tissue(latents, acq, [
      (_level(refl), np.round((apply_affine(m, synthetic_motion.descend(polys, descent)) + shifts[:, None]) * _SUB)
       .astype(np.int32)) for refl, polys in layers])
  power = _locked_speckle_power(rng, latents, acq, motion, m, contraction, descent, shifts)
  return _b_mode(power, tissue, acq, psf=_speckle_sigmas(acq), smooth=_DISPLAY_SMOOTH), acq.fps


def video_acquisition(latents: StudyLatents, video_rng_seed, *, min_frames: int = 32,
                      max_frames: int = 100) -> Acquisition:
  """The acquisition `render_video(latents, video_rng_seed)` uses (for valve boxes, plax_prob, ...)."""
  rng = np.random.default_rng(video_rng_seed)
  return sample_acquisition(latents, rng.spawn(1)[0], min_frames=min_frames, max_frames=max_frames)


def video_motion(latents: StudyLatents, video_rng_seed) -> Motion:
  """The tissue motion a 2.x `render_video(latents, video_rng_seed)` uses."""
  return sample_motion(latents, np.random.default_rng(video_rng_seed).spawn(2)[1])


class SyntheticVideo(tuple):
  """(video_id, video uint8 (T,112,112), fps); `.acquisition` carries the video's nuisances and `.motion`
  its tissue motion (None for 1.x videos)."""

  def __new__(cls, video_id: str, video: np.ndarray, fps: float, acquisition: Acquisition,
              motion: Optional[Motion] = None):
    self = super().__new__(cls, (video_id, video, fps))
    self.acquisition = acquisition
    self.motion = motion
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
                 min_frames: int = 32, max_frames: int = 100, version: str = LATEST_VERSION) -> SyntheticStudy:
  """Study `index` of `split`: its latents and every rendered video (a pure function of its arguments)."""
  major = _check_version(version)
  latents = sample_study(study_seed(seed, split, index), difficulty=difficulty,
                         severe_fraction=severe_fraction)
  study_id = study_id_for(split, index)
  videos = []
  for v in range(latents.num_videos):
    vseed = video_seed(seed, split, index, v)
    acq = video_acquisition(latents, vseed, min_frames=min_frames, max_frames=max_frames)
    motion = video_motion(latents, vseed) if major >= 2 else None
    video, fps = render_video(latents, vseed, acquisition=acq, version=version, motion=motion)
    videos.append(SyntheticVideo(f'{study_id}_{v}', video, fps, acq, motion))
  return SyntheticStudy(study_id, latents.grade, videos, latents)


def generate_split(split: str, num_studies: int, seed: int = 0, difficulty: float = 0.5,
                   severe_fraction: float = 0.22, *, min_frames: int = 32, max_frames: int = 100,
                   start: int = 0, version: str = LATEST_VERSION) -> Iterator[SyntheticStudy]:
  """Yields studies `start .. num_studies-1` of a split in order, each with its rendered videos."""
  for index in range(start, num_studies):
    yield render_study(seed, split, index, difficulty=difficulty, severe_fraction=severe_fraction,
                       min_frames=min_frames, max_frames=max_frames, version=version)


def encode_png(video: np.ndarray) -> list:
  """One lossless PNG per frame (OpenCV is ~4× faster than TFDS's TF-graph encoder; same decoded pixels)."""
  return [cv2.imencode('.png', frame, [cv2.IMWRITE_PNG_COMPRESSION, 3])[1].tobytes() for frame in video]


def render_study_for_records(task: Tuple) -> dict:
  """Process-pool worker of the TFDS builder: (seed, split, index, kwargs) → picklable study + PNG frames.
  Each video carries its whole-video valve box and (2.x) its per-frame boxes."""
  seed, split, index, kwargs = task
  study = render_study(seed, split, index, **kwargs)
  videos = []
  for v in study[2]:
    boxes = valve_boxes(study.latents, v.acquisition, motion=v.motion).astype(np.int32)
    videos.append(dict(video_id=v[0], video=v[1], png=encode_png(v[1]), fps=v[2], acquisition=v.acquisition,
                       valve_box=union_box(boxes), valve_boxes=boxes))
  return dict(study_id=study[0], grade=study[1], latents=study.latents, videos=videos)
