"""Tests of the echo_studies TFDS builder and its label-table validation (echojax.data.study_tables).

Tiny AVIs are written per test; each video is a constant grey level that encodes (study, video), so a record
can be traced back to its file.
"""
import csv
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_builders.echo_studies import build_echo_studies
from echojax.data import records, study_tables, video_io

# (study, patient, split, label as written, number of videos, frame (H, W))
STUDIES = [
    ('S0', 'P0', 'train', 'None', 1, (64, 80)),
    ('S1', 'P1', 'train', 'Severe', 2, (112, 112)),
    ('S2', 'P2', 'train', 'Mild', 3, (64, 80)),
    ('S3', 'P3', 'val', 'Moderate', 2, (112, 112)),
    ('S4', 'P4', 'test', 'Severe', 1, (64, 80)),
    ('S5', 'P5', 'test', 'Sclerosis without Stenosis', 3, (112, 112)),
]
NUM_FRAMES = 20
FPS = 25.0


def grey_level(study_num, video_num):
  return 20 + 30 * study_num + 7 * video_num


def write_videos(videos_dir, studies=STUDIES):
  """Writes every video of `studies`; returns table rows (dicts with the seed paper's column names)."""
  os.makedirs(videos_dir, exist_ok=True)
  rows = []
  for study_num, (study, patient, split, label, n_videos, (height, width)) in enumerate(studies):
    for video_num in range(n_videos):
      fpath = f'{study}_{video_num}.avi'
      frames = np.full((NUM_FRAMES, height, width), grey_level(study_num, video_num), np.uint8)
      video_io.write_video(os.path.join(videos_dir, fpath), frames, FPS)
      rows.append(dict(acc_num=study, fpath=fpath, av_stenosis=label, video_num=video_num,
                       plax_prob=round(0.5 + 0.05 * study_num, 2), patient_id=patient, split=split))
  return rows


def write_csv(path, rows, columns):
  with open(path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)


def write_per_split(manual_dir, rows, columns=('plax_prob', 'fpath', 'acc_num', 'av_stenosis', 'video_num')):
  """The seed layout: one CSV per split, columns in the seed paper's (non-alphabetical) order."""
  for split in sorted({r['split'] for r in rows}):
    write_csv(os.path.join(manual_dir, f'{split}.csv'), [r for r in rows if r['split'] == split], columns)


def read_split(builder, split):
  return list(tfds.as_numpy(builder.as_dataset(split=split)))


def read_rejects(builder):
  with open(os.path.join(builder.data_dir, 'rejects.csv'), newline='') as f:
    return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------
# A full build of the seed layout with bad videos mixed in.

@pytest.fixture(scope='module')
def seed_build(tmp_path_factory):
  manual_dir = tmp_path_factory.mktemp('manual')
  videos_dir = manual_dir / 'videos'
  rows = write_videos(videos_dir)
  rng = np.random.default_rng(0)
  (videos_dir / 'S2_1.avi').write_bytes(rng.bytes(3000))          # corrupt: random bytes
  video_io.write_video(videos_dir / 'S5_2.avi', np.zeros((0, 112, 112), np.uint8), FPS)  # zero frames
  rows.append(dict(acc_num='S1', fpath='S1_missing.avi', av_stenosis='Severe', video_num=7, split='train'))
  (videos_dir / 'S6_0.avi').write_bytes(rng.bytes(2000))           # the only video of S6: study dropped
  rows.append(dict(acc_num='S6', fpath='S6_0.avi', av_stenosis='None', video_num=0, split='train'))
  rows.append(dict(acc_num='S7', fpath='S7_0.avi', av_stenosis='Mild', video_num=0, split='ext_test'))
  write_per_split(manual_dir, rows)
  data_dir = tmp_path_factory.mktemp('data')
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    builder = build_echo_studies(manual_dir, data_dir)
  messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
  assert sum('echo_studies: skipping' in m for m in messages) == 5, messages
  assert any("split 'ext_test' has no readable video" in m for m in messages), messages
  return builder, manual_dir, data_dir


def test_seed_build_counts_splits_and_location(seed_build):
  builder, _, data_dir = seed_build
  assert builder.data_dir == os.path.join(str(data_dir), 'echo_studies', 'default', '1.0.0')
  assert not [d for d in os.listdir(os.path.dirname(builder.data_dir)) if 'incomplete' in d]
  splits = builder.info.splits
  assert set(splits) == {'train', 'val', 'test'}    # ext_test lost its only video
  # train: S0 1 + S1 2 (missing one rejected) + S2 2 (corrupt one rejected), S6 dropped; test: S4 1 + S5 2
  assert {s: splits[s].num_examples for s in splits} == {'train': 5, 'val': 2, 'test': 3}
  with open(os.path.join(builder.data_dir, 'build_summary.json')) as f:
    summary = json.load(f)
  assert summary['splits']['train'] == dict(
      studies_listed=4, studies_kept=3, videos_listed=8, videos_kept=5, videos_rejected=3,
      studies_dropped=1, fps_defaulted=0, truncated=0)
  assert summary['splits']['test']['videos_rejected'] == 1 and summary['options']['max_frames'] == 100


def test_seed_build_schema_and_values(seed_build):
  builder = seed_build[0]
  features = builder.info.features
  assert set(records.video_features()) <= set(features) and 'fps_is_default' in features
  assert builder.info.disable_shuffling
  study_num = {s[0]: i for i, s in enumerate(STUDIES)}
  for split in ('train', 'val', 'test'):
    for ex in read_split(builder, split):
      study, video_num = ex['video_id'].decode().split('/')
      assert ex['study_id'].decode() == study
      assert ex['video'].shape == (NUM_FRAMES, 112, 112, 1) and ex['video'].dtype == np.uint8
      assert ex['num_frames'] == NUM_FRAMES and ex['fps'] == pytest.approx(FPS) and not ex['fps_is_default']
      assert abs(int(ex['video'][0, 56, 56, 0]) - grey_level(study_num[study], int(video_num))) <= 3
      assert ex['plax_prob'] == pytest.approx(0.5 + 0.05 * study_num[study])
      assert ex['patient_id'] == b''   # the seed tables have no patient column
      grade = records.normalize_av_stenosis(STUDIES[study_num[study]][3])
      assert features['av_stenosis'].int2str(ex['av_stenosis']) == grade
      assert ex['severe_as'] == records.severe_as_label(grade)
  # non-square 64×80 sources were padded: their top rows are black
  s0 = read_split(builder, 'train')[0]
  assert s0['study_id'] == b'S0' and s0['video'][:, :8].max() < 20


def test_seed_build_study_contiguity_and_indices(seed_build):
  builder = seed_build[0]
  expected = {'train': [('S0', ['0']), ('S1', ['0', '1']), ('S2', ['0', '2'])],
              'val': [('S3', ['0', '1'])],
              'test': [('S4', ['0']), ('S5', ['0', '1'])]}
  for split, studies in expected.items():
    examples = read_split(builder, split)
    got = [(ex['study_id'].decode(), ex['video_id'].decode().split('/')[1], int(ex['study_index']),
            int(ex['video_index']), int(ex['study_num_videos'])) for ex in examples]
    want = [(study, video_num, study_index, video_index, len(video_nums))
            for study_index, (study, video_nums) in enumerate(studies)
            for video_index, video_num in enumerate(video_nums)]
    assert got == want, split


def test_seed_build_rejects_file(seed_build):
  builder, manual_dir, _ = seed_build
  rejects = {(os.path.relpath(r['path'], manual_dir) if os.path.isabs(r['path']) else r['path']): r['reason']
             for r in read_rejects(builder)}
  assert set(rejects) == {os.path.join('videos', 'S1_missing.avi'), os.path.join('videos', 'S2_1.avi'),
                          os.path.join('videos', 'S5_2.avi'), os.path.join('videos', 'S6_0.avi'),
                          os.path.join('videos', 'S7_0.avi'), 'study:S6', 'study:S7', 'split:ext_test'}
  assert rejects[os.path.join('videos', 'S1_missing.avi')].startswith('file not found')
  assert rejects[os.path.join('videos', 'S2_1.avi')].startswith('cannot open')
  assert rejects[os.path.join('videos', 'S5_2.avi')].startswith('no decodable frames')
  assert 'train.csv' in rejects[os.path.join('videos', 'S2_1.avi')]
  assert 'study dropped' in rejects['study:S6']


def test_rebuild_reuses_and_refuses_changed_options(seed_build):
  builder, manual_dir, data_dir = seed_build
  again = build_echo_studies(manual_dir, data_dir)    # reuse: no videos read, same data
  assert again.info.splits['train'].num_examples == 5
  options_file = manual_dir / study_tables.OPTIONS_FILE
  options_file.write_text(json.dumps({'max_frames': 10}))
  try:
    with pytest.raises(ValueError, match='overwrite=True'):
      build_echo_studies(manual_dir, data_dir)
  finally:
    options_file.unlink()


# ---------------------------------------------------------------------------------------------------------
# Other routes: one labels.csv with a split column + column mapping; cross-split studies allowed.

def test_single_table_with_split_column_and_column_mapping(tmp_path):
  manual_dir = tmp_path / 'manual'
  rows = write_videos(manual_dir / 'clips')
  for row in rows:
    row.update(study_id=row['acc_num'], file=row['fpath'], label=row['av_stenosis'], mrn=row['patient_id'],
               view_prob=row['plax_prob'], split={'val': 'Validation', 'train': 'TRAIN'}.get(row['split'],
                                                                                          row['split']))
  rows[0]['file'] = str(manual_dir / 'clips' / rows[0]['fpath'])    # absolute paths are accepted too
  write_csv(manual_dir / 'my_labels.csv', rows, ['split', 'mrn', 'file', 'label', 'study_id', 'view_prob',
                                                 'notes'])
  (manual_dir / study_tables.OPTIONS_FILE).write_text(json.dumps({
      'columns': {'study_id': 'acc_num', 'file': 'fpath', 'label': 'av_stenosis', 'mrn': 'patient_id',
                  'view_prob': 'plax_prob'},
      'labels_csv': 'my_labels.csv', 'videos_dir': 'clips', 'max_frames': 8}))
  builder = build_echo_studies(manual_dir, tmp_path / 'data')
  assert {s: builder.info.splits[s].num_examples for s in builder.info.splits} == {
      'train': 6, 'val': 2, 'test': 4}
  val = read_split(builder, 'val')
  # no video_num column: videos are numbered by their row position within the study
  assert [ex['video_id'] for ex in val] == [b'S3/0', b'S3/1']
  assert all(ex['patient_id'] == b'P3' and ex['num_frames'] == 8 for ex in val)
  assert val[0]['plax_prob'] == pytest.approx(0.65)
  assert read_rejects(builder) == []
  with open(os.path.join(builder.data_dir, 'build_summary.json')) as f:
    assert json.load(f)['splits']['train']['truncated'] == 6


def test_cross_split_studies_allowed_by_switch(tmp_path):
  manual_dir = tmp_path / 'manual'
  rows = write_videos(manual_dir / 'videos', STUDIES[:2])
  rows[2]['split'] = 'test'    # S1's second video goes to test: S1 is in train and test
  write_per_split(manual_dir, rows)
  with pytest.raises(ValueError, match=r'study ids in several splits: S1'):
    build_echo_studies(manual_dir, tmp_path / 'data')
  with pytest.warns(UserWarning, match='split leakage'):
    builder = build_echo_studies(manual_dir, tmp_path / 'data', allow_cross_split_studies=True)
  assert builder.builder_config.name == 'custom'
  assert [ex['video_id'] for ex in read_split(builder, 'test')] == [b'S1/1']
  assert [ex['study_num_videos'] for ex in read_split(builder, 'train')] == [1, 1]


def test_invalid_table_fails_before_any_video_is_read(tmp_path, monkeypatch):
  manual_dir = tmp_path / 'manual'
  rows = write_videos(manual_dir / 'videos', STUDIES[:2])
  rows[0]['av_stenosis'] = 'Critical'
  write_per_split(manual_dir, rows)

  def no_video_reads(*args, **kwargs):
    raise AssertionError('a video was read before the tables were validated')

  monkeypatch.setattr(video_io, 'read_video', no_video_reads)
  with pytest.raises(ValueError, match="'Critical'"):
    build_echo_studies(manual_dir, tmp_path / 'data')


def test_tfds_cli_build(tmp_path):
  """`tfds build data_builders/echo_studies` (the CLI of TFDS 4.9.10 needs apache-beam and mlcroissant)."""
  for module in ('apache_beam', 'mlcroissant', 'importlib_resources'):
    pytest.importorskip(module, reason=f'the tfds CLI needs {module}')
  manual_dir = tmp_path / 'manual'
  write_per_split(manual_dir, write_videos(manual_dir / 'videos', STUDIES[:2]))
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, '-c', 'from tensorflow_datasets.scripts.cli.main import launch_cli; launch_cli()',
       'build', os.path.join(repo, 'data_builders', 'echo_studies'), f'--manual_dir={manual_dir}',
       f'--data_dir={tmp_path / "data"}'],
      cwd=tmp_path, capture_output=True, text=True, timeout=300,
      env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'})   # the builder finds echojax itself
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'echo_studies build summary' in result.stdout
  built = tmp_path / 'data' / 'echo_studies' / 'default' / '1.0.0'
  assert (built / 'rejects.csv').exists()
  assert json.loads((built / 'build_summary.json').read_text())['splits']['train']['videos_kept'] == 3


# ---------------------------------------------------------------------------------------------------------
# Table validation alone (no videos needed: only the table is read).

def table_rows():
  return [dict(acc_num=s, fpath=f'{s}_{v}.avi', av_stenosis=label, video_num=v, patient_id=p, split=split)
          for s, p, split, label, n, _ in STUDIES for v in range(n)]


def test_tables_group_studies_in_order(tmp_path):
  write_per_split(tmp_path, table_rows())
  studies = study_tables.read_study_tables(tmp_path)
  assert list(studies) == ['train', 'val', 'test']
  assert [(s.study_id, s.av_stenosis, len(s.videos)) for s in studies['train']] == [
      ('S0', 'none', 1), ('S1', 'severe', 2), ('S2', 'mild', 3)]
  assert studies['test'][1].av_stenosis == 'none'   # "Sclerosis without Stenosis"
  assert studies['train'][0].videos[0].path == os.path.join(str(tmp_path), 'videos', 'S0_0.avi')
  assert np.isnan(studies['train'][0].videos[0].plax_prob)   # the column is absent


def test_missing_column_names_column_and_file(tmp_path):
  write_per_split(tmp_path, table_rows())
  write_csv(tmp_path / 'test.csv', table_rows(), ['acc_num', 'fpath', 'video_num'])   # only test.csv lacks it
  with pytest.raises(ValueError, match=r"test\.csv: missing required column\(s\) \['av_stenosis'\]"):
    study_tables.read_study_tables(tmp_path)


def test_missing_mapped_column_says_where_it_was_mapped_from(tmp_path):
  rows = [dict(r, label=r['av_stenosis']) for r in table_rows()]
  write_csv(tmp_path / 'labels.csv', rows, ['acc_num', 'fpath', 'label', 'split'])
  options = study_tables.StudyTableOptions(columns={'grade': 'av_stenosis'})
  with pytest.raises(ValueError, match=r"labels\.csv: missing required column.*mapped from 'grade'"):
    study_tables.read_study_tables(tmp_path, options)


def test_unknown_labels_are_listed_once_each(tmp_path):
  rows = table_rows()
  rows[0]['av_stenosis'], rows[1]['av_stenosis'], rows[2]['av_stenosis'] = 'Critical', 'severe?', 'Critical'
  write_per_split(tmp_path, rows)
  with pytest.raises(ValueError, match=r"train\.csv: unknown av_stenosis value\(s\).*: 'Critical', 'severe\?'$"):
    study_tables.read_study_tables(tmp_path)


def test_duplicate_rows_are_named(tmp_path):
  rows = table_rows()
  rows.append(dict(rows[1], fpath='other.avi'))    # same (S1, 0)
  write_per_split(tmp_path, rows)
  with pytest.raises(ValueError, match=r'duplicate \(study, video_num\) rows: \(S1, 0\) x2'):
    study_tables.read_study_tables(tmp_path)


def test_same_file_twice_in_a_split_is_an_error(tmp_path):
  rows = table_rows()
  rows.append(dict(rows[1], video_num=9))
  write_per_split(tmp_path, rows)
  with pytest.raises(ValueError, match=r'video file listed more than once: .*S1_0\.avi'):
    study_tables.read_study_tables(tmp_path)


def test_patient_in_two_splits_is_leakage(tmp_path):
  rows = table_rows()
  for row in rows:
    if row['acc_num'] == 'S4':
      row['patient_id'] = 'P0'     # S4 (test) belongs to S0's (train) patient
  write_csv(tmp_path / 'labels.csv', rows, ['acc_num', 'fpath', 'av_stenosis', 'patient_id', 'split'])
  with pytest.raises(ValueError, match=r"patient ids in several splits: P0 \['test', 'train'\]"):
    study_tables.read_study_tables(tmp_path)
  allowed = study_tables.StudyTableOptions(allow_cross_split_studies=True)
  with pytest.warns(UserWarning, match='patient ids in several splits: P0'):
    studies = study_tables.read_study_tables(tmp_path, allowed)
  assert studies['test'][0].patient_id == 'P0'


def test_study_rows_must_agree_on_label(tmp_path):
  rows = table_rows()
  rows[2]['av_stenosis'] = 'None'    # S1's second video
  write_per_split(tmp_path, rows)
  with pytest.raises(ValueError, match=r"disagree on av_stenosis: S1 \['none', 'severe'\]"):
    study_tables.read_study_tables(tmp_path)


def test_study_rows_must_agree_on_patient(tmp_path):
  rows = table_rows()
  rows[2]['patient_id'] = 'P9'    # S1's second video
  write_csv(tmp_path / 'labels.csv', rows, ['acc_num', 'fpath', 'av_stenosis', 'patient_id', 'split'])
  with pytest.raises(ValueError, match=r"disagree on patient_id: S1 \['P1', 'P9'\]"):
    study_tables.read_study_tables(tmp_path)


def test_bad_split_values_and_ambiguous_layout(tmp_path):
  rows = table_rows()
  rows[0]['split'] = ''
  rows[1]['split'] = 'hold out'
  write_csv(tmp_path / 'labels.csv', rows, ['acc_num', 'fpath', 'av_stenosis', 'split'])
  with pytest.raises(ValueError, match=r"unusable split value\(s\).*'', 'hold out'"):
    study_tables.read_study_tables(tmp_path)
  write_per_split(tmp_path, table_rows())
  with pytest.raises(ValueError, match='both per-split CSVs'):
    study_tables.read_study_tables(tmp_path)


def test_options_are_validated(tmp_path):
  with pytest.raises(ValueError, match=r"\['label_column'\]"):
    study_tables.load_options(tmp_path, {'label_column': 'x'})
  with pytest.raises(ValueError, match="targets \\['grade'\\]"):
    study_tables.StudyTableOptions(columns={'label': 'grade'})
  (tmp_path / study_tables.OPTIONS_FILE).write_text('{"max_frames": 0}')
  with pytest.raises(ValueError, match='echo_studies.json: max_frames'):
    study_tables.load_options(tmp_path)
  assert study_tables.load_options(tmp_path, {'max_frames': 16}).max_frames == 16   # arguments win
  with pytest.raises(FileNotFoundError, match='no label table'):
    study_tables.read_study_tables(tmp_path / 'empty')
