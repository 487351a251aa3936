"""The per-video record schema shared by every echojax TFDS builder.

A record is one video (uint8 grayscale T×112×112×1) plus its study's identity and labels. Records of one
study are written contiguously (builders set `disable_shuffling=True` and yield study by study) and carry
`study_index`/`study_num_videos`/`video_index`, which is what the multi-instance pipeline groups on.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

FRAME_SIZE = 112
MAX_VIDEOS_PER_STUDY = 1023  # the pipeline packs (study_index, n_videos) into one int64 key
AV_STENOSIS_NAMES = ('none', 'mild', 'moderate', 'severe', 'unknown')
# Spellings seen in the wild (the seed paper's CSVs: None/Mild/Moderate/Severe, "Sclerosis without Stenosis").
# A blank cell is not a grade: tables must say "unknown" or map blanks explicitly (label_csv.make_label_map).
AV_STENOSIS_ALIASES = {
    'none': 'none', 'no': 'none', 'normal': 'none', 'sclerosis without stenosis': 'none',
    'sclerosis': 'none', 'mild': 'mild', 'moderate': 'moderate', 'severe': 'severe', 'unknown': 'unknown',
}


def normalize_av_stenosis(value: Any) -> Optional[str]:
  """Maps a raw AS grade to one of AV_STENOSIS_NAMES; None when the value is not recognised (blank included)."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return None
  return AV_STENOSIS_ALIASES.get(' '.join(str(value).lower().split()))


def severe_as_label(grade: str) -> int:
  """Binary study label: 1 severe, 0 none/mild/moderate, -1 unknown (excluded from supervised tasks)."""
  return {'severe': 1, 'unknown': -1}.get(grade, 0)


def video_features(extra: Optional[Mapping[str, Any]] = None) -> tfds.features.FeaturesDict:
  """FeaturesDict of a per-video record; `extra` adds builder-specific labels (e.g. EF, LVH calipers)."""
  spec = {
      # One PNG per frame: the pipeline reads frames encoded and decodes only the sampled clip.
      'video': tfds.features.Video(shape=(None, FRAME_SIZE, FRAME_SIZE, 1), encoding_format='png'),
      'num_frames': np.int32,
      'fps': np.float32,
      'video_id': tfds.features.Text(),
      'study_id': tfds.features.Text(),
      'patient_id': tfds.features.Text(),   # '' when unknown
      'study_index': np.int64,              # ordinal of the study within its split
      'study_num_videos': np.int32,
      'video_index': np.int32,              # position of this video within its study
      'av_stenosis': tfds.features.ClassLabel(names=AV_STENOSIS_NAMES),
      'severe_as': np.int64,                # 1 / 0 / -1 unknown
      'plax_prob': np.float32,              # NaN when absent
  }
  spec.update(extra or {})
  return tfds.features.FeaturesDict(spec)


def make_record(*, video: np.ndarray, fps: float, video_id: str, study_id: str, study_index: int,
                study_num_videos: int, video_index: int, av_stenosis: str = 'unknown',
                patient_id: str = '', plax_prob: float = float('nan'), **extra) -> dict:
  """Builds one record dict (validates the video array so a bad one fails with its id)."""
  video = np.asarray(video)
  if video.ndim == 3:
    video = video[..., None]
  if video.dtype != np.uint8 or video.shape[1:] != (FRAME_SIZE, FRAME_SIZE, 1) or video.shape[0] < 1:
    raise ValueError(f'video {video_id!r}: expected uint8 (T>=1, {FRAME_SIZE}, {FRAME_SIZE}, 1), '
                     f'got {video.dtype} {video.shape}')
  if av_stenosis not in AV_STENOSIS_NAMES:
    raise ValueError(f'video {video_id!r}: unknown av_stenosis {av_stenosis!r}')
  if not 1 <= study_num_videos <= MAX_VIDEOS_PER_STUDY:
    raise ValueError(f'study {study_id!r} has {study_num_videos} videos (max {MAX_VIDEOS_PER_STUDY})')
  record = dict(video=video, num_frames=np.int32(video.shape[0]), fps=np.float32(fps),
                video_id=video_id, study_id=study_id, patient_id=patient_id or '',
                study_index=np.int64(study_index), study_num_videos=np.int32(study_num_videos),
                video_index=np.int32(video_index), av_stenosis=av_stenosis,
                severe_as=np.int64(severe_as_label(av_stenosis)), plax_prob=np.float32(plax_prob))
  record.update(extra)
  return record


def write_rejects(path, rejects) -> None:
  """Writes the build's rejects list (source path + reason) as CSV; an empty list still writes a header."""
  import csv
  import os
  tf.io.gfile.makedirs(os.path.dirname(os.path.abspath(str(path))))
  with tf.io.gfile.GFile(str(path), 'w') as f:
    w = csv.writer(f)
    w.writerow(['path', 'reason'])
    for p, reason in rejects:
      w.writerow([p, reason])
