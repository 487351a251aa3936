"""A tiny in-test TFDS builder (records from `echojax.data.records`) for pipeline tests and the input benchmark.

Every frame carries its identity in row 0: pixel (0,0) = CODE_BASE + global video number (1-based),
(0,1) = CODE_BASE + frame number, (0,2) = 255, (0,3) = 0 -- so per-clip min-max is an exact /255 and a test
can read back which video and which frames a clip came from (`decode_codes`).
"""
from __future__ import annotations

import os
from typing import Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds

from echojax.data import records

CODE_BASE = 10
# (study_id, frame counts of its videos, AS grade, EF of its videos (NaN = missing)).
DEFAULT_STUDIES: Tuple = (
    ('s0', (12, 30), 'severe', (55.0, 60.0)),
    ('s1', (25,), 'none', (40.0,)),
    ('s2', (10, 18, 40), 'mild', (50.0, float('nan'), 65.0)),
    ('s3', (22, 16), 'unknown', (30.0, 35.0)),
    ('s4', (35,), 'moderate', (45.0,)),
    ('s5', (14, 28, 20), 'severe', (70.0, 72.0, 68.0)),
)


def frame_pixels(video_number: int, frame_number: int, size: int = records.FRAME_SIZE,
                 realistic: bool = False) -> np.ndarray:
  """One uint8 (size, size) frame: a moving blob (or sector-masked speckle) plus the identity codes in row 0."""
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  cy = size / 2 + size / 5 * np.sin(0.3 * frame_number + video_number)
  cx = size / 2 + size / 5 * np.cos(0.2 * frame_number + 2 * video_number)
  img = 30 + 150 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * (size / 8) ** 2))
  if realistic:  # speckle inside an ultrasound-like sector, zeros outside (PNG size close to real echo frames)
    rng = np.random.default_rng(video_number * 1000 + frame_number)
    speckle = rng.gamma(2.0, 0.5, size=(size // 2, size // 2)).repeat(2, 0).repeat(2, 1)  # ~2 px grains
    img = img * speckle[:size, :size]
    angle = np.abs(np.arctan2(xx - size / 2, yy + 1))
    img[(angle > 0.75) | (np.hypot(xx - size / 2, yy) > size)] = 0
  frame = np.clip(img, 0, 254).astype(np.uint8)
  frame[0, :4] = (CODE_BASE + video_number % 240, CODE_BASE + frame_number % 240, 255, 0)
  return frame


def decode_codes(frame: np.ndarray) -> Tuple[int, int]:
  """(video_number, frame_number) read back from a float [0,1] frame (H, W[, 1]); zero padding -> negatives."""
  row = np.rint(np.asarray(frame)[0, :2].reshape(-1) * 255).astype(int)
  return int(row[0]) - CODE_BASE, int(row[1]) - CODE_BASE


class TinyEcho(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Studies of 1-3 short coded videos, one 'train' split, written study by study."""
  name = 'echojax_tiny_echo'
  VERSION = tfds.core.Version('1.0.0')

  def __init__(self, *, studies: Sequence = DEFAULT_STUDIES, realistic: bool = False, **kwargs):
    self._studies = tuple(studies)
    self._realistic = realistic
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=records.video_features({'ef': np.float32}),
                                 disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    video_number = 0
    for study_index, (study_id, lengths, grade, efs) in enumerate(self._studies):
      for video_index, (num_frames, ef) in enumerate(zip(lengths, efs)):
        video_number += 1
        video = np.stack([frame_pixels(video_number, t, realistic=self._realistic)
                          for t in range(num_frames)])
        video_id = f'{study_id}_v{video_index}'
        yield video_id, records.make_record(
            video=video, fps=50.0, video_id=video_id, study_id=study_id, study_index=study_index,
            study_num_videos=len(lengths), video_index=video_index, av_stenosis=grade,
            patient_id=f'p_{study_id}', ef=np.float32(ef))


def video_numbers(studies: Sequence = DEFAULT_STUDIES) -> dict:
  """video_id -> global video number (as coded in the frames)."""
  ids = [f'{s[0]}_v{i}' for s in studies for i in range(len(s[1]))]
  return {vid: n + 1 for n, vid in enumerate(ids)}


def make_tiny_builder(data_dir: str, studies: Sequence = DEFAULT_STUDIES, realistic: bool = False):
  """Builds (once per data_dir) and returns the tiny builder."""
  builder = TinyEcho(data_dir=os.fspath(data_dir), studies=studies, realistic=realistic)
  builder.download_and_prepare()
  return builder
