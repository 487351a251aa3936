"""Checks on validated studies before any video is decoded: which videos a build keeps (label map's
"exclude", view filtering by `view` column / `plax_prob`), and split leakage — a study, patient or video
file in two splits, where one file is recognised through symlinks, hard links and byte-identical copies.
"""
from __future__ import annotations

import collections
import dataclasses
import os
import warnings
from typing import Dict, Iterable, List, Mapping, Optional, Sequence

from echojax.data import builder_common, label_csv

_MAX_LISTED = 20


@dataclasses.dataclass(frozen=True)
class VideoEntry:
  path: str        # resolved path to open
  fpath: str       # as written in the table
  video_num: str
  plax_prob: float
  source: str      # '<table>:<line>' for messages
  fps_is_default: Optional[bool] = None   # known from the source (DICOM timing); None: ask the container
  view: str = ''   # the table's `view` cell ('' when absent)


@dataclasses.dataclass
class Study:
  study_id: str
  patient_id: str
  av_stenosis: str   # a records.AV_STENOSIS_NAMES grade, or label_csv.EXCLUDE
  videos: List[VideoEntry]


class SplitStudies(dict):
  """{split: [Study]} plus `selection`: {split: counts of what select_videos left out}, and `converter`
  ({cines, without_label_row}) when the manual dir is a convert_dicom output."""
  selection: Dict[str, Dict[str, int]] = {}
  converter: Optional[Dict[str, int]] = None


def select_videos(studies: Mapping[str, List[Study]], min_plax_prob: Optional[float] = None,
                  views: Optional[Sequence[str]] = None) -> SplitStudies:
  """Drops studies labelled "exclude", then videos whose plax_prob is below `min_plax_prob` or whose view is
  not in `views`; a video without a plax_prob / view value is kept and counted as view_unknown (a table
  without view information is not emptied by a view filter). Studies left without videos are dropped."""
  wanted = None if views is None else {label_csv.label_key(v) for v in views}
  result = SplitStudies()
  result.selection = {}
  for split, split_studies in studies.items():
    counts = result.selection[split] = dict.fromkeys(
        ('studies_excluded', 'videos_dropped_view', 'videos_view_unknown', 'studies_dropped_view'), 0)
    kept_studies = []
    for study in split_studies:
      if study.av_stenosis == label_csv.EXCLUDE:
        counts['studies_excluded'] += 1
        continue
      kept = []
      for video in study.videos:
        unknown = ((min_plax_prob is not None and video.plax_prob != video.plax_prob)
                   or (wanted is not None and not video.view))
        dropped = ((min_plax_prob is not None and video.plax_prob < min_plax_prob)
                   or (wanted is not None and video.view and label_csv.label_key(video.view) not in wanted))
        counts['videos_view_unknown'] += bool(unknown and not dropped)
        counts['videos_dropped_view'] += bool(dropped)
        if not dropped:
          kept.append(video)
      if kept:
        kept_studies.append(dataclasses.replace(study, videos=kept))
      else:
        counts['studies_dropped_view'] += 1
    result[split] = kept_studies
  return result


def file_identities(paths: Iterable[str]) -> Dict[str, str]:
  """path → identity shared by every path to the same content: the resolved path, the inode (hard links),
  and, for files of equal size with different inodes, the sha256 (copies). Missing files: their path."""
  paths = list(dict.fromkeys(paths))
  identity = {p: os.path.normpath(os.path.realpath(p)) for p in paths}
  by_size = collections.defaultdict(list)
  for path in paths:
    try:
      stat = os.stat(path)
    except OSError:
      continue
    identity[path] = f'inode {stat.st_dev}:{stat.st_ino}'
    by_size[stat.st_size].append(path)
  for group in by_size.values():
    if len({identity[p] for p in group}) > 1:   # only equal sizes can be copies: hash just those
      for path in group:
        identity[path] = 'sha256 ' + builder_common.file_sha256(path)
  return identity


def _listing(items) -> str:
  items = list(items)
  shown = ', '.join(str(i) for i in items[:_MAX_LISTED])
  return shown + (f' ... ({len(items)} in all)' if len(items) > _MAX_LISTED else '')


def check_leakage(studies: Mapping[str, List[Study]], allow_cross_split_studies: bool = False,
                  hint: str = 'set "allow_cross_split_studies": true in echo_studies.json to allow it') -> None:
  """Within a split, one video file (same path, link or copy) listed twice is an error; across splits, a
  shared study id, patient id or video file is an error (`hint`: how to fix or allow it) unless
  `allow_cross_split_studies` (then a warning)."""
  identity = file_identities(v.path for s in studies.values() for study in s for v in study.videos)
  paths_of = collections.defaultdict(set)
  for path, key in identity.items():
    paths_of[key].add(path)
  errors = []
  splits_of = {'study id': collections.defaultdict(set), 'patient id': collections.defaultdict(set),
               'video file': collections.defaultdict(set)}
  for split, split_studies in studies.items():
    listed = collections.Counter(identity[v.path] for s in split_studies for v in s.videos)
    doubled = [' = '.join(sorted(paths_of[k])) for k, n in listed.items() if n > 1]
    if doubled:
      errors.append(f'  {split}: video file listed more than once (same path, a link or a byte-identical '
                    f'copy): {_listing(doubled)}')
    for study in split_studies:
      splits_of['study id'][study.study_id].add(split)
      if study.patient_id:
        splits_of['patient id'][study.patient_id].add(split)
      for video in study.videos:
        splits_of['video file'][identity[video.path]].add(split)
  if errors:
    raise ValueError('invalid label tables:\n' + '\n'.join(errors))
  shared = []
  for kind, splits_by_id in splits_of.items():
    name = (lambda k: ' = '.join(sorted(paths_of[k]))) if kind == 'video file' else str
    leaked = [f'{name(i)} {sorted(s)}' for i, s in splits_by_id.items() if len(s) > 1]
    if leaked:
      extra = ' (the same file, a link or a byte-identical copy)' if kind == 'video file' else ''
      shared.append(f'  {kind}s in several splits{extra}: {_listing(leaked)}')
  if not shared:
    return
  message = 'split leakage:\n' + '\n'.join(shared)
  if not allow_cross_split_studies:
    raise ValueError(message + f'\n({hint})')
  warnings.warn(message + '\n(allowed by allow_cross_split_studies)', stacklevel=3)
