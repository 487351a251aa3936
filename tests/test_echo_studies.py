"""Tests of the echo_studies TFDS builder: the seed layout, bad videos in a build (rejects.csv), the view
filter, the dataset fingerprint that refuses a stale build, and the project build command
(`python -m echojax.data.build`). Table validation alone is in test_study_tables.py.

Tiny AVIs are written per test; each video is a constant grey level that encodes (study, video), so a record
can be traced back to its file.
"""
import csv
import json
import os
import subprocess
import sys
import warnings

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_builders.echo_studies import Builder, build_echo_studies
from echojax.data import build, builder_common, pipeline, records, study_tables, video_io

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
      studies_dropped=1, fps_defaulted=0, truncated=0, colour_converted=0, frames_missing=0,
      studies_excluded=0, videos_dropped_view=0, videos_view_unknown=0, studies_dropped_view=0)
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
  assert rejects[os.path.join('videos', 'S2_1.avi')].startswith('not a video file (unrecognised content)')
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
    with pytest.raises(ValueError, match=r'built from other inputs: options: max_frames changed \(100 → 10\).*'
                                         'overwrite=True'):
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
# Bad videos, view filter, fingerprint, the project build command.

def _summary(builder):
  with open(os.path.join(builder.data_dir, builder_common.SUMMARY_FILE)) as f:
    return json.load(f)


def test_bad_videos_are_rejected_with_reasons_and_colour_is_counted(tmp_path):
  manual_dir = tmp_path / 'manual'
  videos = manual_dir / 'videos'
  rows = write_videos(videos, STUDIES[:3])            # S0 (1 video), S1 (2), S2 (3): all train
  noisy = cv2.GaussianBlur(np.random.default_rng(0).integers(0, 255, (40, 64, 64), np.uint8), (9, 9), 3)
  video_io.write_video(videos / 'S2_1.avi', noisy, FPS)
  full = (videos / 'S2_1.avi').read_bytes()
  (videos / 'S2_1.avi').write_bytes(full[:len(full) // 2])                                    # half-truncated
  cv2.imwrite(str(tmp_path / 'still.png'), np.full((64, 80), 90, np.uint8))
  os.replace(tmp_path / 'still.png', videos / 'S2_2.avi')                                     # PNG renamed
  video_io.write_video(videos / 'S1_1.avi', np.full((NUM_FRAMES, 32, 32), 60, np.uint8), 1000.0)   # fps 1000
  video_io.write_video(videos / 'S0_0.avi', np.full((1, 32, 32), 60, np.uint8), FPS)          # one frame
  writer = cv2.VideoWriter(str(videos / 'S1_0.avi'), cv2.VideoWriter_fourcc(*'MJPG'), FPS, (32, 32), True)
  for _ in range(NUM_FRAMES):
    writer.write(np.dstack([np.full((32, 32), v, np.uint8) for v in (20, 60, 230)]))        # colour
  writer.release()
  write_csv(manual_dir / 'labels.csv', rows, ['acc_num', 'fpath', 'av_stenosis', 'video_num', 'split'])
  with pytest.warns(UserWarning, match='echo_studies: skipping'):
    builder = build_echo_studies(manual_dir, tmp_path / 'data')
  assert [ex['video_id'] for ex in read_split(builder, 'train')] == [b'S1/0', b'S2/0']
  rejects = {os.path.basename(r['path']): r['reason'] for r in read_rejects(builder)}
  assert rejects['S2_1.avi'].startswith('truncated: ') and 'of the 40 frames' in rejects['S2_1.avi']
  assert rejects['S2_2.avi'].startswith('not a video file (PNG image)')
  assert rejects['S1_1.avi'].startswith('frame rate 1000 fps outside [5, 500]')
  assert rejects['S0_0.avi'].startswith('too short: 1 frame(s) (min_frames 16)')
  assert 'labels.csv:' in rejects['S0_0.avi'] and rejects['study:S0'].endswith('study dropped')
  counts = _summary(builder)['splits']['train']
  assert counts['colour_converted'] == 1 and counts['videos_rejected'] == 4 and counts['videos_kept'] == 2
  assert _summary(builder)['options']['video_checks']['min_frames'] == 16


def test_nothing_usable_fails_with_the_reasons(tmp_path):
  manual_dir = tmp_path / 'manual'
  rows = write_videos(manual_dir / 'videos', STUDIES[:1])
  (manual_dir / 'videos' / 'S0_0.avi').write_bytes(b'%PDF-1.4' + bytes(100))
  write_per_split(manual_dir, rows)
  with pytest.warns(UserWarning), pytest.raises(ValueError, match=r'nothing to build.*not a video file x1'):
    build_echo_studies(manual_dir, tmp_path / 'data')


def test_view_filter_counts_in_the_summary(tmp_path):
  manual_dir = tmp_path / 'manual'
  rows = write_videos(manual_dir / 'videos')   # plax_prob 0.5 + 0.05 * study number
  write_csv(manual_dir / 'labels.csv', rows, ['acc_num', 'fpath', 'av_stenosis', 'plax_prob', 'split'])
  builder = build_echo_studies(manual_dir, tmp_path / 'data', min_plax_prob=0.6)
  train = _summary(builder)['splits']['train']
  assert train['videos_dropped_view'] == 3 and train['studies_dropped_view'] == 2   # S0 (0.5), S1 (0.55)
  assert [ex['study_id'] for ex in read_split(builder, 'train')] == [b'S2'] * 3
  assert all(ex['plax_prob'] >= 0.6 for split in ('val', 'test') for ex in read_split(builder, split))


def test_fingerprint_refuses_a_stale_dataset_until_rebuilt(tmp_path):
  manual_dir = tmp_path / 'manual'
  rows = write_videos(manual_dir / 'videos', STUDIES[:4])
  columns = ['acc_num', 'fpath', 'av_stenosis', 'split']
  write_csv(manual_dir / 'labels.csv', rows, columns)
  data_dir = tmp_path / 'data'
  builder = build_echo_studies(manual_dir, data_dir)
  fingerprint = _summary(builder)['fingerprint']
  assert set(fingerprint['parts']) == {'tables', 'options', 'manifest'} and len(fingerprint['sha256']) == 64
  assert builder_common.check_fingerprint(builder, manual_dir) is None
  assert builder_common.check_fingerprint(builder, None) is None                  # nothing to compare with
  # the builder a run gets by name (its own default config) reads the same dataset
  by_name = pipeline.get_builder('echo_studies', None, str(data_dir))
  assert by_name.builder_config.name == 'default' and builder_common.check_fingerprint(by_name, manual_dir) is None
  rows[0]['av_stenosis'] = 'Severe'                                                # a corrected label
  write_csv(manual_dir / 'labels.csv', rows, columns)
  assert builder_common.check_fingerprint(by_name, manual_dir) == (
      f'the dataset in {builder.data_dir} was built from other inputs: tables: labels.csv changed')
  with pytest.raises(ValueError, match='tables: labels.csv changed. Pass overwrite=True'):
    build_echo_studies(manual_dir, data_dir)
  filtered = Builder(data_dir=str(data_dir), options={'min_plax_prob': 0.5})       # a run's data.min_plax_prob
  assert 'options: min_plax_prob changed (None → 0.5)' in builder_common.check_fingerprint(filtered, manual_dir)
  rebuilt = build_echo_studies(manual_dir, data_dir, overwrite=True)
  assert builder_common.check_fingerprint(rebuilt, manual_dir) is None
  features = rebuilt.info.features
  assert features['av_stenosis'].int2str(read_split(rebuilt, 'train')[0]['av_stenosis']) == 'severe'
  with pytest.raises(TypeError, match=r"unknown echo_studies option\(s\) \['min_plax'\]"):
    Builder(data_dir=str(data_dir), options={'min_plax': 0.5})


def test_old_build_without_fingerprint_is_named(tmp_path):
  manual_dir = tmp_path / 'manual'
  write_per_split(manual_dir, write_videos(manual_dir / 'videos', STUDIES[:1]))
  builder = build_echo_studies(manual_dir, tmp_path / 'data')
  summary_path = os.path.join(builder.data_dir, builder_common.SUMMARY_FILE)
  summary = _summary(builder)
  del summary['fingerprint']
  with open(summary_path, 'w') as f:
    json.dump(summary, f)
  assert 'records no fingerprint' in builder_common.check_fingerprint(builder, manual_dir)


def test_project_build_command(tmp_path):
  """`python -m echojax.data.build` does what `tfds build` does, without the TFDS CLI's extra packages."""
  manual_dir = tmp_path / 'manual'
  rows = write_videos(manual_dir / 'videos', STUDIES[:2])
  write_per_split(manual_dir, rows)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run(
      [sys.executable, '-m', 'echojax.data.build', 'echo_studies', '--manual_dir', str(manual_dir),
       '--data_dir', str(tmp_path / 'data')], cwd=repo, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  built = tmp_path / 'data' / 'echo_studies' / 'default' / '1.0.0'
  assert 'echo_studies build summary' in result.stdout and f'echo_studies: built in {built}' in result.stdout
  assert json.loads((built / 'build_summary.json').read_text())['splits']['train']['videos_kept'] == 3
  # a changed table: refused with the reason, then rebuilt with --overwrite (in-process: no new interpreter)
  rows[0]['av_stenosis'] = 'Moderate'
  write_per_split(manual_dir, rows)
  args = [os.path.join(repo, 'data_builders', 'echo_studies'), '--manual_dir', str(manual_dir),
          '--data_dir', str(tmp_path / 'data')]
  assert build.main(args) == 1
  assert build.main(args + ['--overwrite']) == 0
  assert build.main(args) == 0                                                   # up to date: reused
  with pytest.raises(SystemExit):
    build.main(['no_such_builder', '--data_dir', str(tmp_path / 'data')])
  with pytest.raises(SystemExit):
    build.main(['echo_studies', '--config', 'small', '--manual_dir', str(manual_dir)])
