"""Random variables of the synthetic echo model: per-study latents (anatomy, heart rate, LV function, AS
grade and the valve appearance it drives), per-video acquisition nuisances and (2.x generator) per-video tissue
motion, each drawn from a seed that is a pure function of (seed, split, study index[, video index]). Pure
numpy; `synthetic` renders them.
"""
from __future__ import annotations

import dataclasses
import zlib
from typing import Optional, Tuple

import numpy as np

GRADES = ('none', 'mild', 'moderate', 'severe')
GRADE_SEVERITY = {'none': 0.0, 'mild': 0.35, 'moderate': 0.65, 'severe': 1.0}
_NON_SEVERE_MIX = (0.55, 0.25, 0.20)          # none / mild / moderate share of the non-severe studies
_VIDEOS_PER_STUDY_P = (0.12, 0.18, 0.25, 0.25, 0.20)  # 1..5 videos, mean ≈ 3.3 as in the paper's cohort


@dataclasses.dataclass(frozen=True)
class StudyLatents:
  """One synthetic patient/study. Lengths are in reference pixels (112² frame, zoom 1)."""
  grade: str                 # none / mild / moderate / severe
  severity: float            # continuous AS severity ≈ GRADE_SEVERITY[grade] + jitter
  difficulty: float
  num_videos: int
  heart_rate: float          # beats per minute
  frac_shortening: float     # LV function
  lvid: float                # LV internal diameter at end-diastole
  septum: float
  posterior_wall: float
  rv: float
  aortic_root: float
  left_atrium: float
  chest_wall: float
  tilt_deg: float            # long-axis tilt
  heart_dx: float
  heart_dy: float
  myo_echo: float            # myocardial reflectivity
  mitral_echo: float
  # Aortic valve: AS sets the first three (and the calcium load); all five also vary per study.
  av_opening: float          # systolic tip separation / root diameter
  av_thickness: float        # leaflet thickness (px)
  av_brightness: float       # leaflet reflectivity
  av_leaflet_len: float      # leaflet length / root diameter
  av_asymmetry: float        # top leaflet opens by (1+a), bottom by (1-a)
  av_bow: float              # closed cusps bulge toward the LV (px)
  av_calcium: Tuple[Tuple[int, float, float], ...]  # (leaflet 0/1, position along it 0..1, radius px)


@dataclasses.dataclass(frozen=True)
class Acquisition:
  """Per-video acquisition nuisances."""
  num_frames: int
  fps: float
  phase0: float              # cardiac-cycle phase at frame 0 (0 = end-diastole, systole first)
  zoom: float                # depth setting: anatomy scale about the apex
  half_angle_deg: float      # sector half-angle
  sector_radius: float
  apex: Tuple[float, float]
  rotation_deg: float
  translate: Tuple[float, float]
  gain: float
  noise: float
  dynamic_range: float      # dB shown between black and white (log compression)
  attenuation: float         # depth attenuation coefficient (per frame height)
  speckle_persistence: float  # share of speckle fixed over the video (the rest decorrelates per frame)
  speckle_size: float
  valve_gain: float          # small per-video visibility change of the valve (scan-plane jitter)
  plax_prob: float


@dataclasses.dataclass(frozen=True)
class Motion:
  """Per-video tissue motion and speckle decorrelation of the 2.x generator (lengths in reference px)."""
  base_descent: float        # systolic shift of the base (annulus, root, valves) toward the apex
  drift: Tuple[float, float]  # respiratory / probe translation amplitude (x, y) px
  drift_period_s: float
  drift_phase: float
  decorrelation_rate: float  # out-of-plane speckle decorrelation at rest (1/s)
  motion_decorrelation: float  # extra decorrelation per unit contraction speed (1/s per 1/s)
  thermal_noise: float       # weight η of independent per-frame noise in the complex echo (η² of its power)


def study_seed(seed: int, split: str, study_index: int) -> Tuple[int, ...]:
  """Entropy of one study: a pure function of (seed, split, index), so builds are parallel-safe."""
  return (int(seed), zlib.crc32(split.encode()), int(study_index), 0)


def video_seed(seed: int, split: str, study_index: int, video_index: int) -> Tuple[int, ...]:
  return (int(seed), zlib.crc32(split.encode()), int(study_index), 1 + int(video_index))


def _cue_scales(difficulty: float) -> Tuple[float, float]:
  """(how much AS moves the valve, how much the same valve quantities vary at random per study)."""
  if not 0.0 <= difficulty <= 1.0:
    raise ValueError(f'difficulty must be in [0, 1], got {difficulty}')
  return 1.0 - 0.8 * difficulty, 0.5 + difficulty


def sample_grade(rng: np.random.Generator, severe_fraction: float = 0.22) -> str:
  if not 0.0 <= severe_fraction <= 1.0:
    raise ValueError(f'severe_fraction must be in [0, 1], got {severe_fraction}')
  p = [(1 - severe_fraction) * m for m in _NON_SEVERE_MIX] + [severe_fraction]
  return GRADES[rng.choice(4, p=p)]


def sample_study(rng_seed, *, grade: Optional[str] = None, difficulty: float = 0.5,
                 severe_fraction: float = 0.22) -> StudyLatents:
  """Draws a study's latents; `grade` forces the AS grade (else ≈ severe_fraction severe)."""
  rng = np.random.default_rng(rng_seed)
  strength, nuisance = _cue_scales(difficulty)
  sampled = sample_grade(rng, severe_fraction)
  grade = sampled if grade is None else grade
  if grade not in GRADES:
    raise ValueError(f'grade must be one of {GRADES}, got {grade!r}')
  sev = float(np.clip(GRADE_SEVERITY[grade] + rng.normal(0, 0.06), 0, 1.1))
  cue = strength * sev
  # Sclerosis: calcific thickening that does not restrict opening, the confounder that makes AS subtle.
  sclerosis = nuisance * rng.beta(1.2, 3.0)
  n_calc = rng.poisson(1.5 * cue + 1.5 * sclerosis)
  calcium = tuple((int(rng.integers(2)), float(rng.uniform(0.3, 1.0)), float(rng.uniform(0.6, 1.2)))
                  for _ in range(min(n_calc, 6)))
  reduced = rng.random() < 0.15
  return StudyLatents(
      grade=grade, severity=sev, difficulty=float(difficulty),
      num_videos=int(rng.choice(5, p=_VIDEOS_PER_STUDY_P)) + 1,
      heart_rate=float(rng.uniform(55, 100)),
      frac_shortening=float(rng.uniform(0.10, 0.22) if reduced else rng.uniform(0.26, 0.42)),
      lvid=float(rng.normal(37, 4)), septum=float(np.clip(rng.normal(7.5, 1.2), 5, 12)),
      posterior_wall=float(np.clip(rng.normal(7.5, 1.2), 5, 12)), rv=float(rng.normal(17, 2.5)),
      aortic_root=float(np.clip(rng.normal(21, 2.0), 16, 26)), left_atrium=float(rng.normal(27, 3.5)),
      chest_wall=float(rng.uniform(12, 18)), tilt_deg=float(rng.normal(-6, 4)),
      heart_dx=float(rng.normal(0, 3)), heart_dy=float(rng.normal(0, 2)),
      myo_echo=float(rng.uniform(0.8, 1.2)), mitral_echo=float(rng.uniform(0.12, 0.25)),
      av_opening=float(np.clip(0.85 - 0.6 * cue + nuisance * rng.normal(0, 0.08), 0.12, 0.95)),
      av_thickness=float(np.clip(1.0 + 1.0 * cue + 0.9 * sclerosis + nuisance * rng.normal(0, 0.2), 0.7, 3.5)),
      av_brightness=float(np.clip(0.14 + 0.2 * cue + 0.2 * sclerosis + nuisance * rng.normal(0, 0.04),
                                  0.05, 1.0)),
      av_leaflet_len=float(rng.uniform(0.52, 0.62)), av_asymmetry=float(rng.normal(0, 0.15)),
      av_bow=float(rng.uniform(0.5, 3.0)), av_calcium=calcium)


def sample_acquisition(latents: StudyLatents, rng_seed, *, min_frames: int = 32,
                       max_frames: int = 100) -> Acquisition:
  """Draws one video's acquisition settings (independent of the study's anatomy)."""
  del latents  # acquisition nuisances are independent of the patient by design
  if not 1 <= min_frames <= max_frames:
    raise ValueError(f'need 1 <= min_frames <= max_frames, got {min_frames}, {max_frames}')
  rng = np.random.default_rng(rng_seed)
  return Acquisition(
      num_frames=int(rng.integers(min_frames, max_frames + 1)), fps=float(round(rng.uniform(30, 80), 2)),
      phase0=float(rng.random()), zoom=float(rng.uniform(0.9, 1.12)),
      half_angle_deg=float(rng.uniform(30, 40)), sector_radius=float(rng.uniform(104, 116)),
      apex=(float(56 + rng.normal(0, 1.5)), float(rng.uniform(-3, 1))),
      rotation_deg=float(rng.uniform(-6, 6)), translate=(float(rng.uniform(-4, 4)), float(rng.uniform(-4, 4))),
      gain=float(rng.uniform(0.75, 1.3)), noise=float(rng.uniform(0.001, 0.006)),
      dynamic_range=float(rng.uniform(40, 48)),
      attenuation=float(rng.uniform(0.3, 1.1)), speckle_persistence=float(rng.uniform(0.3, 0.75)),
      speckle_size=float(rng.uniform(0.8, 1.25)), valve_gain=float(rng.uniform(0.9, 1.1)),
      plax_prob=float(rng.uniform(0.6, 1.0)))


def sample_motion(latents: StudyLatents, rng_seed) -> Motion:
  """Draws one video's motion; the base descends in proportion to the study's LV function. The ranges are
  calibrated on a real 30 fps cine (frame correlation vs lag, order cue: scripts/temporal_stats.py)."""
  rng = np.random.default_rng(rng_seed)
  angle = rng.uniform(0, 2 * np.pi)
  amplitude = rng.uniform(0.3, 1.5)
  return Motion(
      base_descent=float(latents.frac_shortening * latents.lvid * rng.uniform(0.15, 0.25)),
      drift=(float(amplitude * np.cos(angle)), float(amplitude * np.sin(angle))),
      drift_period_s=float(rng.uniform(3.0, 5.0)), drift_phase=float(rng.random()),
      decorrelation_rate=float(rng.uniform(0.15, 0.45)), motion_decorrelation=float(rng.uniform(0.05, 0.12)),
      thermal_noise=float(rng.uniform(0.12, 0.28)))
