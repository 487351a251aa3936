"""Tests of a hospital researcher's route from a PACS export + registry CSV to an echo_studies dataset:
`python -m echojax.data.convert_dicom ... --labels REGISTRY.csv --study-col --patient-col --label-col`
(echojax.data.registry) on a generated export, then DIR built as the manual dir; registry errors; splits."""
import collections
import contextlib
import csv
import io
import json
import os
import re

import numpy as np
import pytest

from data_builders.echo_studies import build_echo_studies
from echojax.data import convert_dicom, dicom, registry, study_checks
from tests import registry_fixtures as R

SALT = R.SALT
BY_NAME = {s.name: s for s in R.STUDIES}
MATCHED = [s for s in R.STUDIES if s.in_export and s.in_registry]


def convert(export, out, registry_csv, *extra, key_map=None):
  """convert_dicom.main with the registry flags; returns (exit code, stdout + stderr)."""
  args = ['--input', str(export), '--output', str(out), '--salt', SALT, '--no-progress', '--labels',
          str(registry_csv), '--study-col', 'Accession', '--patient-col', 'MRN', '--label-col', 'AS_Grade',
          *extra] + (['--key-map', str(key_map)] if key_map else [])
  text = io.StringIO()
  with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
    try:
      code = convert_dicom.main(args)
    except SystemExit as e:
      code = e.code
  return code, text.getvalue()


def read_labels(out):
  with open(os.path.join(out, registry.LABELS_FILE), newline='') as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope='module')
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp('registry')
  export, out = root / 'EXPORT', root / 'DIR'
  R.write_export(export)
  rows = R.registry_rows()
  rows[6]['Accession'] += '\u200b'                 # as pasted from a web page: still joins
  rows[7]['Accession'] = ' ' + rows[7]['Accession']
  registry_csv = R.write_registry(root / 'registry.csv', rows)
  (root / 'private').mkdir()
  code, output = convert(export, out, registry_csv, key_map=root / 'private' / 'key_map.csv')
  assert code == 0, output
  return dict(root=root, export=export, out=out, registry=registry_csv, output=output,
              key_map=root / 'private' / 'key_map.csv')


def test_labels_csv_has_salted_ids_and_patient_grouped_splits(converted):
  rows = read_labels(converted['out'])
  assert list(rows[0]) == list(registry.LABEL_COLUMNS)
  key = lambda value: dicom.study_key(value, SALT)
  by_study = collections.defaultdict(list)
  for row in rows:
    by_study[row['study_id']].append(row)
  assert set(by_study) == {key(s.study_uid) for s in MATCHED}
  for study in MATCHED:
    videos = by_study[key(study.study_uid)]
    assert len(videos) == study.cines and {r['patient_id'] for r in videos} == {key(R.PATIENTS[study.patient][1])}
    assert {r['av_stenosis'] for r in videos} == {' '.join(study.grade.lower().split()).replace(
        'sclerosis without stenosis', 'none')}
    assert all(os.path.exists(os.path.join(converted['out'], r['fpath'])) for r in videos)
  splits_of_patient = collections.defaultdict(set)
  for row in rows:
    splits_of_patient[row['patient_id']].add(row['split'])
  assert all(len(s) == 1 for s in splits_of_patient.values())
  assert {r['split'] for r in rows} == {'train', 'val', 'test'}
  assert all(re.fullmatch(r'[0-9a-f]{16}', r[c]) for r in rows for c in ('study_id', 'patient_id'))


def test_report_counts_unmatched_rows_and_cines_by_salted_key(converted):
  report = json.loads((converted['out'] / registry.REPORT_FILE).read_text())
  assert report['registry_rows'] == 10 and report['studies_matched'] == 9 and report['rows_excluded'] == 0
  missing = report['registry_rows_without_cines']
  assert missing['count'] == 1 and missing['rows'][0]['row'] == 'registry.csv:11'   # S11, the 10th row
  assert dicom.study_key(BY_NAME['S11'].accession, SALT) in missing['rows'][0]['reason']
  assert report['cines_without_registry_row'] == dict(studies=1, videos=1, study_ids=[
      dicom.study_key(BY_NAME['S10'].study_uid, SALT)])
  splits = report['splits']
  assert sum(c['studies'] for c in splits.values()) == 9 and sum(c['positives'] for c in splits.values()) == 3
  assert report['split_method'] == {'made': 'patient-grouped, stratified by AS grade',
                                    'fractions': [0.75, 0.1, 0.15], 'seed': 0}
  output = converted['output']
  assert 'registry: 9 studies matched to cines' in output and 'registry rows without cines: 1' in output
  assert 'cines without a registry row: 1 videos of 1 studies' in output
  for split, c in splits.items():
    assert f'  {split}: {c["studies"]} studies, {c["patients"]} patients' in output


def test_output_dir_is_an_echo_studies_manual_dir(converted, tmp_path):
  builder = build_echo_studies(converted['out'], tmp_path / 'data')
  rows = read_labels(converted['out'])
  expected = collections.Counter(r['split'] for r in rows)
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == dict(expected)
  summary = json.loads((open(os.path.join(builder.data_dir, 'build_summary.json')).read()))
  assert summary['fingerprint']['parts']['manifest'] and summary['rejected'] == 0
  assert summary['converter'] == dict(cines=12, without_label_row=1)   # S10's cine: no registry row
  # re-running the converter with a corrected registry grade makes the built dataset stale
  fixed = [dict(r, AS_Grade='Severe') if r['Accession'] == BY_NAME['S3'].accession else r
           for r in R.registry_rows()]
  registry_csv = R.write_registry(tmp_path / 'registry.csv', fixed)
  code, output = convert(converted['export'], converted['out'], registry_csv)
  try:
    assert code == 0, output
    with pytest.raises(ValueError, match='tables: labels.csv changed'):
      build_echo_studies(converted['out'], tmp_path / 'data')
  finally:
    assert convert(converted['export'], converted['out'], converted['registry'])[0] == 0


def test_no_phi_in_labels_report_dataset_or_output(converted, tmp_path):
  builder = build_echo_studies(converted['out'], tmp_path / 'data')
  raw = R.raw_identifiers()
  files = [converted['out'] / registry.LABELS_FILE, converted['out'] / registry.REPORT_FILE]
  files += [os.path.join(d, f) for d, _, names in os.walk(builder.data_dir) for f in names]
  for path in files:
    data = open(path, 'rb').read()
    assert not [v for v in raw if v.encode() in data], path
  assert not [v for v in raw if v in converted['output']] and SALT not in converted['output']


def test_key_map_maps_study_ids_to_registry_values(converted):
  with open(converted['key_map'], newline='') as f:
    rows = [r for r in csv.DictReader(f) if r['status'] == 'converted']
  for study in MATCHED:
    mine = [r for r in rows if r['study_id'] == dicom.study_key(study.study_uid, SALT)]
    assert len(mine) == study.cines
    assert {r['registry_study'] for r in mine} == {study.study_uid if study.by_uid else study.accession}
    assert {r['registry_patient'] for r in mine} == {R.PATIENTS[study.patient][1]}
    assert {r['patient_id'] for r in mine} == {dicom.study_key(R.PATIENTS[study.patient][1], SALT)}
  orphan = [r for r in rows if r['study_id'] == dicom.study_key(BY_NAME['S10'].study_uid, SALT)]
  assert orphan and orphan[0]['registry_study'] == ''


def test_split_column_is_used_and_validated(converted, tmp_path):
  rows = R.registry_rows()
  for i, row in enumerate(rows):
    row['Split'] = ['TRAIN', 'train', 'Validation', 'test'][i % 4]
  rows[1]['Split'] = 'train'   # S2 with S1 (same patient)
  rows[3]['Split'] = rows[4]['Split'] = 'test'   # S4, S5: one patient
  registry_csv = R.write_registry(tmp_path / 'split.csv', rows, R.REGISTRY_COLUMNS + ('Split',))
  out = tmp_path / 'DIR'
  code, output = convert(converted['export'], out, registry_csv, '--split-col', 'Split')
  assert code == 0, output
  split_of = {r['study_id']: r['split'] for r in read_labels(out)}
  assert split_of[dicom.study_key(BY_NAME['S3'].study_uid, SALT)] == 'val'
  assert json.loads((out / registry.REPORT_FILE).read_text())['split_method'] == {'column': 'Split'}
  rows[2]['Split'] = 'tset'
  R.write_registry(registry_csv, rows, R.REGISTRY_COLUMNS + ('Split',))
  fresh = tmp_path / 'FRESH'
  code, output = convert(converted['export'], fresh, registry_csv, '--split-col', 'Split')
  assert code == 2 and "unknown split value(s) (allowed: train, val, test, ext_test" in output
  assert "'tset' (split.csv line 4)" in output
  assert not (fresh / 'manifest.csv').exists()   # the registry failed before any conversion
  rows[2]['Split'], rows[1]['Split'] = 'val', 'test'   # S2 in test, S1 (same patient) in train
  R.write_registry(registry_csv, rows, R.REGISTRY_COLUMNS + ('Split',))
  code, output = convert(converted['export'], fresh, registry_csv, '--split-col', 'Split')
  patient = dicom.study_key(R.PATIENTS[0][1], SALT)
  assert code == 2 and f"patient ids in several splits: {patient} ['test', 'train']" in output
  assert "fix the 'Split' column" in output and R.PATIENTS[0][1] not in output


def spec(path, **kwargs):
  return registry.RegistrySpec(path=str(path), study_col='Accession', patient_col='MRN', label_col='AS_Grade',
                               **kwargs)


def test_registry_errors_name_file_line_and_value_not_identifiers(tmp_path):
  rows = R.registry_rows()
  rows[0]['AS_Grade'] = 'moderate-severe'
  rows[1]['AS_Grade'] = ''
  rows[2]['MRN'] = ''
  rows[4]['MRN'] = rows[3]['MRN'].lower()                  # one patient written two ways
  rows[6]['Accession'] = rows[5]['Accession']              # a study listed twice
  rows.append(dict(rows[8], Accession=rows[8]['Accession'] + '\u200b'))   # invisible character: a duplicate
  path = R.write_registry(tmp_path / 'reg.csv', rows)
  with pytest.raises(ValueError) as raised:
    registry.read_registry(spec(path))
  message = str(raised.value)
  assert "AS_Grade values not understood (known: None, Mild, Moderate, Severe, Sclerosis without Stenosis; map " \
         "others with --label-map FILE): 'moderate-severe' (reg.csv line 2)" in message
  assert 'blank AS_Grade cells' in message and "'' (reg.csv line 3)" in message
  assert 'empty MRN: reg.csv line 4' in message
  assert 'MRNs that differ only by case (make them identical, or distinct): reg.csv lines 5, 6' in message
  assert 'studies listed more than once (same Accession): reg.csv lines 7, 8, 10, 12' in message
  assert not [v for v in R.raw_identifiers() if v.lower() in message.lower()]


def test_label_map_files_and_exclusion(tmp_path):
  rows = R.registry_rows()
  rows[0]['AS_Grade'], rows[1]['AS_Grade'], rows[2]['AS_Grade'] = 'moderate-severe', '', 'low-gradient AS'
  path = R.write_registry(tmp_path / 'reg.csv', rows)
  (tmp_path / 'map.json').write_text(json.dumps({'Moderate-Severe': 'severe', '': 'unknown',
                                                 'low-gradient as': 'exclude'}))
  with open(tmp_path / 'map.csv', 'w', newline='') as f:
    csv.writer(f).writerows([['registry value', 'grade'], ['moderate-severe', 'severe'], ['', 'unknown'],
                             ['Low-Gradient AS', 'exclude']])
  from echojax.data import label_csv
  for name in ('map.json', 'map.csv'):
    read = registry.read_registry(spec(path, label_map=label_csv.load_label_map(tmp_path / name)))
    assert [l.av_stenosis for l in read.labels[:2]] == ['severe', 'unknown'] and read.excluded == 1
  (tmp_path / 'bad.json').write_text(json.dumps({'x': 'critical'}))
  with pytest.raises(ValueError, match='label map targets must be one of'):
    registry.read_registry(spec(path, label_map=label_csv.load_label_map(tmp_path / 'bad.json')))


def test_latin1_header_only_and_missing_columns(tmp_path):
  rows = R.registry_rows()
  rows[0]['Comment'] = 'sténose sévère'
  path = R.write_registry(tmp_path / 'latin.csv', rows, encoding='latin-1')
  with pytest.raises(ValueError, match=r'latin\.csv: not UTF-8 text \(byte 0xe9 on line 2\); save it as "CSV '
                                       r'UTF-8"$'):
    registry.read_registry(spec(path))
  assert len(registry.read_registry(spec(path, encoding='latin-1')).labels) == 10
  empty = R.write_registry(tmp_path / 'empty.csv', [])
  with pytest.raises(ValueError, match=r'empty\.csv: has a header .* but no data rows'):
    registry.read_registry(spec(empty))
  with pytest.raises(ValueError, match=r"no column\(s\) \['Grade'\]; its columns are \['MRN', 'Accession'"):
    registry.read_registry(registry.RegistrySpec(path=path, study_col='Accession', patient_col='MRN',
                                                 label_col='Grade', encoding='latin-1'))
  with pytest.raises(ValueError, match='split fractions must be three numbers'):
    spec(path, split_fractions=(0.5, 0.6, 0.1))


def test_cli_flag_errors_and_no_match(converted, tmp_path):
  code, output = convert(converted['export'], tmp_path / 'x', converted['registry'], '--split-fractions', '0,5')
  assert code == 2 and 'split fractions must be three numbers' in output
  with pytest.raises(SystemExit):
    convert_dicom.main(['--input', str(converted['export']), '--output', str(tmp_path / 'y'), '--salt', SALT,
                        '--study-col', 'Accession'])
  code, output = convert(converted['export'], converted['out'], converted['registry'], '--split-col', 'Nope')
  assert code == 2 and "no column(s) ['Nope']" in output
  rows = [dict(r, Accession=r['Exam Date'] + r['Accession'][-3:]) for r in R.registry_rows()]   # no join
  wrong = R.write_registry(tmp_path / 'wrong.csv', rows)
  code, output = convert(converted['export'], tmp_path / 'z', wrong)
  assert code == 2 and 'matches a converted cine' in output and 'accession numbers or StudyInstanceUIDs' in output


def _studies(n, seed=0):
  rng = np.random.default_rng(seed)
  grades = rng.choice(['none', 'mild', 'moderate', 'severe'], size=n, p=[0.4, 0.2, 0.18, 0.22])
  return [study_checks.Study(study_id=f's{i}', patient_id=f'p{rng.integers(0, int(0.7 * n))}',
                             av_stenosis=str(g), videos=[]) for i, g in enumerate(grades)]


def test_made_splits_are_patient_grouped_stratified_and_seeded():
  studies = _studies(600)
  split_of = registry.make_splits(studies, (0.75, 0.1, 0.15), seed=0)
  assert split_of == registry.make_splits(studies, (0.75, 0.1, 0.15), seed=0)
  assert split_of != registry.make_splits(studies, (0.75, 0.1, 0.15), seed=1)
  patients = collections.defaultdict(set)
  for s in studies:
    patients[s.patient_id].add(split_of[s.study_id])
  assert all(len(v) == 1 for v in patients.values())
  sizes = collections.Counter(split_of.values())
  severe = collections.Counter(split_of[s.study_id] for s in studies if s.av_stenosis == 'severe')
  for split, fraction in zip(('train', 'val', 'test'), (0.75, 0.1, 0.15)):
    assert abs(sizes[split] - fraction * len(studies)) <= 3
    assert abs(severe[split] - fraction * sum(severe.values())) <= 3, (split, severe)
  tiny = _studies(6, seed=3)   # every split with a fraction gets a patient, even from six studies
  assert set(registry.make_splits(tiny, (0.75, 0.1, 0.15), seed=0).values()) == {'train', 'val', 'test'}
  assert set(registry.make_splits(tiny, (0.8, 0.0, 0.2), seed=0).values()) == {'train', 'test'}
