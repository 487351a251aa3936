"""Tests of the DICOM folder converter: layout, rejects, de-identification of every output byte, previews,
worker pool, resume and the CLI."""
import csv
import os
import shutil

import numpy as np
import pydicom
import pytest
from pydicom import uid as uids

from echojax.data import convert_dicom, dicom, sector_mask
from echojax.data.video_io import read_video
from tests import dicom_fixtures as F

SALT = 'folder-salt'
OTHER_STUDY = '1.2.826.0.1.3680043.8.498.22222222222222222222'
REQUIRED_COLUMNS = {'study_id', 'video_id', 'fpath', 'fps', 'fps_source', 'num_frames', 'orig_rows',
                    'orig_cols', 'photometric', 'transfer_syntax', 'crop_box', 'mask_source',
                    'physical_delta_x_cm', 'status'}


@pytest.fixture(scope='module')
def dicom_tree(tmp_path_factory):
  """An export folder: 4 usable cines in 2 studies (one with a region box outside the image), a duplicate,
  and every kind of bad input, in nested folders with extension-less names like real exports."""
  root = tmp_path_factory.mktemp('export')
  for sub in ('A/S1', 'A/S2', 'B', 'junk'):
    (root / sub).mkdir(parents=True)
  good = {
      'A/S1/IM0001': F.write_cine(root / 'A/S1/IM0001', encoding='jpeg', seed=1),
      'A/S1/IM0002': F.write_cine(root / 'A/S1/IM0002', encoding='rle', seed=2),
      'A/S2/IM0003': F.write_cine(root / 'A/S2/IM0003', encoding='mono2', seed=3, study_uid=OTHER_STUDY),
      'B/outside_box': F.write_cine(root / 'B/outside_box', encoding='jpeg', seed=4,
                                    region_box=(84, 31, 595, 414)),
  }
  shutil.copy(root / 'A/S1/IM0001', root / 'B/IM0001_copy')
  bad = {
      'junk/notes.txt': 'not a DICOM file',
      'junk/sr': 'structured report',
      'junk/nopix': 'no pixel data',
      'junk/still': 'single-frame image',
      'junk/colour': 'colour Doppler',
      'junk/slow': 'frame rate 20.0 fps < 25',
      'junk/jpegls': 'unsupported transfer syntax',
      'junk/garbage_jpeg': 'decoder error',
      'junk/truncated': 'truncated DICOM',
      'B/IM0001_copy': 'duplicate SOPInstanceUID',
  }
  (root / 'junk/notes.txt').write_text('not an image')
  F.structured_report(root / 'junk/sr')
  F.no_pixel_data(root / 'junk/nopix')
  F.single_frame(root / 'junk/still')
  F.write_cine(root / 'junk/colour', encoding='jpeg', colour_blobs=True)
  F.write_cine(root / 'junk/slow', encoding='mono2', frame_time_ms=50.0)
  F.fake_encapsulated(root / 'junk/jpegls', uids.JPEGLSLossless)
  F.fake_encapsulated(root / 'junk/garbage_jpeg', uids.JPEGBaseline8Bit)
  data = (root / 'A/S1/IM0001').read_bytes()
  (root / 'junk/truncated').write_bytes(data[:len(data) // 2])
  return root, good, bad


@pytest.fixture(scope='module')
def converted(dicom_tree, tmp_path_factory):
  root, _, _ = dicom_tree
  out = tmp_path_factory.mktemp('out')
  summary = convert_dicom.convert_dicom_folder(root, out, salt=SALT, workers=2, progress=False)
  return out, summary


def test_layout_and_manifest(dicom_tree, converted):
  root, good, bad = dicom_tree
  out, summary = converted
  assert summary['converted'] == len(good) and summary['rejected'] == len(bad)
  assert summary['total_studies'] == 2
  rows = convert_dicom.read_manifest(out)
  with open(out / 'manifest.csv', newline='') as f:
    assert REQUIRED_COLUMNS <= set(csv.DictReader(f).fieldnames)
  assert len(rows) == len(good)
  study = dicom.study_key(F.STUDY_UID, SALT)
  assert sorted(r['study_id'] for r in rows) == sorted([study] * 3 + [dicom.study_key(OTHER_STUDY, SALT)])
  assert sorted(r['video_num'] for r in rows if r['study_id'] == study) == [0, 1, 2]
  for row in rows:
    assert row['status'] == 'ok' and row['fpath'] == f'videos/{row["video_id"]}.avi'
    frames, fps = read_video(row['path'])
    assert frames.shape == (20, 112, 112) and fps == pytest.approx(50.0, abs=0.01)
    assert row['num_frames'] == 20 and row['fps_source'] == 'FrameTime'
    assert (out / 'previews' / f'{row["video_id"]}.png').exists()
  sources = {r['mask_source'] for r in rows}
  assert sources == {'region+motion', 'motion (region box outside image)'}
  assert sorted(os.listdir(out / 'videos')) == sorted(f'{r["video_id"]}.avi' for r in rows)


def test_rejected_csv_lists_every_bad_file(dicom_tree, converted):
  _, _, bad = dicom_tree
  out, summary = converted
  rejects = {r['path']: r['reason'] for r in convert_dicom.read_rejects(out)}
  assert set(rejects) == set(bad)
  for path, reason in bad.items():
    assert rejects[path].startswith(reason), (path, rejects[path])
  assert sum(summary['reject_reasons'].values()) == len(bad)


def test_no_header_value_in_any_output(dicom_tree, converted):
  root, good, _ = dicom_tree
  out, _ = converted
  secrets = list(F.PHI_STRINGS) + [F.STUDY_UID, OTHER_STUDY]
  secrets += [str(pydicom.dcmread(c.path, stop_before_pixels=True).SOPInstanceUID) for c in good.values()]
  files = [os.path.join(d, n) for d, _, names in os.walk(out) for n in names]
  assert len(files) >= 2 * len(good) + 2
  for path in files:
    data = open(path, 'rb').read()
    for secret in secrets:
      assert secret.encode() not in data, (path, secret)
      assert secret not in os.path.relpath(path, out)


def test_avi_keeps_masked_output(dicom_tree, converted):
  """The written AVI (lossy MJPG) matches convert_one's output and keeps the in-box text area black."""
  _, good, _ = dicom_tree
  out, _ = converted
  cine = good['A/S1/IM0001']
  video, meta = dicom.convert_one(cine.path, salt=SALT)
  row = next(r for r in convert_dicom.read_manifest(out) if r['video_id'] == meta['video_id'])
  frames, _ = read_video(row['path'])
  assert np.abs(frames.astype(int) - video).mean() < 3
  box = sector_mask.parse_box(meta['crop_box'])
  text_only = (cine.rgb[0].max(-1) > 128) & ~cine.sector
  text = np.argwhere(text_only[190:204, 40:100]) + [190, 40]
  mapped = np.round(sector_mask.to_output_coords(text[:, ::-1], box, 112)).astype(int)
  assert len(mapped) > 10 and frames[:, mapped[:, 1], mapped[:, 0]].max() < 12


def test_preview_does_not_show_banner(dicom_tree, converted):
  import cv2
  _, good, _ = dicom_tree
  out, _ = converted
  cine = good['A/S1/IM0001']
  _, meta = dicom.convert_one(cine.path, salt=SALT)
  preview = cv2.imread(str(out / 'previews' / f'{meta["video_id"]}.png'))[..., ::-1]
  assert preview.shape[:2] == (F.ROWS, F.COLS)
  banner = cv2.cvtColor(cine.rgb[0, 2:18, 4:200], cv2.COLOR_RGB2GRAY).astype(float)
  shown = cv2.cvtColor(np.ascontiguousarray(preview[2:18, 4:200]), cv2.COLOR_RGB2GRAY).astype(float)
  assert banner.std() > 30                       # there is text there in the source ...
  assert np.corrcoef(banner.ravel(), shown.ravel())[0, 1] < 0.5   # ... which the preview does not reproduce
  assert (preview[..., 1] == 255).sum() > 100    # the green sector outline is drawn


def test_resume_converts_nothing_new_then_only_new_files(dicom_tree, converted):
  root, _, bad = dicom_tree
  out, first = converted
  before = (out / 'manifest.csv').read_bytes()
  again = convert_dicom.convert_dicom_folder(root, out, salt=SALT, workers=2, progress=False)
  assert again['converted'] == 0 and again['rejected'] == 0
  assert again['skipped'] == first['converted'] + first['rejected']
  assert (out / 'manifest.csv').read_bytes() == before
  extra = root / 'A/S2/IM0009'
  F.write_cine(extra, encoding='mono2', seed=9, study_uid=OTHER_STUDY)
  try:
    third = convert_dicom.convert_dicom_folder(root, out, salt=SALT, workers=1, progress=False)
  finally:
    extra.unlink()
  assert third['converted'] == 1 and third['rejected'] == 0
  assert len(convert_dicom.read_manifest(out)) == first['converted'] + 1
  with pytest.raises(ValueError, match='different salt'):
    convert_dicom.convert_dicom_folder(root, out, salt='another', progress=False)
  with pytest.raises(ValueError, match='other options'):
    convert_dicom.convert_dicom_folder(root, out, salt=SALT, max_frames=50, progress=False)


def test_cli_and_retry_rejected(tmp_path, monkeypatch):
  monkeypatch.delenv('ECHOJAX_DICOM_SALT', raising=False)
  src = tmp_path / 'in'
  src.mkdir()
  F.write_cine(src / 'colour.dcm', encoding='jpeg', colour_blobs=True)
  out = tmp_path / 'out'
  assert convert_dicom.main(['--input', str(src), '--output', str(out), '--salt', SALT,
                             '--no-progress']) == 0
  assert [r['reason'][:14] for r in convert_dicom.read_rejects(out)] == ['colour Doppler']
  assert convert_dicom.main(['--input', str(src), '--output', str(out), '--salt', SALT, '--no-progress',
                             '--allow-color', '--retry-rejected']) == 0
  assert convert_dicom.read_rejects(out) == [] and len(convert_dicom.read_manifest(out)) == 1
  with pytest.raises(SystemExit):
    convert_dicom.main(['--input', str(src), '--output', str(out)])   # no salt
  # An output folder inside the input folder is not walked as input.
  nested = src / 'converted'
  for _ in range(2):
    summary = convert_dicom.convert_dicom_folder(src, nested, salt=SALT, allow_color=True, progress=False)
  assert summary['skipped'] == 1 and summary['total_rejected'] == 0 and summary['total_videos'] == 1
