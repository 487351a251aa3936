"""Reads and validates the label tables of a user's own echo studies (the seed paper's layout, or one row per
study keyed by accession number / StudyInstanceUID for the DICOM source) for the `echo_studies` TFDS builder.
Everything is checked before any video is opened (label_csv does the cell-level work); every problem names
its file, line and value. Leakage and view selection live in study_checks.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

from echojax.data import label_csv, video_io
from echojax.data.study_checks import Study, SplitStudies, VideoEntry, check_leakage, select_videos  # noqa: F401

# Canonical column names (the seed paper's) plus optional patient/split/view columns and the DICOM source's.
CANONICAL_COLUMNS = ('acc_num', 'fpath', 'av_stenosis', 'video_num', 'plax_prob', 'patient_id', 'split', 'view',
                     'accession_number', 'study_instance_uid')
REQUIRED_COLUMNS = ('acc_num', 'fpath', 'av_stenosis')
STUDY_ID_ALIAS = 'study_id'   # convert_dicom's labels.csv names the study column so; read as acc_num
# A DICOM-source label table needs one of these; a row giving both is joined on the UID (exact study).
DICOM_KEY_COLUMNS = ('study_instance_uid', 'accession_number')
SOURCES = ('videos', 'dicom')
DICOM_CONVERTER_OPTIONS = ('workers', 'min_frames', 'min_fps', 'allow_color')   # convert_dicom_folder's
SPLIT_FILES = label_csv.SPLITS   # `<split>.csv`, read in this order
DEFAULT_SINGLE_TABLE = 'labels.csv'                    # one table with a `split` column
CONVERTER_MANIFEST = 'manifest.csv'                    # present when manual_dir is a convert_dicom output
OPTIONS_FILE = 'echo_studies.json'


@dataclasses.dataclass(frozen=True)
class StudyTableOptions:
  """How to read a manual_dir. `columns` maps a CSV column name to a canonical one, e.g.
  {"study_id": "acc_num", "label": "av_stenosis", "mrn": "patient_id"}; `label_map` maps other AS spellings
  (or "" for blank cells) to none/mild/moderate/severe/unknown, or "exclude" to leave the study out;
  `min_plax_prob` / `views` keep only videos whose plax_prob reaches it / whose `view` is listed."""
  columns: Mapping[str, str] = dataclasses.field(default_factory=dict)
  max_frames: int = 100
  allow_cross_split_studies: bool = False
  labels_csv: Optional[str] = None   # a single table with a split column (default: per-split CSVs)
  videos_dir: str = 'videos'         # relative fpaths are looked up here first, then in manual_dir
  encoding: Optional[str] = None     # tried after UTF-8, e.g. "latin-1"
  label_map: Mapping[str, str] = dataclasses.field(default_factory=dict)
  min_plax_prob: Optional[float] = None
  views: Optional[Sequence[str]] = None
  video_checks: Mapping[str, Any] = dataclasses.field(default_factory=dict)   # video_io.VideoChecks fields
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
    if self.min_plax_prob is not None and not (isinstance(self.min_plax_prob, (int, float))
                                               and 0.0 <= self.min_plax_prob <= 1.0):
      raise ValueError(f'min_plax_prob must be a number in [0, 1] or null, got {self.min_plax_prob!r}')
    if self.views is not None and (isinstance(self.views, str) or not all(isinstance(v, str) for v in self.views)):
      raise ValueError(f'views must be a list of view names, e.g. ["plax"], got {self.views!r}')
    label_csv.make_label_map(self.label_map)   # validates the targets
    self.checks()

  def checks(self) -> video_io.VideoChecks:
    fields = {f.name for f in dataclasses.fields(video_io.VideoChecks)}
    unknown = sorted(set(self.video_checks) - fields)
    if unknown:
      raise ValueError(f'unknown video_checks {unknown}; known: {sorted(fields)}')
    return video_io.VideoChecks(**self.video_checks)

  def to_dict(self) -> Dict[str, Any]:
    """The options as recorded with a build: never the salt; DICOM-only fields only for the DICOM source."""
    values = dict(dataclasses.asdict(self), columns=dict(self.columns), dicom_options=dict(self.dicom_options),
                  label_map=dict(self.label_map), views=None if self.views is None else list(self.views),
                  video_checks=self.checks().to_dict())
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
    values = label_csv.read_json_object(path)
  values.update({k: v for k, v in (overrides or {}).items() if v is not None})
  known = {f.name for f in dataclasses.fields(StudyTableOptions)}
  unknown = sorted(set(values) - known)
  if unknown:
    raise ValueError(f'unknown option(s) {unknown} (from {path} or arguments); known: {sorted(known)}')
  try:
    options = StudyTableOptions(**values)
  except (TypeError, ValueError) as e:
    raise ValueError(f'{path}: {e}') from None
  if options.source is None:
    has_dicom = os.path.isdir(os.path.join(os.fspath(manual_dir), options.dicom_dir))
    if has_dicom and os.path.isdir(os.path.join(os.fspath(manual_dir), options.videos_dir)):
      raise ValueError(f'{manual_dir} holds both {options.videos_dir}/ and {options.dicom_dir}/; set "source" '
                       f'to "videos" or "dicom" in {OPTIONS_FILE}')
    options = dataclasses.replace(options, source='dicom' if has_dicom else 'videos')
  return options


def _read_rows(path: str, options: StudyTableOptions, needed: tuple, any_of: tuple = ()):
  """Rows of one CSV as dicts keyed by canonical column, with their line numbers (label_csv.read_table
  checks encoding, delimiter and row shape). All `needed` columns and one of `any_of` must be present."""
  table = label_csv.read_table(path, encoding=options.encoding,
                               encoding_hint=f', with "encoding" in {OPTIONS_FILE}')
  header = table.header
  canonical = {}
  for name in header:
    target = options.columns.get(name, name if name in CANONICAL_COLUMNS else None)
    if target is None:
      continue   # extra columns are ignored
    if target in canonical:
      raise ValueError(f'{path}: columns {canonical[target]!r} and {name!r} both give '
                       f'{target!r}; drop one or fix the "columns" mapping')
    canonical[target] = name
  if 'acc_num' in needed and 'acc_num' not in canonical and STUDY_ID_ALIAS in header:
    canonical['acc_num'] = STUDY_ID_ALIAS
  missing = [c for c in needed if c not in canonical]
  if missing:
    inverse = {v: k for k, v in options.columns.items()}
    described = [f'{c} (mapped from {inverse[c]!r})' if c in inverse else c for c in missing]
    raise ValueError(f'{path}: missing required column(s) {described}; columns found: {header}. '
                     f'Map other names with "columns" in {OPTIONS_FILE}.')
  if any_of and not any(c in canonical for c in any_of):
    raise ValueError(f'{path}: needs a {" or ".join(any_of)} column; columns found: {header}. '
                     f'Map other names with "columns" in {OPTIONS_FILE}, e.g. {{"acc_num": "{any_of[-1]}"}}.')
  return [(line, {c: row[h] for c, h in canonical.items()}) for line, row in table.rows]


def _resolve(manual_dir: str, videos_dir: str, fpath: str) -> str:
  if os.path.isabs(fpath):
    return fpath
  candidates = [os.path.join(manual_dir, videos_dir, fpath), os.path.join(manual_dir, fpath)]
  return next((c for c in candidates if os.path.exists(c)), candidates[0])


def table_files(manual_dir: str, options: StudyTableOptions):
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


def _converter_fps_sources(manual_dir: str) -> Optional[Dict[str, str]]:
  """fpath → fps_source of a convert_dicom output's manifest ('default': the DICOM had no timing); None when
  manual_dir is no converter output."""
  path = os.path.join(manual_dir, CONVERTER_MANIFEST)
  if not os.path.isfile(path):
    return None
  with open(path, newline='', encoding='utf-8') as f:
    return {os.path.normpath(r['fpath']): r.get('fps_source', '') for r in csv.DictReader(f) if r.get('fpath')}


def _label_hint() -> str:
  return f'with "label_map" in {OPTIONS_FILE}'


def read_study_tables(manual_dir, options: Optional[StudyTableOptions] = None) -> SplitStudies:
  """Validated studies per split: {split: [Study, ...]} in table order (studies by first appearance, videos
  in row order), after study_checks.select_videos (its counts in `.selection`). Raises ValueError naming
  the files, lines and values."""
  manual_dir = os.fspath(manual_dir)
  options = options or load_options(manual_dir)
  label_map = label_csv.make_label_map(options.label_map)
  grouped: Dict[str, Dict[str, list]] = collections.defaultdict(dict)   # split → study id → rows
  problems = label_csv.Problems()
  study_ids, patient_ids = [], []
  for fixed_split, path in table_files(manual_dir, options):
    table = os.path.basename(path)
    needed = REQUIRED_COLUMNS + (() if fixed_split else ('split',))
    for line, row in _read_rows(path, options, needed):
      where = f'{table}:{line}'
      split = fixed_split or label_csv.split_name(row['split'])
      if split is None:
        problems.add(f'{table}: {label_csv.SPLIT_PROBLEM}', repr(row['split']), where)
        continue
      study_id = label_csv.clean_id(row['acc_num'])
      if not study_id or not row['fpath']:
        problems.add(f'{table}: empty study id or fpath', '', where)
        continue
      study_ids.append((row['acc_num'], where))
      if row.get('patient_id'):
        patient_ids.append((row['patient_id'], where))
      grouped[split].setdefault(study_id, []).append((where, row))
  label_csv.find_id_collisions(study_ids, 'study id', problems)
  label_csv.find_id_collisions(patient_ids, 'patient id', problems)
  problems.raise_if()

  fps_sources = _converter_fps_sources(manual_dir)
  studies: Dict[str, List[Study]] = {}
  for split, by_study in grouped.items():
    studies[split] = [_make_study(manual_dir, options, label_map, fps_sources or {}, split, study_id, rows,
                                  problems) for study_id, rows in by_study.items()]
  problems.raise_if()
  selected = select_videos(studies, options.min_plax_prob, options.views)
  check_leakage(selected, options.allow_cross_split_studies)
  if fps_sources is not None:   # a converter output: say how many of its cines no table row names
    listed = {os.path.normpath(row['fpath']) for by_study in grouped.values() for rows in by_study.values()
              for _, row in rows}
    selected.converter = dict(cines=len(fps_sources), without_label_row=len(set(fps_sources) - listed))
  return selected


def _make_study(manual_dir, options, label_map, fps_sources, split, study_id, rows, problems) -> Study:
  labels, patients, videos = set(), set(), []
  for position, (where, row) in enumerate(rows):
    table = where.split(':')[0]
    label = label_csv.map_label(row['av_stenosis'], label_map)
    if label is None:
      problems.add(f'{table}: {label_csv.label_problem(row["av_stenosis"], "av_stenosis", _label_hint())}',
                   repr(row['av_stenosis']), where)
    labels.add(label)
    patients.add(label_csv.clean_id(row.get('patient_id', '')))
    plax_prob, problem = label_csv.parse_probability(row.get('plax_prob', ''))
    if problem:
      problems.add(f'{table}: plax_prob {problem}', repr(row['plax_prob']), where)
    if 'video_num' in row and not row['video_num']:
      problems.add(f'{table}: empty video_num', '', where)
    video_num = row.get('video_num') or str(position)   # no column: position within the study
    fps_source = fps_sources.get(os.path.normpath(row['fpath']))
    videos.append(VideoEntry(path=_resolve(manual_dir, options.videos_dir, row['fpath']), fpath=row['fpath'],
                             video_num=video_num, plax_prob=plax_prob, source=where,
                             fps_is_default=None if fps_source is None else fps_source == 'default',
                             view=row.get('view', '')))
  if len(labels - {None}) > 1:
    problems.add(f'{split}: studies whose rows disagree on av_stenosis', f'{study_id} {sorted(labels - {None})}')
  if len(patients) > 1:
    problems.add(f'{split}: studies whose rows disagree on patient_id', f'{study_id} {sorted(patients)}')
  for video_num, n in collections.Counter(v.video_num for v in videos).items():
    if n > 1:
      problems.add(f'{split}: duplicate (study, video_num) rows', f'({study_id}, {video_num}) x{n}')
  label = next(iter(labels - {None}), 'unknown')
  return Study(study_id=study_id, patient_id=next(iter(patients)), av_stenosis=label, videos=videos)


@dataclasses.dataclass(frozen=True)
class StudyLabel:
  """One row of a DICOM-source label table. `key` is the raw identifier named by `key_column` (or 'study':
  a registry's study column, UID or accession number): hash it (dicom.study_key) before it goes anywhere."""
  key_column: str
  key: str = dataclasses.field(repr=False)
  av_stenosis: str
  patient_id: str = dataclasses.field(repr=False)
  source: str      # '<table>:<line>'


def read_study_labels(manual_dir, options: StudyTableOptions) -> Dict[str, List[StudyLabel]]:
  """Validated label rows per split for the DICOM source: one row per study, columns av_stenosis and
  study_instance_uid and/or accession_number (optional patient_id, split). Errors name files and line
  numbers, never identifier values. Rows whose label maps to "exclude" are left out."""
  manual_dir = os.fspath(manual_dir)
  label_map = label_csv.make_label_map(options.label_map)
  labels: Dict[str, List[StudyLabel]] = collections.defaultdict(list)
  problems = label_csv.Problems()
  first_seen: Dict[tuple, str] = {}
  keys, patient_ids = [], []
  for fixed_split, path in table_files(manual_dir, options):
    table = os.path.basename(path)
    needed = ('av_stenosis',) + (() if fixed_split else ('split',))
    for line, row in _read_rows(path, options, needed, any_of=DICOM_KEY_COLUMNS):
      where = f'{table}:{line}'
      split = fixed_split or label_csv.split_name(row['split'])
      if split is None:
        problems.add(f'{table}: {label_csv.SPLIT_PROBLEM}', repr(row['split']), where)
        continue
      key_column = next((c for c in DICOM_KEY_COLUMNS if label_csv.clean_id(row.get(c, ''))), None)
      if key_column is None:
        problems.add(f'{table}: empty {" and ".join(DICOM_KEY_COLUMNS)}', '', where)
        continue
      label = label_csv.map_label(row['av_stenosis'], label_map)
      if label is None:
        problems.add(f'{table}: {label_csv.label_problem(row["av_stenosis"], "av_stenosis", _label_hint())}',
                     repr(row['av_stenosis']), where)
        continue
      key = label_csv.clean_id(row[key_column])
      identity = (key_column, key)
      if identity in first_seen:
        problems.add(f'studies listed more than once (same {key_column})', '', f'{first_seen[identity]}')
        problems.add(f'studies listed more than once (same {key_column})', '', where)
        continue
      first_seen[identity] = where
      keys.append((row[key_column], where))
      if row.get('patient_id'):
        patient_ids.append((row['patient_id'], where))
      if label != label_csv.EXCLUDE:
        labels[split].append(StudyLabel(key_column=key_column, key=key, av_stenosis=label,
                                        patient_id=label_csv.clean_id(row.get('patient_id', '')), source=where))
  label_csv.find_id_collisions(keys, 'study key', problems, reveal=False)
  label_csv.find_id_collisions(patient_ids, 'patient id', problems, reveal=False)
  problems.raise_if()
  return dict(labels)
