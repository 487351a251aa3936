"""`echonet_dynamic`: TFDS builder for EchoNet-Dynamic (10,030 apical-4-chamber videos with EF/ESV/EDV).

Manual dir (the dataset as Stanford distributes it, after accepting its licence):
  FileList.csv          FileName,EF,ESV,EDV,FrameHeight,FrameWidth,FPS,NumberOfFrames,Split
  Videos/<FileName>.avi 112×112 MJPG
  VolumeTracings.csv    optional: FileName,X1,Y1,X2,Y2,Frame (two traced frames per video)
One record per video (echojax.data.records schema; each video is its own study, AS grade unknown) with extra
features ef, esv, edv (float32, NaN when empty) and traced_frames (int32 [2]: the traced frame numbers in the
order VolumeTracings.csv lists them, -1 when absent; they index the source video, so a number may be >=
num_frames when the video was cut to max_frames). Videos listed but missing, unreadable or failing the build
checks (video_io.VideoChecks: truncated, too short, implausible fps) are skipped and listed in
`<data_dir>/rejects.csv`; `build_summary.json` holds the counts (colour videos converted to gray included) and
the fingerprint of FileList.csv/VolumeTracings.csv and the options (builder_common.check_fingerprint).
Build: `python -m echojax.data.build echonet_dynamic --manual_dir=DIR --data_dir=OUT` or
`Builder(data_dir=OUT).download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=DIR))`.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import warnings
from typing import Dict, List, Optional

import numpy as np
import tensorflow_datasets as tfds

from echojax.data import builder_common, records, video_io

FILE_LIST = 'FileList.csv'
TRACINGS = 'VolumeTracings.csv'
VIDEOS_DIR = 'Videos'
REQUIRED_COLUMNS = ('FileName', 'EF', 'ESV', 'EDV', 'Split')
TRACING_COLUMNS = ('FileName', 'Frame')
SPLITS = ('train', 'val', 'test')


def video_stem(file_name: str) -> str:
  """FileName with or without '.avi' (older copies of FileList.csv include it)."""
  return file_name[:-4] if file_name.lower().endswith('.avi') else file_name


def read_tracings(path: str) -> Dict[str, List[int]]:
  """Video stem → traced frame numbers in order of first appearance."""
  frames: Dict[str, List[int]] = collections.defaultdict(list)
  for line, row in enumerate(builder_common.read_csv(path, TRACING_COLUMNS), start=2):
    try:
      frame = int(float(row['Frame']))
    except ValueError:
      raise ValueError(f'{path} line {line}, column Frame: not a frame number: {row["Frame"]!r}') from None
    stem = video_stem(row['FileName'])
    if frame not in frames[stem]:
      frames[stem].append(frame)
  return frames


@dataclasses.dataclass
class VideoEntry:
  stem: str
  split: str
  ef: float
  esv: float
  edv: float
  fps: Optional[float]          # from FileList.csv when present and positive
  traced_frames: List[int]


def read_file_list(manual_dir: str) -> Dict[str, List[VideoEntry]]:
  """FileList.csv (+ VolumeTracings.csv) → entries per split, in file order. Validates before any video."""
  path = os.path.join(manual_dir, FILE_LIST)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found (expected the EchoNet-Dynamic folder as manual_dir)')
  tracings_path = os.path.join(manual_dir, TRACINGS)
  tracings = read_tracings(tracings_path) if os.path.exists(tracings_path) else {}
  by_split: Dict[str, List[VideoEntry]] = {s: [] for s in SPLITS}
  seen = {}
  for line, row in enumerate(builder_common.read_csv(path, REQUIRED_COLUMNS), start=2):
    where = f'{path} line {line}'
    stem = video_stem(row['FileName'])
    if not stem:
      raise ValueError(f'{where}: empty FileName')
    if stem in seen:
      raise ValueError(f'{where}: FileName {stem!r} already listed on line {seen[stem]}')
    seen[stem] = line
    split = row['Split'].lower()
    if split not in SPLITS:
      raise ValueError(f'{where}, column Split: unknown value {row["Split"]!r} (expected TRAIN/VAL/TEST)')
    fps, ef, esv, edv = (builder_common.parse_float(row.get(column), f'{where}, column {column}')
                         for column in ('FPS', 'EF', 'ESV', 'EDV'))
    by_split[split].append(VideoEntry(
        stem=stem, split=split, ef=ef, esv=esv, edv=edv,
        fps=fps if math.isfinite(fps) and fps > 0 else None, traced_frames=tracings.get(stem, [])[:2]))
  return by_split


class EchoNetDynamicConfig(builder_common.MaxFramesConfig):
  """EchoNet-Dynamic config: max_frames (None keeps every frame)."""


class Builder(builder_common.ReportingBuilder, tfds.core.GeneratorBasedBuilder):
  """EchoNet-Dynamic videos as echojax per-video records with EF/ESV/EDV labels."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = builder_common.max_frames_configs(EchoNetDynamicConfig)
  DEFAULT_CONFIG_NAME = 'default'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Request EchoNet-Dynamic at https://echonet.github.io/dynamic/ and pass its unpacked folder (holding
  FileList.csv, VolumeTracings.csv and Videos/) as --manual_dir.
  """
  _summary: Dict[str, Dict[str, int]] = {}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__.split('\n')[0],
        features=records.video_features({
            'ef': np.float32, 'esv': np.float32, 'edv': np.float32,
            'traced_frames': tfds.features.Tensor(shape=(2,), dtype=np.int32),
        }),
        disable_shuffling=True,
        homepage='https://echonet.github.io/dynamic/',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    by_split = read_file_list(manual_dir)
    self._rejects, self._summary, self._flagged = [], {}, []
    return builder_common.drop_empty_splits(
        {split: self._generate_examples(manual_dir, split, entries) for split, entries in by_split.items()},
        self._rejects, listed={split: len(entries) for split, entries in by_split.items()})

  def _generate_examples(self, manual_dir: str, split: str, entries: List[VideoEntry]):
    counts = self._summary.setdefault(split, dict(listed=len(entries), kept=0, rejected=0, traced=0,
                                                  colour_converted=0, frames_missing=0))
    study_index = 0
    for entry in entries:
      path = os.path.join(manual_dir, VIDEOS_DIR, entry.stem + '.avi')
      try:
        decoded = video_io.read_video(path, max_frames=self.builder_config.max_frames,
                                     checks=self.video_checks)
      except video_io.VideoReadError as e:
        warnings.warn(f'echonet_dynamic: skipping {path}: {e.reason}')
        self._rejects.append((path, f'{e.reason} [{split}]'))
        counts['rejected'] += 1
        continue
      traced = (entry.traced_frames + [-1, -1])[:2]
      note = builder_common.count_video_flags(counts, decoded)
      if note:
        self._flagged.append((path, f'{note} [{split}]'))
      counts['kept'] += 1
      counts['traced'] += len(entry.traced_frames) == 2
      yield entry.stem, records.make_record(
          video=decoded.frames, fps=entry.fps or decoded.fps, video_id=entry.stem, study_id=entry.stem,
          study_index=study_index, study_num_videos=1, video_index=0, av_stenosis='unknown',
          ef=np.float32(entry.ef), esv=np.float32(entry.esv), edv=np.float32(entry.edv),
          traced_frames=np.asarray(traced, np.int32))
      study_index += 1

  def _build_summary(self):
    return {'splits': self._summary, 'rejected': len(self._rejects), 'max_frames': self.builder_config.max_frames,
            'video_checks': self.video_checks.to_dict(), 'flagged': self._flagged}

  def fingerprint_parts(self, manual_dir):
    tables = [t for t in (FILE_LIST, TRACINGS) if os.path.exists(os.path.join(manual_dir, t))]
    return {'tables': {t: builder_common.file_sha256(os.path.join(manual_dir, t)) for t in tables},
            'options': {'max_frames': self.builder_config.max_frames, **self.video_checks.to_dict()}}
