"""`echonet_lvh`: TFDS builder for EchoNet-LVH (≈12,000 parasternal long-axis videos with caliper measurements).

Manual dir (the dataset as Stanford distributes it):
  MeasurementsList.csv   one row per caliper measurement: HashedFileName, Calc (IVSd, LVIDd, LVPWd, IVSs,
                         LVIDs, LVPWs), CalcValue, Frame, X1, X2, Y1, Y2, Frames, FPS, Width, Height, split
  Batch1/ … Batch4/      <HashedFileName>.avi at native resolution (read as 112×112: zero-padded to square,
                         INTER_AREA)
One record per video (echojax.data.records schema; each video its own study, AS unknown), measurements
pivoted per video: float32 features ivsd, lvidd, lvpwd, ivss, lvids, lvpws (NaN when absent) and int32
<calc>_frame (the measured frame of the source video, -1 when absent). The PLAX pretraining corpus. Videos
listed but missing from every Batch folder, unreadable or failing the build checks (video_io.VideoChecks) go
to `<data_dir>/rejects.csv`; duplicate and unknown measurements are counted in `build_summary.json`, which
also holds the fingerprint of MeasurementsList.csv and the options.
Build: `python -m echojax.data.build echonet_lvh --manual_dir=DIR --data_dir=OUT`.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
import re
import warnings
from typing import Dict, List, Optional

import numpy as np
import tensorflow_datasets as tfds

from echojax.data import builder_common, records, video_io

MEASUREMENTS = 'MeasurementsList.csv'
REQUIRED_COLUMNS = ('HashedFileName', 'Calc', 'CalcValue', 'Frame', 'split')
CALCS = ('IVSd', 'LVIDd', 'LVPWd', 'IVSs', 'LVIDs', 'LVPWs')
SPLITS = ('train', 'val', 'test')
BATCH_DIR = re.compile(r'^batch\d+$', re.IGNORECASE)


@dataclasses.dataclass
class LVHVideo:
  name: str
  split: str
  fps: Optional[float] = None
  values: Dict[str, float] = dataclasses.field(default_factory=dict)
  frames: Dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Measurements:
  by_split: Dict[str, List[LVHVideo]]
  duplicates: int = 0                       # a Calc measured twice on one video (first kept)
  unknown_calcs: Dict[str, int] = dataclasses.field(default_factory=dict)


def read_measurements(manual_dir: str) -> Measurements:
  """MeasurementsList.csv → one LVHVideo per HashedFileName, per split, in file order (validated first)."""
  path = os.path.join(manual_dir, MEASUREMENTS)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found (expected the EchoNet-LVH folder as manual_dir)')
  videos: Dict[str, LVHVideo] = {}
  result = Measurements(by_split={s: [] for s in SPLITS})
  unknown = collections.Counter()
  for line, row in enumerate(builder_common.read_csv(path, REQUIRED_COLUMNS), start=2):
    where = f'{path} line {line}'
    name = row['HashedFileName']
    if name.lower().endswith('.avi'):
      name = name[:-4]
    if not name:
      raise ValueError(f'{where}: empty HashedFileName')
    split = row['split'].lower()
    if split not in SPLITS:
      raise ValueError(f'{where}, column split: unknown value {row["split"]!r} (expected train/val/test)')
    video = videos.get(name)
    if video is None:
      video = videos[name] = LVHVideo(name=name, split=split)
      result.by_split[split].append(video)
    elif video.split != split:
      raise ValueError(f'{where}: {name} is in split {split!r} here but {video.split!r} on an earlier line')
    fps = builder_common.parse_float(row.get('FPS'), f'{where}, column FPS')
    if video.fps is None and math.isfinite(fps) and fps > 0:
      video.fps = fps
    calc = row['Calc']
    if calc not in CALCS:
      unknown[calc] += 1
      continue
    if calc in video.values:
      result.duplicates += 1
      continue
    video.values[calc] = builder_common.parse_float(row['CalcValue'], f'{where}, column CalcValue')
    frame = builder_common.parse_float(row['Frame'], f'{where}, column Frame')
    video.frames[calc] = int(frame) if math.isfinite(frame) else -1
  result.unknown_calcs = dict(unknown)
  if unknown:
    warnings.warn(f'echonet_lvh: measurements with unknown Calc ignored: {dict(unknown)}')
  return result


def index_batches(manual_dir: str) -> Dict[str, str]:
  """<name> → path of <name>.avi over every Batch<N>/ folder (the first one wins when listed twice)."""
  index = {}
  for entry in sorted(os.scandir(manual_dir), key=lambda e: e.name):
    if entry.is_dir() and BATCH_DIR.match(entry.name):
      for video in sorted(os.scandir(entry.path), key=lambda e: e.name):
        stem, ext = os.path.splitext(video.name)
        if ext.lower() == '.avi':
          index.setdefault(stem, video.path)
  return index


class EchoNetLVHConfig(builder_common.MaxFramesConfig):
  """EchoNet-LVH config: max_frames (None keeps every frame)."""


def _calc_features() -> dict:
  features = {}
  for calc in CALCS:
    features[calc.lower()] = np.float32
    features[f'{calc.lower()}_frame'] = np.int32
  return features


class Builder(builder_common.ReportingBuilder, tfds.core.GeneratorBasedBuilder):
  """EchoNet-LVH PLAX videos as echojax per-video records with their caliper measurements."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = builder_common.max_frames_configs(EchoNetLVHConfig)
  DEFAULT_CONFIG_NAME = 'default'
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Request EchoNet-LVH at https://echonet.github.io/lvh/ and pass its unpacked folder (holding
  MeasurementsList.csv and Batch1/ … Batch4/) as --manual_dir.
  """
  _summary: Dict = {}

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__.split('\n')[0],
        features=records.video_features(_calc_features()),
        disable_shuffling=True,
        homepage='https://echonet.github.io/lvh/',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    measurements = read_measurements(manual_dir)
    index = index_batches(manual_dir)
    self._rejects, self._flagged = [], []
    self._summary = {'splits': {}, 'duplicate_measurements': measurements.duplicates,
                     'unknown_calcs': measurements.unknown_calcs}
    by_split = measurements.by_split
    return builder_common.drop_empty_splits(
        {split: self._generate_examples(index, split, videos) for split, videos in by_split.items()},
        self._rejects, listed={split: len(videos) for split, videos in by_split.items()})

  def _generate_examples(self, index: Dict[str, str], split: str, videos: List[LVHVideo]):
    counts = self._summary['splits'].setdefault(split, dict(listed=len(videos), kept=0, rejected=0,
                                                            colour_converted=0, frames_missing=0))
    study_index = 0
    for video in videos:
      path = index.get(video.name)
      try:
        if path is None:
          raise video_io.VideoReadError(f'Batch*/{video.name}.avi', 'not found in any Batch folder')
        decoded = video_io.read_video(path, max_frames=self.builder_config.max_frames,
                                     checks=self.video_checks)
      except video_io.VideoReadError as e:
        warnings.warn(f'echonet_lvh: skipping {e.path}: {e.reason}')
        self._rejects.append((e.path, f'{e.reason} [{split}]'))
        counts['rejected'] += 1
        continue
      extra = {}
      for calc in CALCS:
        extra[calc.lower()] = np.float32(video.values.get(calc, float('nan')))
        extra[f'{calc.lower()}_frame'] = np.int32(video.frames.get(calc, -1))
      note = builder_common.count_video_flags(counts, decoded)
      if note:
        self._flagged.append((path, f'{note} [{split}]'))
      counts['kept'] += 1
      yield video.name, records.make_record(
          video=decoded.frames, fps=video.fps or decoded.fps, video_id=video.name, study_id=video.name,
          study_index=study_index, study_num_videos=1, video_index=0, av_stenosis='unknown', **extra)
      study_index += 1

  def _build_summary(self):
    return dict(self._summary, rejected=len(self._rejects), max_frames=self.builder_config.max_frames,
                video_checks=self.video_checks.to_dict(), flagged=self._flagged)

  def fingerprint_parts(self, manual_dir):
    return {'tables': {MEASUREMENTS: builder_common.file_sha256(os.path.join(manual_dir, MEASUREMENTS))},
            'options': {'max_frames': self.builder_config.max_frames, **self.video_checks.to_dict()}}
