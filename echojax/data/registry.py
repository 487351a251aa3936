"""Joins a hospital registry CSV (one row per study: accession number or StudyInstanceUID, patient id, AS
grade, optional split) to the cines convert_dicom wrote, and writes `<output>/labels.csv` with salted ids so
the output folder is directly an `echo_studies` manual dir. Without a split column it makes patient-grouped,
label-stratified, seeded splits. Registry rows without cines and cines without a registry row are reported
by count and salted key (`registry_report.json`); raw identifiers go only to the caller's key map rows.
The join itself (label rows → converted studies by salted UID/accession hash) is shared with dicom_source.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import json
import os
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from echojax.data import dicom, label_csv, records, study_checks, study_tables

LABELS_FILE = 'labels.csv'
REPORT_FILE = 'registry_report.json'
LABEL_COLUMNS = ('study_id', 'patient_id', 'av_stenosis', 'split', 'fpath', 'video_num')
# Added to the converter's private key map (PHI): the registry's raw study and patient values of a study.
REGISTRY_KEY_COLUMNS = ('patient_id', 'registry_study', 'registry_patient', 'registry_row')
MADE_SPLITS = ('train', 'val', 'test')
DEFAULT_FRACTIONS = (0.75, 0.1, 0.15)
_MAX_PRINTED = 20
NO_CINE = 'no usable DICOM cine for this study'
NO_LABEL = 'no label row for this converted cine'


@dataclasses.dataclass(frozen=True)
class RegistrySpec:
  """Which registry columns hold what, and how to split when it has no split column."""
  path: str
  study_col: str                    # accession number or StudyInstanceUID (either joins)
  patient_col: str
  label_col: str
  split_col: Optional[str] = None
  split_fractions: Tuple[float, ...] = DEFAULT_FRACTIONS   # train, val, test
  split_seed: int = 0
  label_map: Mapping[str, str] = dataclasses.field(default_factory=dict)
  encoding: Optional[str] = None

  def __post_init__(self):
    fractions = tuple(float(f) for f in self.split_fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6 or fractions[0] == 0:
      raise ValueError(f'split fractions must be three numbers >= 0 (train > 0) summing to 1, e.g. '
                       f'0.75,0.1,0.15; got {self.split_fractions}')
    object.__setattr__(self, 'split_fractions', fractions)


def parse_fractions(text: str) -> Tuple[float, ...]:
  try:
    return tuple(float(part) for part in text.split(','))
  except ValueError:
    raise ValueError(f'--split-fractions: expected e.g. 0.75,0.1,0.15, got {text!r}') from None


def spec_from_args(args) -> Optional[RegistrySpec]:
  """The RegistrySpec of convert_dicom's --labels ... flags (None without --labels), with the registry read
  once so that a bad one fails before any conversion. ValueError/OSError say what is wrong."""
  named = ('study_col', 'patient_col', 'label_col', 'split_col', 'label_map')
  if not args.labels:
    given = [f for f in named if getattr(args, f)]
    if given:
      raise ValueError(f'--{given[0].replace("_", "-")} needs --labels')
    return None
  missing = [f'--{f.replace("_", "-")}' for f in named[:3] if not getattr(args, f)]
  if missing:
    raise ValueError(f'--labels needs {", ".join(missing)}')
  spec = RegistrySpec(path=args.labels, study_col=args.study_col, patient_col=args.patient_col,
                      label_col=args.label_col, split_col=args.split_col,
                      split_fractions=parse_fractions(args.split_fractions), split_seed=args.split_seed,
                      label_map=label_csv.load_label_map(args.label_map) if args.label_map else {})
  read_registry(spec)
  return spec


@dataclasses.dataclass
class RegistryRows:
  labels: List[study_tables.StudyLabel]   # key_column 'study': the UID or the accession number
  splits: Dict[str, str]            # label.source → split (from the split column; empty without one)
  excluded: int                     # rows whose grade the label map sends to "exclude"


def read_registry(spec: RegistrySpec) -> RegistryRows:
  """Validated registry rows. Errors name the file, line and (for grades and splits) the value; identifier
  values are never quoted (they are PHI)."""
  table = label_csv.read_table(spec.path, encoding=spec.encoding, encoding_hint=None)
  columns = [spec.study_col, spec.patient_col, spec.label_col] + ([spec.split_col] if spec.split_col else [])
  missing = [c for c in columns if c not in table.header]
  if missing:
    raise ValueError(f'{spec.path}: no column(s) {missing}; its columns are {table.header}')
  label_map = label_csv.make_label_map(spec.label_map)
  hint = 'with --label-map FILE'
  problems = label_csv.Problems()
  rows = RegistryRows(labels=[], splits={}, excluded=0)
  studies, patients, first_seen = [], [], {}
  for line, row in table.rows:
    where = f'{table.name}:{line}'
    study, patient = label_csv.clean_id(row[spec.study_col]), label_csv.clean_id(row[spec.patient_col])
    grade = label_csv.map_label(row[spec.label_col], label_map)
    split = label_csv.split_name(row[spec.split_col]) if spec.split_col else None
    bad = False
    for value, column in ((study, spec.study_col), (patient, spec.patient_col)):
      if not value:
        problems.add(f'empty {column}', '', where)
        bad = True
    if grade is None:
      problems.add(label_csv.label_problem(row[spec.label_col], spec.label_col, hint),
                   repr(row[spec.label_col]), where)
      bad = True
    if spec.split_col and split is None:
      problems.add(f'{spec.split_col}: {label_csv.SPLIT_PROBLEM}', repr(row[spec.split_col]), where)
      bad = True
    if bad:
      continue
    if study in first_seen:
      problems.add(f'studies listed more than once (same {spec.study_col})', '', first_seen[study])
      problems.add(f'studies listed more than once (same {spec.study_col})', '', where)
      continue
    first_seen[study] = where
    studies.append((row[spec.study_col], where))
    patients.append((row[spec.patient_col], where))
    if grade == label_csv.EXCLUDE:
      rows.excluded += 1
      continue
    rows.labels.append(study_tables.StudyLabel(key_column='study', key=study, av_stenosis=grade,
                                               patient_id=patient, source=where))
    if split:
      rows.splits[where] = split
  label_csv.find_id_collisions(studies, spec.study_col, problems, reveal=False)
  label_csv.find_id_collisions(patients, spec.patient_col, problems, reveal=False)
  problems.raise_if(f'{spec.path}: invalid registry rows')
  return rows


def make_splits(studies: Sequence[study_checks.Study], fractions: Sequence[float], seed: int) -> Dict[str, str]:
  """study_id → train/val/test; all studies of a patient in one split. Patients are taken largest first
  (shuffled with `seed` among equals) and each goes to the split that leaves the smallest imbalance: the
  squared gaps between each split's count and its fraction, summed over the study count and each AS grade's
  count (iterative stratification), so the severe fraction ends up about equal across splits. A split
  with a fraction > 0 left empty (tiny registries) then gets the patient whose move costs least."""
  by_patient = collections.defaultdict(list)
  for study in studies:
    by_patient[study.patient_id or study.study_id].append(study)
  patients = sorted(by_patient)
  patients = [patients[i] for i in np.random.default_rng(seed).permutation(len(patients))]
  patients.sort(key=lambda p: -len(by_patient[p]))   # stable: random among equal sizes
  share = np.asarray(fractions, float)
  counts = {p: _counts(by_patient[p]) for p in patients}
  totals = sum(counts.values())
  placed = np.zeros((len(totals), len(share)))
  seen = np.zeros(len(totals))
  split_of = {}
  for patient in patients:
    seen += counts[patient]
    k = min(range(len(share)), key=lambda j: _imbalance(_moved(placed, counts[patient], None, j), seen, share))
    placed[:, k] += counts[patient]
    split_of[patient] = k
  for k in range(len(share)):
    sizes = collections.Counter(split_of.values())
    donors = [p for p in patients if sizes[split_of[p]] > 1]
    if share[k] > 0 and not sizes[k] and donors:
      best = min(donors, key=lambda p: _imbalance(_moved(placed, counts[p], split_of[p], k), totals, share))
      placed = _moved(placed, counts[best], split_of[best], k)
      split_of[best] = k
  return {s.study_id: MADE_SPLITS[split_of[p]] for p in patients for s in by_patient[p]}


def _counts(studies) -> np.ndarray:
  """[studies, then one count per AS grade] of one patient."""
  grades = collections.Counter(s.av_stenosis for s in studies)
  return np.asarray([len(studies)] + [grades[g] for g in records.AV_STENOSIS_NAMES], float)


def _moved(placed: np.ndarray, counts: np.ndarray, source: Optional[int], target: int) -> np.ndarray:
  placed = placed.copy()
  if source is not None:
    placed[:, source] -= counts
  placed[:, target] += counts
  return placed


def _imbalance(placed: np.ndarray, totals: np.ndarray, share: np.ndarray) -> float:
  # each counter's squared gaps scaled by its total, so a rare grade weighs as much as the study count
  return float((((placed - totals[:, None] * share) ** 2).sum(1) / np.maximum(totals, 1)).sum())


@dataclasses.dataclass
class RegistryResult:
  report: dict                      # what registry_report.json holds (salted keys and counts only)
  key_map: List[Dict[str, str]]     # PHI: study_id/patient_id ↔ the registry's raw values, for a local key map


def write_registry_labels(output_dir, spec: RegistrySpec, manifest: List[dict], *, salt: str,
                          log=print) -> RegistryResult:
  """Reads the registry, joins it to `manifest` (convert_dicom's rows for `output_dir`), writes
  `output_dir/labels.csv` and `output_dir/registry_report.json`, logs a summary; returns the report and the
  rows for the converter's private key map (add_to_key_map)."""
  output_dir = os.fspath(output_dir)
  rows = read_registry(spec)
  joined, join_rejects = join_labels({'all': rows.labels}, manifest, salt)
  studies = joined['all']
  if not studies:
    raise ValueError(f'no row of {spec.path} matches a converted cine in {output_dir} ({len(rows.labels)} '
                     f'rows, {len(manifest)} cines): does {spec.study_col!r} hold accession numbers or '
                     'StudyInstanceUIDs, and is the salt the one the cines were converted with?')
  source_of = {s.study_id: s.videos[0].source for s in studies}   # every video carries its label row
  if spec.split_col:
    split_of = {s.study_id: rows.splits[source_of[s.study_id]] for s in studies}
  else:
    split_of = make_splits(studies, spec.split_fractions, spec.split_seed)
  by_split = {split: [s for s in studies if split_of[s.study_id] == split]
              for split in label_csv.SPLITS if split in split_of.values()}
  study_checks.check_leakage(by_split, hint=f'fix the {spec.split_col!r} column of {spec.path}')
  _write_labels(os.path.join(output_dir, LABELS_FILE), by_split)
  report = _report(spec, rows, by_split, join_rejects, manifest)
  with open(os.path.join(output_dir, REPORT_FILE), 'w') as f:
    json.dump(report, f, indent=1)
  log(format_report(report))
  label_of = {label.source: label for label in rows.labels}
  rows_for_key_map = [dict(study_id=s.study_id, patient_id=s.patient_id,
                           registry_study=label_of[source_of[s.study_id]].key,
                           registry_patient=label_of[source_of[s.study_id]].patient_id,
                           registry_row=source_of[s.study_id]) for s in studies]
  return RegistryResult(report=report, key_map=rows_for_key_map)


def add_to_key_map(rows: List[dict], registry_rows: List[dict]) -> List[dict]:
  """The converter's key map rows (one per input file) with REGISTRY_KEY_COLUMNS of their study added
  ('' for studies the registry does not name; earlier registry values are replaced)."""
  by_study = {r['study_id']: r for r in registry_rows}
  merged = []
  for row in rows:
    registry_row = by_study.get(row.get('study_id', ''), {})
    merged.append(dict(row, **{c: registry_row.get(c, '') for c in REGISTRY_KEY_COLUMNS}))
  return merged


def join_labels(labels: Dict[str, List[study_tables.StudyLabel]], manifest: List[dict], salt: str):
  """({split: [Study]}, rejects). A label row names every converted study with its UID's hash (or, keyed by
  accession, its accession's hash; one accession may cover several StudyInstanceUIDs, each its own study;
  key_column 'study' tries the UID first, then the accession). Study and patient ids are salted hashes; a
  study named by two label rows is an error."""
  videos_of = collections.defaultdict(list)         # study_id → manifest rows (sorted by video_num)
  studies_of_accession = collections.defaultdict(set)
  for row in manifest:
    videos_of[row['study_id']].append(row)
    if row['accession_key']:
      studies_of_accession[row['accession_key']].add(row['study_id'])
  claimed: Dict[str, str] = {}
  studies: Dict[str, List[study_tables.Study]] = {}
  rejects, errors = [], []
  for split, split_labels in labels.items():
    studies[split] = []
    for label in split_labels:
      key = dicom.study_key(label.key, salt)
      study_ids = [key] if key in videos_of and label.key_column != 'accession_number' else []
      if not study_ids and label.key_column != 'study_instance_uid':
        study_ids = sorted(studies_of_accession.get(key, ()))
      if not study_ids:
        rejects.append((label.source, f'{NO_CINE} ({label.key_column} hash {key})'))
        continue
      patient_id = dicom.study_key(label.patient_id, salt) if label.patient_id else ''
      for study_id in study_ids:
        if study_id in claimed:
          errors.append(f'{claimed[study_id]} and {label.source} (study {study_id})')
          continue
        claimed[study_id] = label.source
        videos = sorted(videos_of[study_id], key=lambda r: r['video_num'])
        if len(videos) > records.MAX_VIDEOS_PER_STUDY:
          errors.append(f'{label.source}: study {study_id} has {len(videos)} cines '
                        f'(max {records.MAX_VIDEOS_PER_STUDY})')
        studies[split].append(study_tables.Study(
            study_id=study_id, patient_id=patient_id, av_stenosis=label.av_stenosis, videos=[
                study_tables.VideoEntry(path=row['path'], fpath=row['fpath'], video_num=str(row['video_num']),
                                        plax_prob=float('nan'), source=label.source,
                                        fps_is_default=row['fps_source'] == 'default')
                for row in videos]))
  if errors:
    raise ValueError('label rows that name the same DICOM study (e.g. by UID and by accession number), or '
                     'too many cines:\n  ' + '\n  '.join(errors))
  for study_id, rows in videos_of.items():
    if study_id not in claimed:
      rejects.extend((row['path'], f'{NO_LABEL} (study {study_id})') for row in rows)
  return studies, rejects


def _write_labels(path: str, by_split: Mapping[str, List[study_checks.Study]]) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(LABEL_COLUMNS)
    for split, studies in by_split.items():
      for study in studies:
        for video in study.videos:
          writer.writerow([study.study_id, study.patient_id, study.av_stenosis, split, video.fpath,
                           video.video_num])
  os.replace(tmp, path)


def _report(spec, rows: RegistryRows, by_split, join_rejects, manifest) -> dict:
  no_cine = [{'row': where, 'reason': reason} for where, reason in join_rejects
             if reason.startswith(NO_CINE)]
  matched = {s.study_id for studies in by_split.values() for s in studies}
  cine_studies = collections.Counter(r['study_id'] for r in manifest if r['study_id'] not in matched)
  splits = {}
  for split, studies in by_split.items():
    grades = collections.Counter(s.av_stenosis for s in studies)
    splits[split] = dict(studies=len(studies), patients=len({s.patient_id for s in studies}),
                         videos=sum(len(s.videos) for s in studies),
                         positives=sum(records.severe_as_label(s.av_stenosis) == 1 for s in studies),
                         grades={g: grades[g] for g in records.AV_STENOSIS_NAMES if grades[g]})
  caveats = [f'split {split!r} has no severe (positive) study' for split, c in splits.items()
              if not c['positives'] and any(c2['positives'] for c2 in splits.values())]
  caveats += [f'split {split!r} gets no study' for split, f in zip(MADE_SPLITS, spec.split_fractions)
               if not spec.split_col and f > 0 and split not in splits]
  method = ({'column': spec.split_col} if spec.split_col else
            {'made': 'patient-grouped, stratified by AS grade', 'fractions': list(spec.split_fractions),
             'seed': spec.split_seed})
  return {
      'registry_rows': len(rows.labels) + rows.excluded, 'rows_excluded': rows.excluded,
      'studies_matched': sum(c['studies'] for c in splits.values()), 'split_method': method, 'splits': splits,
      'registry_rows_without_cines': {'count': len(no_cine), 'rows': no_cine},
      'cines_without_registry_row': {'studies': len(cine_studies), 'videos': sum(cine_studies.values()),
                                     'study_ids': sorted(cine_studies)},
      'warnings': caveats,
  }


def format_report(report: Mapping) -> str:
  lines = [f'registry: {report["studies_matched"]} studies matched to cines '
           f'({report["rows_excluded"]} rows excluded by the label map)']
  for split, c in report['splits'].items():
    lines.append(f'  {split}: {c["studies"]} studies, {c["patients"]} patients, {c["videos"]} videos, '
                 f'{c["positives"]} severe; grades {c["grades"]}')
  missing, orphans = report['registry_rows_without_cines'], report['cines_without_registry_row']
  lines.append(f'  registry rows without cines: {missing["count"]}' + ''.join(
      f'\n    {r["row"]}: {r["reason"]}' for r in missing['rows'][:_MAX_PRINTED]))
  lines.append(f'  cines without a registry row: {orphans["videos"]} videos of {orphans["studies"]} studies'
               + (f' (study ids {", ".join(orphans["study_ids"][:_MAX_PRINTED])})' if orphans['studies'] else ''))
  lines += [f'  WARNING: {w}' for w in report['warnings']]
  lines.append(f'  (full listing in {REPORT_FILE}; labels in {LABELS_FILE})')
  return '\n'.join(lines)
