"""Tests of the echo_studies builder's DICOM source (echojax.data.dicom_source): DICOM folder + a label CSV
keyed by accession number or StudyInstanceUID → records with salted ids, rejects, no PHI in any output,
and a conversion cache that a rebuild reuses."""
import contextlib
import csv
import dataclasses
import io
import json
import logging
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_builders.echo_studies import build_echo_studies
from echojax.data import convert_dicom, dicom, dicom_source, study_tables
from tests import dicom_fixtures as F

SALT = 'test-salt-echo-studies'
_UID = '1.2.826.0.1.3680043.8.498.{}0000000000000000000{}'
# study: (StudyInstanceUID, accession number, MRN in the label CSV) — invented, distinctive strings
IDS = {s: (_UID.format(n, n), f'ACCQ{s}{n}0{n}0{n}', f'MRNQ{s}77{n}{n}') for n, s in enumerate('ABCDE', 1)}
RAW_IDENTIFIERS = [v for ids in IDS.values() for v in ids] + F.PHI_STRINGS + [F.STUDY_UID]
EXPORT_UID = '1.2.826.0.1.3680043.8.498.99999999999999999999'   # a UID-named export folder (as PACS write)


def write_csv(path, rows, columns):
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)


def write_dicom_tree(root):
  """A: 2 cines, B: 1 cine without timing (default fps), C: 1 cine, D: only a too-short cine (in a folder
  named by a UID), E: nothing; plus a text file."""
  def cine(folder, name, study, **kwargs):
    (root / folder).mkdir(parents=True, exist_ok=True)
    uid, accession, _ = IDS[study]
    F.write_cine(root / folder / name, study_uid=uid, AccessionNumber=accession, **kwargs)

  cine('exam1', 'IM0001', 'A', encoding='jpeg', seed=1)
  cine('exam1', 'IM0002', 'A', encoding='mono2', seed=2)
  cine('exam2', 'IM0001', 'B', encoding='mono2', seed=3, frame_time_ms=None)
  cine('exam3', 'IM0001', 'C', encoding='jpeg', seed=4)
  cine(EXPORT_UID, 'IM0001', 'D', encoding='mono2', seed=5, frames=8)
  (root / 'exam4').mkdir()
  (root / 'exam4' / 'readme.txt').write_text('export notes')


def read_split(builder, split):
  return list(tfds.as_numpy(builder.as_dataset(split=split)))


def read_rejects(builder):
  with open(os.path.join(builder.data_dir, 'rejects.csv'), newline='') as f:
    return [(r['path'], r['reason']) for r in csv.DictReader(f)]


def summary_of(builder):
  with open(os.path.join(builder.data_dir, 'build_summary.json')) as f:
    return json.load(f)


@contextlib.contextmanager
def captured_output():
  """stdout, stderr, log records and warnings of the block, as one text (for the PHI check)."""
  text = io.StringIO()
  handler = logging.StreamHandler(text)
  logging.getLogger().addHandler(handler)
  try:
    with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text), \
        warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      yield text
  finally:
    logging.getLogger().removeHandler(handler)
  text.write('\n'.join(str(w.message) for w in caught))


@pytest.fixture(scope='module')
def dicom_builds(tmp_path_factory):
  """The same DICOM folder built twice: labels keyed by accession (salt from the environment) and by UID
  (mapped column names, salt given in Python, another config → reuses the conversion cache)."""
  manual_dir = tmp_path_factory.mktemp('manual')
  write_dicom_tree(manual_dir / 'dicom')
  by_accession = [('train', 'A', 'Severe'), ('train', 'D', 'Mild'), ('test', 'B', 'None'),
                  ('test', 'E', 'Moderate')]
  write_csv(manual_dir / 'labels.csv',
            [dict(split=split, accession_number=IDS[s][1], av_stenosis=label, patient_id=IDS[s][2])
             for split, s, label in by_accession], ['split', 'accession_number', 'av_stenosis', 'patient_id'])
  write_csv(manual_dir / 'by_uid.csv',
            [dict(Split=split, StudyUID=IDS[s][0], grade=label) for split, s, label in
             [('train', 'C', 'Severe'), ('val', 'A', 'Moderate')]], ['StudyUID', 'grade', 'Split'])
  data_dir = tmp_path_factory.mktemp('data')
  with captured_output() as output, pytest.MonkeyPatch.context() as mp:
    mp.setenv(dicom_source.SALT_ENV, SALT)
    by_acc = build_echo_studies(manual_dir, data_dir)
    mp.delenv(dicom_source.SALT_ENV)
    by_uid = build_echo_studies(manual_dir, data_dir, salt=SALT, labels_csv='by_uid.csv',
                                columns={'StudyUID': 'study_instance_uid', 'grade': 'av_stenosis',
                                         'Split': 'split'})
  return dict(manual_dir=manual_dir, data_dir=data_dir, by_acc=by_acc, by_uid=by_uid, output=output.getvalue())


def test_accession_keyed_build_counts_labels_and_salted_ids(dicom_builds):
  builder = dicom_builds['by_acc']
  assert builder.builder_config.name == 'default'
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {'train': 2, 'test': 1}
  features = builder.info.features
  key = lambda value: dicom.study_key(value, SALT)
  train, test = read_split(builder, 'train'), read_split(builder, 'test')
  study_a, study_b = key(IDS['A'][0]), key(IDS['B'][0])
  assert [(ex['study_id'].decode(), ex['video_id'].decode(), int(ex['video_index']), int(ex['study_num_videos']))
          for ex in train] == [(study_a, f'{study_a}/0', 0, 2), (study_a, f'{study_a}/1', 1, 2)]
  assert all(ex['patient_id'].decode() == key(IDS['A'][2]) for ex in train)
  assert [features['av_stenosis'].int2str(ex['av_stenosis']) for ex in train + test] == ['severe'] * 2 + ['none']
  assert [int(ex['severe_as']) for ex in train + test] == [1, 1, 0]
  assert test[0]['study_id'].decode() == study_b and test[0]['patient_id'].decode() == key(IDS['B'][2])
  for ex in train:   # FrameTime 20 ms
    assert ex['video'].shape == (20, 112, 112, 1) and ex['fps'] == pytest.approx(50.0)
    assert not ex['fps_is_default'] and np.isnan(ex['plax_prob']) and ex['video'].max() > 100
  assert test[0]['fps'] == pytest.approx(dicom.DEFAULT_FPS) and test[0]['fps_is_default']   # no timing tags
  # the two cines of A are different videos (seeds 1 and 2), in the manifest's order
  assert np.abs(train[0]['video'].astype(int) - train[1]['video'].astype(int)).mean() > 5
  summary = summary_of(builder)
  assert summary['dicom'] == dict(converted=4, skipped_already_done=0, cache_videos=4, dicom_rejected=2,
                                  labels_without_cine=2, cines_without_label=1)
  assert summary['splits']['train']['fps_defaulted'] == 0 and summary['splits']['test']['fps_defaulted'] == 1
  assert summary['options']['source'] == 'dicom' and 'salt' not in summary['options']
  assert summary['options']['salt_check'] == dicom_source.salt_fingerprint(SALT)


def test_accession_keyed_build_rejects(dicom_builds):
  builder, manual_dir = dicom_builds['by_acc'], dicom_builds['manual_dir']
  rejects = dict(read_rejects(builder))
  converted = os.path.join(str(manual_dir), study_tables.StudyTableOptions().converted_dir)
  manifest = {r['study_id']: r for r in convert_dicom.read_manifest(converted)}
  study_c = dicom.study_key(IDS['C'][0], SALT)
  # the converter's rejects are named by their salted source_key (its --key-map maps them to paths)
  def key_of(*parts):   # the converter's salted name of an input file
    stat = os.stat(os.path.join(manual_dir, 'dicom', *parts))
    return convert_dicom.source_key(os.path.join(*parts), stat.st_size, stat.st_mtime_ns, SALT)

  short, text = (f'dicom:{key_of(*p)}' for p in [(EXPORT_UID, 'IM0001'), ('exam4', 'readme.txt')])
  assert set(rejects) == {'labels.csv:3', 'labels.csv:5', manifest[study_c]['path'], short, text}
  assert rejects['labels.csv:3'] == (f'no usable DICOM cine for this study (accession_number hash '
                                     f'{dicom.study_key(IDS["D"][1], SALT)})')
  assert rejects['labels.csv:5'].startswith('no usable DICOM cine for this study')
  assert rejects[manifest[study_c]['path']] == f'no label row for this converted cine (study {study_c})'
  assert rejects[short].startswith('DICOM file not converted: cine too short')
  assert rejects[text] == 'DICOM file not converted: not a DICOM file'


def test_uid_keyed_build_with_mapped_columns_reuses_the_conversion(dicom_builds):
  builder = dicom_builds['by_uid']
  assert builder.builder_config.name == 'custom'
  study_a, study_c = (dicom.study_key(IDS[s][0], SALT) for s in 'AC')
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {'train': 1, 'val': 2}
  train, val = read_split(builder, 'train'), read_split(builder, 'val')
  features = builder.info.features
  assert [(ex['study_id'].decode(), features['av_stenosis'].int2str(ex['av_stenosis'])) for ex in train + val] == [
      (study_c, 'severe'), (study_a, 'moderate'), (study_a, 'moderate')]
  assert all(ex['patient_id'] == b'' for ex in train + val)   # no patient column
  summary = summary_of(builder)
  assert summary['dicom'] == dict(converted=0, skipped_already_done=6, cache_videos=4, dicom_rejected=2,
                                  labels_without_cine=0, cines_without_label=1)
  study_b = dicom.study_key(IDS['B'][0], SALT)
  assert [r for r in read_rejects(builder) if not r[1].startswith('DICOM file')] == [
      (r['path'], f'no label row for this converted cine (study {study_b})')
      for r in convert_dicom.read_manifest(os.path.join(dicom_builds['manual_dir'], '.echojax_converted'))
      if r['study_id'] == study_b]


def test_no_raw_identifier_in_any_output_file_or_message(dicom_builds):
  def files_under(root):
    return [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]

  dataset_files = files_under(dicom_builds['data_dir'])
  cache_files = files_under(dicom_builds['manual_dir'] / '.echojax_converted')
  files = dataset_files + cache_files
  assert len(dataset_files) > 10 and any(f.endswith('.tfrecord-00000-of-00001') for f in dataset_files)
  for path in files:
    # the cache's rejected.csv lists input paths by design (it stays next to the inputs): not the dataset's
    watched = RAW_IDENTIFIERS + ([] if path.endswith(os.path.join('.echojax_converted', 'rejected.csv'))
                                 else [EXPORT_UID])
    assert not any(value in os.path.relpath(path, dicom_builds['manual_dir']) for value in watched), path
    data = open(path, 'rb').read()
    for value in watched:
      assert value.encode() not in data, (path, value)
  output = dicom_builds['output']
  assert 'echo_studies build summary' in output and 'DICOM: 4 cines converted now' in output
  assert not [v for v in RAW_IDENTIFIERS + [EXPORT_UID] if v in output]
  assert SALT not in output and all(SALT.encode() not in open(p, 'rb').read() for p in files)


def test_rebuild_does_not_reconvert(dicom_builds, monkeypatch):
  manual_dir, data_dir = dicom_builds['manual_dir'], dicom_builds['data_dir']
  videos = manual_dir / '.echojax_converted' / 'videos'
  stamps = {p.name: p.stat().st_mtime_ns for p in videos.iterdir()}

  def no_conversion(task):
    raise AssertionError('a DICOM file was converted again')

  monkeypatch.setattr(convert_dicom, '_convert_task', no_conversion)
  monkeypatch.setenv(dicom_source.SALT_ENV, SALT)
  builder = build_echo_studies(manual_dir, data_dir, overwrite=True)
  assert summary_of(builder)['dicom']['converted'] == 0
  assert builder.info.splits['train'].num_examples == 2
  assert {p.name: p.stat().st_mtime_ns for p in videos.iterdir()} == stamps


def test_salt_is_required_and_must_match(dicom_builds, tmp_path, monkeypatch):
  manual_dir = dicom_builds['manual_dir']
  monkeypatch.delenv(dicom_source.SALT_ENV, raising=False)
  with pytest.raises(ValueError, match=r'needs a secret salt.*\$ECHOJAX_DICOM_SALT'):
    build_echo_studies(manual_dir, tmp_path / 'data')
  assert not (tmp_path / 'data' / 'echo_studies' / 'default' / '1.0.0').exists()
  with pytest.raises(ValueError, match='different salt'):   # the cache was converted with SALT
    build_echo_studies(manual_dir, tmp_path / 'data', salt='another-salt-4f9c2e')
  with pytest.raises(ValueError, match='overwrite=True'):   # the built dataset records SALT's fingerprint
    build_echo_studies(manual_dir, dicom_builds['data_dir'], salt='another-salt-4f9c2e')
  assert build_echo_studies(manual_dir, dicom_builds['data_dir']).info.splits['test'].num_examples == 1


# ---------------------------------------------------------------------------------------------------------
# Options, label tables and the join alone (no DICOM files needed).

def test_source_detection_and_options(tmp_path):
  assert study_tables.load_options(tmp_path).source == 'videos'
  assert 'dicom_dir' not in study_tables.load_options(tmp_path).to_dict()
  (tmp_path / 'dicom').mkdir()
  options = study_tables.load_options(tmp_path, {'salt': 'secret', 'dicom_options': {'workers': 2}})
  assert options.source == 'dicom' and options.dicom_options == {'workers': 2}
  assert 'secret' not in repr(options) and 'salt' not in options.to_dict()
  (tmp_path / 'videos').mkdir()
  with pytest.raises(ValueError, match='both videos/ and dicom/; set "source"'):
    study_tables.load_options(tmp_path)
  assert study_tables.load_options(tmp_path, {'source': 'videos'}).source == 'videos'
  with pytest.raises(ValueError, match=r"unknown dicom_options \['max_frame'\]"):
    study_tables.load_options(tmp_path, {'source': 'dicom', 'dicom_options': {'max_frame': 5}})


def test_label_tables_per_split_and_key_columns(tmp_path):
  options = study_tables.StudyTableOptions(source='dicom')
  write_csv(tmp_path / 'train.csv', [dict(accession_number='X1', study_instance_uid='', av_stenosis='Severe'),
                                     dict(accession_number='X2', study_instance_uid='1.2.3', av_stenosis='')],
            ['accession_number', 'study_instance_uid', 'av_stenosis'])
  write_csv(tmp_path / 'test.csv', [dict(study_instance_uid='1.2.4', av_stenosis='mild')],
            ['study_instance_uid', 'av_stenosis'])
  with pytest.raises(ValueError, match=r'train\.csv: blank av_stenosis cells .*train\.csv line 3'):
    study_tables.read_study_labels(tmp_path, options)
  labels = study_tables.read_study_labels(tmp_path, dataclasses.replace(options, label_map={'': 'unknown'}))
  assert [(s, l.key_column, l.key, l.av_stenosis, l.source) for s, ls in labels.items() for l in ls] == [
      ('train', 'accession_number', 'X1', 'severe', 'train.csv:2'),
      ('train', 'study_instance_uid', '1.2.3', 'unknown', 'train.csv:3'),   # the UID wins
      ('test', 'study_instance_uid', '1.2.4', 'mild', 'test.csv:2')]
  assert 'X1' not in repr(labels)


def test_label_table_errors_name_lines_not_identifiers(tmp_path):
  options = study_tables.StudyTableOptions(source='dicom')
  write_csv(tmp_path / 'labels.csv', [dict(acc_num='QSECRET1', av_stenosis='None', split='train')],
            ['acc_num', 'av_stenosis', 'split'])
  with pytest.raises(ValueError, match=r'labels\.csv: needs a study_instance_uid or accession_number column.*'
                                       r'"acc_num": "accession_number"'):
    study_tables.read_study_labels(tmp_path, options)
  rows = [dict(accession_number='QSECRET1', av_stenosis='None', split='train'),
          dict(accession_number='', av_stenosis='None', split='train'),
          dict(accession_number='QSECRET1', av_stenosis='Severe', split='test')]
  write_csv(tmp_path / 'labels.csv', rows, ['accession_number', 'av_stenosis', 'split'])
  with pytest.raises(ValueError) as raised:
    study_tables.read_study_labels(tmp_path, options)
  message = str(raised.value)
  assert 'labels.csv: empty study_instance_uid and accession_number: labels.csv line 3' in message
  assert 'studies listed more than once (same accession_number): labels.csv lines 2, 4' in message
  assert 'QSECRET1' not in message


def manifest_row(study, video_num, accession='', fps_source='FrameTime'):
  return dict(study_id=dicom.study_key(study, SALT),
              accession_key=dicom.study_key(accession, SALT) if accession else '', video_num=video_num,
              fpath=f'videos/{study}_{video_num}.avi', path=f'/c/videos/{study}_{video_num}.avi',
              fps_source=fps_source)


def label(key_column, key, source, grade='severe'):
  return study_tables.StudyLabel(key_column=key_column, key=key, av_stenosis=grade, patient_id='', source=source)


def test_join_one_accession_several_uids_and_double_claims():
  manifest = [manifest_row('1.1', 1, 'ACC1'), manifest_row('1.1', 0, 'ACC1'), manifest_row('1.2', 0, 'ACC1')]
  studies, rejects = dicom_source.join_labels({'train': [label('accession_number', 'ACC1', 'l.csv:2')]},
                                              manifest, SALT)
  assert rejects == []
  assert [(s.study_id, [v.video_num for v in s.videos]) for s in studies['train']] == sorted(
      [(dicom.study_key('1.1', SALT), ['0', '1']), (dicom.study_key('1.2', SALT), ['0'])])
  both = {'train': [label('accession_number', 'ACC1', 'l.csv:2')],
          'test': [label('study_instance_uid', '1.2', 'l.csv:3', 'none')]}
  with pytest.raises(ValueError, match=r'same DICOM study.*\n  l\.csv:2 and l\.csv:3 \(study '
                                       + dicom.study_key('1.2', SALT)):
    dicom_source.join_labels(both, manifest, SALT)


def test_tfds_cli_build(dicom_builds, tmp_path):
  """`tfds build` of the DICOM layout (the CLI of TFDS 4.9.10 needs apache-beam and mlcroissant)."""
  for module in ('apache_beam', 'mlcroissant', 'importlib_resources'):
    pytest.importorskip(module, reason=f'the tfds CLI needs {module}')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}   # the builder finds echojax itself
  env[dicom_source.SALT_ENV] = SALT
  result = subprocess.run(
      [sys.executable, '-c', 'from tensorflow_datasets.scripts.cli.main import launch_cli; launch_cli()',
       'build', os.path.join(repo, 'data_builders', 'echo_studies'), f'--manual_dir={dicom_builds["manual_dir"]}',
       f'--data_dir={tmp_path / "data"}'],
      cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'DICOM: 0 cines converted now' in result.stdout
  assert not [v for v in RAW_IDENTIFIERS + [EXPORT_UID] if v in result.stdout + result.stderr]
  built = tmp_path / 'data' / 'echo_studies' / 'default' / '1.0.0'
  summary = json.loads((built / 'build_summary.json').read_text())
  assert summary['splits']['train']['videos_kept'] == 2 and summary['dicom']['labels_without_cine'] == 2
