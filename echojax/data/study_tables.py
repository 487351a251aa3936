"""Reads and validates the label tables of a user's own echo studies (the seed paper's layout, or one row per
study keyed by accession number / StudyInstanceUID for the DICOM source) for the `echo_studies` TFDS builder.
Everything is checked before any video is opened: required columns, AS labels, duplicate rows,
studies/patients/files shared between splits. Plain `csv` (pandas is not a dependency).
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import json
import math
import os
import re
import warnings
from typing import Any, Dict, List, Mapping, Optional

from echojax.data import records

# Canonical column names (the seed paper's) plus optional patient/split columns and the DICOM source's keys.
CANONICAL_COLUMNS = ('acc_num', 'fpath', 'av_stenosis', 'video_num', 'plax_prob', 'patient_id', 'split',
                     'accession_number', 'study_instance_uid')
REQUIRED_COLUMNS = ('acc_num', 'fpath', 'av_stenosis')
# A DICOM-source label table needs one of these; a row giving both is joined on the UID (exact study).
DICOM_KEY_COLUMNS = ('study_instance_uid', 'accession_number')
SOURCES = ('videos', 'dicom')
DICOM_CONVERTER_OPTIONS = ('workers', 'min_frames', 'min_fps', 'allow_color')   # convert_dicom_folder's
SPLIT_FILES = ('train', 'val', 'test', 'ext_test')   # `<split>.csv`, read in this order
DEFAULT_SINGLE_TABLE = 'labels.csv'                    # one table with a `split` column
OPTIONS_FILE = 'echo_studies.json'
_SPLIT_ALIASES = {'validation': 'val', 'valid': 'val', 'dev': 'val'}
_SPLIT_NAME = re.compile(r'^[a-z][a-z0-9_]*$')
_MAX_LISTED = 20  # offending values listed in an error message


@dataclasses.dataclass(frozen=True)
class StudyTableOptions:
  """How to read a manual_dir. `columns` maps a CSV column name to a canonical one, e.g.
  {"study_id": "acc_num", "label": "av_stenosis", "mrn": "patient_id"}."""
  columns: Mapping[str, str] = dataclasses.field(default_factory=dict)
  max_frames: int = 100
  allow_cross_split_studies: bool = False
  labels_csv: Optional[str] = None   # a single table with a split column (default: per-split CSVs)
  videos_dir: str = 'videos'         # relative fpaths are looked up here first, then in manual_dir
  # DICOM source (echojax.data.dicom_source). source None = 'videos' unless load_options finds dicom_dir.
  source: Optional[str] = None
  dicom_dir: str = 'dicom'                     # relative to manual_dir, or absolute
  converted_dir: str = '.echojax_converted'    # conversion cache (resumable), relative to manual_dir
  dicom_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)   # DICOM_CONVERTER_OPTIONS
  salt: Optional[str] = dataclasses.field(default=None, repr=False)   # secret; never written by to_dict

  def __post_init__(self):
    unknown_targets = sorted({v for v in self.columns.values() if v not in CANONICAL_COLUMNS})
    if unknown_targets:
      raise ValueError(f'column mapping targets {unknown_targets} are not among {list(CANONICAL_COLUMNS)}')
    targets = collections.Counter(self.columns.values())
    doubled = sorted(t for t, n in targets.items() if n > 1)
    if doubled:
      raise ValueError(f'column mapping sends several columns to {doubled}')
    if not isinstance(self.max_frames, int) or isinstance(self.max_frames, bool) or self.max_frames < 1:
      raise ValueError(f'max_frames must be a positive integer, got {self.max_frames!r}')
    if not isinstance(self.allow_cross_split_studies, bool):
      raise ValueError(f'allow_cross_split_studies must be true/false, got {self.allow_cross_split_studies!r}')
    if self.source not in (None, *SOURCES):
      raise ValueError(f'source must be one of {list(SOURCES)}, got {self.source!r}')
    unknown = sorted(set(self.dicom_options) - set(DICOM_CONVERTER_OPTIONS))
    if unknown:
      raise ValueError(f'unknown dicom_options {unknown}; known: {list(DICOM_CONVERTER_OPTIONS)}')

  def to_dict(self) -> Dict[str, Any]:
    """The options as recorded with a build: never the salt; DICOM-only fields only for the DICOM source."""
    values = dict(dataclasses.asdict(self), columns=dict(self.columns), dicom_options=dict(self.dicom_options))
    del values['salt']
    if self.source != 'dicom':
      for name in ('source', 'dicom_dir', 'converted_dir', 'dicom_options'):
        del values[name]
    return values


def load_options(manual_dir, overrides: Optional[Mapping[str, Any]] = None) -> StudyTableOptions:
  """Options from `<manual_dir>/echo_studies.json` (if present), then `overrides` whose value is not None."""
  values: Dict[str, Any] = {}
  path = os.path.join(os.fspath(manual_dir), OPTIONS_FILE)
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      try:
        values = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}: not valid JSON ({e})') from None
    if not isinstance(values, dict):
      raise ValueError(f'{path}: expected a JSON object')
  values.update({k: v for k, v in (overrides or {}).items() if v is not None})
  known = {f.name for f in dataclasses.fields(StudyTableOptions)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f'unknown option(s) {unknown} (from {path} or arguments); known: {sorted(known)}')
  try:
    options = StudyTableOptions(**values)
  except ValueError as e:
    raise ValueError(f'{path}: {e}') from None
  if options.source is None:
    has_dicom = os.path.isdir(os.path.join(os.fspath(manual_dir), options.dicom_dir))
    if has_dicom and os.path.isdir(os.path.join(os.fspath(manual_dir), options.videos_dir)):
      raise ValueError(f'{manual_dir} holds both {options.videos_dir}/ and {options.dicom_dir}/; set "source" '
                       f'to "videos" or "dicom" in {OPTIONS_FILE}')
    options = dataclasses.replace(options, source='dicom' if has_dicom else 'videos')
  return options


@dataclasses.dataclass(frozen=True)
class VideoEntry:
  path: str        # resolved path to open
  fpath: str       # as written in the table
  video_num: str
  plax_prob: float
  source: str      # '<table>:<line>' for messages
  fps_is_default: Optional[bool] = None   # known from the source (DICOM timing); None: ask the container


@dataclasses.dataclass
class Study:
  study_id: str
  patient_id: str
  av_stenosis: str
  videos: List[VideoEntry]


def _listing(items) -> str:
  items = list(items)
  shown = ', '.join(str(i) for i in items[:_MAX_LISTED])
  return shown + (f' ... ({len(items)} in all)' if len(items) > _MAX_LISTED else '')


def _read_rows(path: str, options: StudyTableOptions, needed: tuple, any_of: tuple = ()):
  """Rows of one CSV as dicts keyed by canonical column (values stripped), with their line numbers.
  All `needed` columns and at least one of `any_of` must be present."""
  with open(path, newline='', encoding='utf-8-sig') as f:   # -sig: Excel writes a BOM
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
      raise ValueError(f'{path}: empty file (no header row)')
    header = [h.strip() for h in header]
    doubled = sorted(h for h, n in collections.Counter(header).items() if n > 1)
    if doubled:
      raise ValueError(f'{path}: repeated column name(s) {doubled}')
    canonical = {}
    for index, name in enumerate(header):
      target = options.columns.get(name, name if name in CANONICAL_COLUMNS else None)
      if target is None:
        continue   # extra columns are ignored
      if target in canonical:
        raise ValueError(f'{path}: columns {header[canonical[target]]!r} and {name!r} both give '
                         f'{target!r}; drop one or fix the "columns" mapping')
      canonical[target] = index
    missing = [c for c in needed if c not in canonical]
    if missing:
      inverse = {v: k for k, v in options.columns.items()}
      described = [f'{c} (mapped from {inverse[c]!r})' if c in inverse else c for c in missing]
      raise ValueError(f'{path}: missing required column(s) {described}; columns found: {header}. '
                       f'Map other names with "columns" in {OPTIONS_FILE}.')
    if any_of and not any(c in canonical for c in any_of):
      raise ValueError(f'{path}: needs a {" or ".join(any_of)} column; columns found: {header}. '
                       f'Map other names with "columns" in {OPTIONS_FILE}, e.g. {{"acc_num": "{any_of[-1]}"}}.')
    rows = []
    for row in reader:
      if not any(cell.strip() for cell in row):
        continue
      line = reader.line_num
      values = {c: (row[i].strip() if i < len(row) else '') for c, i in canonical.items()}
      rows.append((line, values))
  return rows


def _resolve(manual_dir: str, videos_dir: str, fpath: str) -> str:
  if os.path.isabs(fpath):
    return fpath
  candidates = [os.path.join(manual_dir, videos_dir, fpath), os.path.join(manual_dir, fpath)]
  return next((c for c in candidates if os.path.exists(c)), candidates[0])


def _table_files(manual_dir: str, options: StudyTableOptions):
  """[(split or None, path)]: per-split CSVs, or one table whose `split` column names the split."""
  if options.labels_csv:
    path = os.path.join(manual_dir, options.labels_csv)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'labels_csv {path} not found')
    return [(None, path)]
  per_split = [(s, os.path.join(manual_dir, f'{s}.csv')) for s in SPLIT_FILES]
  per_split = [(s, p) for s, p in per_split if os.path.isfile(p)]
  single = os.path.join(manual_dir, DEFAULT_SINGLE_TABLE)
  if per_split and os.path.isfile(single):
    raise ValueError(f'{manual_dir} holds both per-split CSVs ({[os.path.basename(p) for _, p in per_split]}) '
                     f'and {DEFAULT_SINGLE_TABLE}; set "labels_csv" in {OPTIONS_FILE} or remove one')
  if per_split:
    return per_split
  if os.path.isfile(single):
    return [(None, single)]
  raise FileNotFoundError(f'{manual_dir}: no label table; expected {[s + ".csv" for s in SPLIT_FILES]} '
                          f'or {DEFAULT_SINGLE_TABLE} with a split column')


def _split_name(raw: str) -> Optional[str]:
  name = raw.strip().lower()
  name = _SPLIT_ALIASES.get(name, name)
  return name if _SPLIT_NAME.match(name) and name != 'all' else None


def read_study_tables(manual_dir, options: Optional[StudyTableOptions] = None) -> Dict[str, List[Study]]:
  """Validated studies per split: {split: [Study, ...]} in table order (studies by first appearance, videos
  in row order). Raises ValueError naming the file and the offending columns/values/ids."""
  manual_dir = os.fspath(manual_dir)
  options = options or load_options(manual_dir)
  # study rows per split, keyed by study id (dicts keep first-appearance order)
  grouped: Dict[str, Dict[str, list]] = collections.defaultdict(dict)
  errors = collections.defaultdict(list)
  for fixed_split, path in _table_files(manual_dir, options):
    table = os.path.basename(path)
    needed = REQUIRED_COLUMNS + (() if fixed_split else ('split',))
    for line, row in _read_rows(path, options, needed):
      where = f'{table}:{line}'
      split = fixed_split or _split_name(row['split'])
      if split is None:
        errors[f'{table}: unusable split value(s) (use train/val/test/...)'].append(repr(row['split']))
        continue
      if not row['acc_num'] or not row['fpath']:
        errors[f'{table}: empty study id or fpath on line(s)'].append(line)
        continue
      grouped[split].setdefault(row['acc_num'], []).append((where, row))
  _raise_if(errors)

  studies: Dict[str, List[Study]] = {}
  for split, by_study in grouped.items():
    studies[split] = []
    for study_id, rows in by_study.items():
      studies[split].append(_make_study(manual_dir, options, split, study_id, rows, errors))
  _raise_if(errors)
  check_leakage(studies, options)
  return studies


def _make_study(manual_dir, options, split, study_id, rows, errors) -> Study:
  labels, patients, videos = set(), set(), []
  for position, (where, row) in enumerate(rows):
    table = where.split(':')[0]
    label = records.normalize_av_stenosis(row['av_stenosis'])
    if label is None:
      errors[f'{table}: unknown av_stenosis value(s) (known: {sorted(records.AV_STENOSIS_ALIASES)})'].append(
          repr(row['av_stenosis']))
    labels.add(label)
    patients.add(row.get('patient_id', ''))
    plax_prob = float('nan')
    if row.get('plax_prob'):
      try:
        plax_prob = float(row['plax_prob'])
      except ValueError:
        plax_prob = -1.0
      if not (math.isnan(plax_prob) or 0.0 <= plax_prob <= 1.0):
        errors[f'{table}: plax_prob not a number in [0, 1]'].append(repr(row['plax_prob']))
    if 'video_num' in row and not row['video_num']:
      errors[f'{table}: empty video_num on line(s)'].append(where.split(':')[1])
    video_num = row.get('video_num') or str(position)   # no column: position within the study
    videos.append(VideoEntry(path=_resolve(manual_dir, options.videos_dir, row['fpath']), fpath=row['fpath'],
                             video_num=video_num, plax_prob=plax_prob, source=where))
  if len(labels - {None}) > 1:
    errors[f'{split}: studies whose rows disagree on av_stenosis'].append(f'{study_id} {sorted(labels - {None})}')
  if len(patients) > 1:
    errors[f'{split}: studies whose rows disagree on patient_id'].append(f'{study_id} {sorted(patients)}')
  for video_num, n in collections.Counter(v.video_num for v in videos).items():
    if n > 1:
      errors[f'{split}: duplicate (study, video_num) rows'].append(f'({study_id}, {video_num}) x{n}')
  if len(videos) > records.MAX_VIDEOS_PER_STUDY:
    errors[f'{split}: studies with more than {records.MAX_VIDEOS_PER_STUDY} videos'].append(study_id)
  label = next(iter(labels - {None}), 'unknown')
  return Study(study_id=study_id, patient_id=next(iter(patients)), av_stenosis=label, videos=videos)


def _raise_if(errors: Mapping[str, list]) -> None:
  if errors:
    raise ValueError('invalid label tables:\n' + '\n'.join(
        f'  {what}: {_listing(dict.fromkeys(values))}' for what, values in errors.items()))


def check_leakage(studies: Mapping[str, List[Study]], options: StudyTableOptions) -> None:
  """Within a split, a video file listed twice is an error; across splits, a shared study id, patient id
  or video file is an error unless `allow_cross_split_studies` (then a warning)."""
  errors = collections.defaultdict(list)
  splits_of = {'study id': collections.defaultdict(set), 'patient id': collections.defaultdict(set),
               'video file': collections.defaultdict(set)}
  for split, split_studies in studies.items():
    paths = collections.Counter(os.path.normpath(v.path) for s in split_studies for v in s.videos)
    for path, n in paths.items():
      if n > 1:
        errors[f'{split}: video file listed more than once'].append(path)
    for study in split_studies:
      splits_of['study id'][study.study_id].add(split)
      if study.patient_id:
        splits_of['patient id'][study.patient_id].add(split)
      for video in study.videos:
        splits_of['video file'][os.path.normpath(video.path)].add(split)
  _raise_if(errors)
  shared = []
  for kind, splits_by_id in splits_of.items():
    leaked = [f'{i} {sorted(s)}' for i, s in splits_by_id.items() if len(s) > 1]
    if leaked:
      shared.append(f'  {kind}s in several splits: {_listing(leaked)}')
  if not shared:
    return
  message = 'split leakage:\n' + '\n'.join(shared)
  if not options.allow_cross_split_studies:
    raise ValueError(message + f'\n(set "allow_cross_split_studies": true in {OPTIONS_FILE} to allow it)')
  warnings.warn(message + '\n(allowed by allow_cross_split_studies)', stacklevel=3)


@dataclasses.dataclass(frozen=True)
class StudyLabel:
  """One row of a DICOM-source label table. `key` is the raw identifier named by `key_column`: hash it
  (dicom.study_key) before it goes anywhere."""
  key_column: str
  key: str = dataclasses.field(repr=False)
  av_stenosis: str
  patient_id: str = dataclasses.field(repr=False)
  source: str      # '<table>:<line>'


def read_study_labels(manual_dir, options: StudyTableOptions) -> Dict[str, List[StudyLabel]]:
  """Validated label rows per split for the DICOM source: one row per study, columns av_stenosis and
  study_instance_uid and/or accession_number (optional patient_id, split). Errors name files and line
  numbers, never identifier values."""
  manual_dir = os.fspath(manual_dir)
  labels: Dict[str, List[StudyLabel]] = collections.defaultdict(list)
  errors = collections.defaultdict(list)
  first_seen: Dict[tuple, str] = {}
  for fixed_split, path in _table_files(manual_dir, options):
    table = os.path.basename(path)
    needed = ('av_stenosis',) + (() if fixed_split else ('split',))
    for line, row in _read_rows(path, options, needed, any_of=DICOM_KEY_COLUMNS):
      where = f'{table}:{line}'
      split = fixed_split or _split_name(row['split'])
      if split is None:
        errors[f'{table}: unusable split value(s) (use train/val/test/...)'].append(repr(row['split']))
        continue
      key_column = next((c for c in DICOM_KEY_COLUMNS if row.get(c)), None)
      if key_column is None:
        errors[f'{table}: empty {" and ".join(DICOM_KEY_COLUMNS)} on line(s)'].append(line)
        continue
      label = records.normalize_av_stenosis(row['av_stenosis'])
      if label is None:
        errors[f'{table}: unknown av_stenosis value(s) (known: {sorted(records.AV_STENOSIS_ALIASES)})'].append(
            repr(row['av_stenosis']))
        continue
      identity = (key_column, row[key_column])
      if identity in first_seen:
        errors[f'studies listed more than once (same {key_column})'].append(f'{first_seen[identity]} and {where}')
        continue
      first_seen[identity] = where
      labels[split].append(StudyLabel(key_column=key_column, key=row[key_column], av_stenosis=label,
                                      patient_id=row.get('patient_id', ''), source=where))
  _raise_if(errors)
  return dict(labels)
