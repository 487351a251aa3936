"""Tests of the echonet_dynamic and echonet_lvh TFDS builders on tiny dummy folders (AVIs written here)."""
import csv
import json
import math
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_builders.echonet_dynamic import Builder as DynamicBuilder
from data_builders.echonet_lvh import Builder as LVHBuilder
from echojax.data import builder_common, video_io

NUM_FRAMES = 16   # VideoChecks().min_frames


def _write_csv(path, columns, rows):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    writer.writerows(rows)


def _video(path, level, shape=(112, 112), frames=NUM_FRAMES):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  video_io.write_video(path, np.full((frames, *shape), level, np.uint8), 25.0)


def _build(builder_cls, manual_dir, data_dir):
  builder = builder_cls(data_dir=str(data_dir))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def _records(builder, split):
  return list(tfds.as_numpy(builder.as_dataset(split=split)))


def _rejects(builder):
  with open(builder.rejects_path, newline='') as f:
    return list(csv.DictReader(f))


# ---------------------------------------------------------------------------------------------------------
# EchoNet-Dynamic

DYNAMIC_COLUMNS = ['FileName', 'EF', 'ESV', 'EDV', 'FrameHeight', 'FrameWidth', 'FPS', 'NumberOfFrames', 'Split']


@pytest.fixture(scope='module')
def dynamic_build(tmp_path_factory):
  manual = tmp_path_factory.mktemp('dynamic')
  rows = [
      ['0X1A', '60.5', '30', '76', '112', '112', '50', '12', 'TRAIN'],
      ['0X2B.avi', '45', '', '80', '112', '112', '', '12', 'train'],   # old-style name, no FPS, empty ESV
      ['0X3C', '70', '20', '67', '112', '112', '40', '12', 'VAL'],
      ['0X4D', '55', '25', '55', '112', '112', '50', '12', 'Test'],
      ['0XMISSING', '50', '25', '50', '112', '112', '50', '12', 'TRAIN'],
      ['0XCORRUPT', '50', '25', '50', '112', '112', '50', '12', 'TEST'],
  ]
  _write_csv(manual / 'FileList.csv', DYNAMIC_COLUMNS, rows)
  for level, name in enumerate(['0X1A', '0X2B', '0X3C', '0X4D']):
    _video(str(manual / 'Videos' / f'{name}.avi'), 40 + 40 * level)
  (manual / 'Videos' / '0XCORRUPT.avi').write_bytes(b'RIFF not really an avi')
  _write_csv(manual / 'VolumeTracings.csv', ['FileName', 'X1', 'Y1', 'X2', 'Y2', 'Frame'], [
      ['0X1A.avi', 1, 2, 3, 4, 9], ['0X1A.avi', 1, 2, 3, 4, 9], ['0X1A.avi', 1, 2, 3, 4, 3],
      ['0X3C.avi', 1, 2, 3, 4, 5]])
  with pytest.warns(UserWarning, match='skipping'):
    builder = _build(DynamicBuilder, manual, tmp_path_factory.mktemp('dynamic_out'))
  return builder, str(manual)


@pytest.fixture(scope='module')
def dynamic(dynamic_build):
  return dynamic_build[0]


def test_dynamic_records_labels_and_splits(dynamic):
  train = _records(dynamic, 'train')
  assert [r['video_id'].decode() for r in train] == ['0X1A', '0X2B']   # file order, 0XMISSING rejected
  first, second = train
  assert first['video'].shape == (NUM_FRAMES, 112, 112, 1) and first['video'].dtype == np.uint8
  assert abs(int(first['video'].mean()) - 40) <= 2 and abs(int(second['video'].mean()) - 80) <= 2
  assert first['ef'] == pytest.approx(60.5) and first['esv'] == 30 and first['edv'] == 76
  assert math.isnan(second['esv'])
  assert first['fps'] == 50 and second['fps'] == pytest.approx(25.0)   # FileList FPS, else container
  assert list(first['traced_frames']) == [9, 3] and list(second['traced_frames']) == [-1, -1]
  assert first['study_id'] == first['video_id'] and first['study_num_videos'] == 1
  assert [r['study_index'] for r in train] == [0, 1]
  assert first['av_stenosis'] == 4 and first['severe_as'] == -1           # 'unknown'
  val = _records(dynamic, 'val')
  assert [r['video_id'].decode() for r in val] == ['0X3C'] and list(val[0]['traced_frames']) == [5, -1]
  assert [r['video_id'].decode() for r in _records(dynamic, 'test')] == ['0X4D']


def test_dynamic_rejects_and_summary(dynamic):
  rejects = {os.path.basename(r['path']): r['reason'] for r in _rejects(dynamic)}
  assert set(rejects) == {'0XMISSING.avi', '0XCORRUPT.avi'}
  assert rejects['0XMISSING.avi'].startswith('file not found')
  with open(os.path.join(dynamic.data_dir, 'build_summary.json')) as f:
    summary = json.load(f)
  assert summary['splits']['train'] == dict(listed=3, kept=2, rejected=1, traced=1, colour_converted=0,
                                            frames_missing=0)
  assert summary['rejected'] == 2 and summary['video_checks'] == video_io.VideoChecks().to_dict()
  assert rejects['0XCORRUPT.avi'].startswith('not a video file')


def test_dynamic_fingerprint_follows_the_file_list(dynamic_build):
  dynamic, manual_dir = dynamic_build
  assert builder_common.check_fingerprint(dynamic, manual_dir) is None
  file_list = os.path.join(manual_dir, 'FileList.csv')
  original = open(file_list).read()
  try:
    with open(file_list, 'w') as f:
      f.write(original.replace('60.5', '61.5'))   # an EF corrected
    assert builder_common.check_fingerprint(dynamic, manual_dir).endswith('tables: FileList.csv changed')
  finally:
    with open(file_list, 'w') as f:
      f.write(original)


@pytest.mark.parametrize('bad, message', [
    ('missing_column', "missing column(s) ['EDV']"),
    ('bad_split', "unknown value 'EXTERNAL'"),
    ('bad_number', "column EF: not a number: 'abc'"),
    ('duplicate', 'already listed'),
])
def test_dynamic_table_errors(tmp_path, bad, message):
  columns = [c for c in DYNAMIC_COLUMNS if not (bad == 'missing_column' and c == 'EDV')]
  row = dict(FileName='0X1A', EF='60', ESV='30', EDV='70', FrameHeight='112', FrameWidth='112', FPS='50',
             NumberOfFrames='12', Split='TRAIN')
  rows = [dict(row)]
  if bad == 'bad_split':
    rows[0]['Split'] = 'EXTERNAL'
  if bad == 'bad_number':
    rows[0]['EF'] = 'abc'
  if bad == 'duplicate':
    rows.append(dict(row, FileName='0X1A.avi'))
  _write_csv(tmp_path / 'FileList.csv', columns, [[r[c] for c in columns] for r in rows])
  with pytest.raises(ValueError) as info:
    _build(DynamicBuilder, tmp_path, tmp_path / 'out')
  assert message in str(info.value) and 'FileList.csv' in str(info.value)


# ---------------------------------------------------------------------------------------------------------
# EchoNet-LVH

LVH_COLUMNS = ['', 'HashedFileName', 'Calc', 'CalcValue', 'Frame', 'X1', 'X2', 'Y1', 'Y2', 'Frames', 'FPS',
               'Width', 'Height', 'split']


def _m(i, name, calc, value, frame, split, fps='30'):
  return [i, name, calc, value, frame, 1, 2, 3, 4, 20, fps, 160, 120, split]


@pytest.fixture(scope='module')
def lvh(tmp_path_factory):
  manual = tmp_path_factory.mktemp('lvh')
  rows = [
      _m(0, 'v1', 'IVSd', '1.1', '4', 'train'), _m(1, 'v1', 'LVIDd', '4.8', '4', 'train'),
      _m(2, 'v1', 'LVPWd', '1.0', '4', 'train'), _m(3, 'v1', 'LVIDs', '3.1', '10', 'train'),
      _m(4, 'v1', 'IVSd', '9.9', '5', 'train'),         # duplicate: the first is kept
      _m(5, 'v1', 'AoRoot', '3.0', '5', 'train'),       # unknown Calc: counted, ignored
      _m(6, 'v2', 'LVIDd', '5.2', '7', 'val', fps=''),
      _m(7, 'v3', 'IVSd', '1.3', '2', 'test'),
      _m(8, 'v4', 'IVSd', '1.3', '2', 'test'),           # a 3-frame video: rejected (min_frames)
      _m(9, 'v_missing', 'IVSd', '1.3', '2', 'train'),
  ]
  _write_csv(manual / 'MeasurementsList.csv', LVH_COLUMNS, rows)
  _video(str(manual / 'Batch1' / 'v1.avi'), 100, shape=(120, 160), frames=20)
  _video(str(manual / 'Batch3' / 'v2.avi'), 150, shape=(120, 160), frames=20)
  _video(str(manual / 'Batch4' / 'v3.avi'), 200, shape=(120, 160), frames=20)
  _video(str(manual / 'Batch4' / 'v4.avi'), 200, shape=(120, 160), frames=3)
  with pytest.warns(UserWarning):
    builder = _build(LVHBuilder, manual, tmp_path_factory.mktemp('lvh_out'))
  return builder


def test_lvh_pivoted_measurements(lvh):
  train = _records(lvh, 'train')
  assert [r['video_id'].decode() for r in train] == ['v1']
  v1 = train[0]
  assert v1['video'].shape == (20, 112, 112, 1)
  # 160×120 is zero-padded to a centred square, then resized: the top rows are padding.
  assert v1['video'][:, 0].max() < 10 and abs(int(v1['video'][:, 56].mean()) - 100) <= 3
  assert v1['ivsd'] == pytest.approx(1.1) and v1['ivsd_frame'] == 4
  assert v1['lvidd'] == pytest.approx(4.8) and v1['lvids'] == pytest.approx(3.1) and v1['lvids_frame'] == 10
  assert math.isnan(v1['ivss']) and v1['ivss_frame'] == -1 and math.isnan(v1['lvpws'])
  assert v1['fps'] == 30
  val = _records(lvh, 'val')[0]
  assert val['video_id'] == b'v2' and val['lvidd'] == pytest.approx(5.2) and val['fps'] == pytest.approx(25.0)
  assert _records(lvh, 'test')[0]['ivsd_frame'] == 2


def test_lvh_rejects_and_summary(lvh):
  rejects = _rejects(lvh)
  assert [os.path.basename(r['path']) for r in rejects] == ['v_missing.avi', 'v4.avi']
  assert rejects[0]['reason'].startswith('not found in any Batch folder')
  with open(os.path.join(lvh.data_dir, 'build_summary.json')) as f:
    summary = json.load(f)
  assert summary['duplicate_measurements'] == 1 and summary['unknown_calcs'] == {'AoRoot': 1}
  assert summary['splits']['train'] == dict(listed=2, kept=1, rejected=1, colour_converted=0, frames_missing=0)
  assert summary['splits']['test'] == dict(listed=2, kept=1, rejected=1, colour_converted=0, frames_missing=0)
  assert [r['reason'] for r in rejects[1:]] == ['too short: 3 frame(s) (min_frames 16) [test]']
  assert summary['fingerprint']['parts']['options']['max_frames'] == 100


@pytest.mark.parametrize('bad, message', [
    ('missing_column', "missing column(s) ['split']"),
    ('split_conflict', "is in split 'val' here but 'train'"),
    ('bad_value', "column CalcValue: not a number: 'x'"),
])
def test_lvh_table_errors(tmp_path, bad, message):
  columns = [c for c in LVH_COLUMNS if not (bad == 'missing_column' and c == 'split')]
  rows = [_m(0, 'v1', 'IVSd', 'x' if bad == 'bad_value' else '1.0', '1', 'train'),
          _m(1, 'v1', 'LVIDd', '4.0', '1', 'val' if bad == 'split_conflict' else 'train')]
  rows = [r[:-1] if bad == 'missing_column' else r for r in rows]
  _write_csv(tmp_path / 'MeasurementsList.csv', columns, rows)
  with pytest.raises(ValueError) as info:
    _build(LVHBuilder, tmp_path, tmp_path / 'out')
  assert message in str(info.value) and 'MeasurementsList.csv' in str(info.value)
