"""Tests of the DICOM folder converter: layout, rejects, de-identification of every output byte and log line
(tested like an attacker: a fake identity in headers, folder names, banner, region box and over the tissue),
the private key map, salts, previews, the audit section, worker pool, resume and the CLI."""
import contextlib
import csv
import io
import json
import logging
import os
import shutil
import tempfile
import warnings

import cv2
import numpy as np
import pydicom
import pytest
from pydicom import uid as uids

from echojax.data import convert_dicom, dicom, sector_mask
from echojax.data.video_io import read_video
from tests import dicom_fixtures as F

SALT = 'folder-salt-0123456789'
OTHER_STUDY = '1.2.826.0.1.3680043.8.498.22222222222222222222'
BAD_UID = '1.2.826.0.1.3680043.8.498.QZXUIDLEAK7'      # non-conformant: pydicom's warning quotes it
PHI_FOLDER = 'QZXDOE_JANEWUV_PIDQ778899'              # PACS exports name folders after the patient
REQUIRED_COLUMNS = {'study_id', 'video_id', 'fpath', 'fps', 'fps_source', 'num_frames', 'orig_rows',
                    'orig_cols', 'photometric', 'transfer_syntax', 'crop_box', 'mask_source', 'geometry',
                    'overlay_removed', 'physical_delta_x_cm', 'status'}


@contextlib.contextmanager
def captured_everything():
  """Everything written to fds 1/2 (worker processes included), log records and warnings, as one text."""
  text = io.StringIO()
  handler = logging.StreamHandler(text)
  root = logging.getLogger()
  level = root.level
  root.addHandler(handler)
  root.setLevel(logging.DEBUG)
  with tempfile.TemporaryFile(mode='w+') as sink:
    saved = [os.dup(1), os.dup(2)]
    os.dup2(sink.fileno(), 1)
    os.dup2(sink.fileno(), 2)
    try:
      with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(text), \
          contextlib.redirect_stderr(text):
        warnings.simplefilter('always')
        yield text
    finally:
      for fd, copy in zip((1, 2), saved):
        os.dup2(copy, fd)
        os.close(copy)
      root.removeHandler(handler)
      root.setLevel(level)
      sink.seek(0)
      text.write(sink.read())
      text.write('\n'.join(str(w.message) for w in caught))


@pytest.fixture(scope='module')
def dicom_tree(tmp_path_factory):
  """An export folder: usable cines in 2 studies (one with a region box outside the image, one with PHI text
  over the tissue, one with a non-conformant UID), a duplicate, and every kind of bad input, in nested
  folders — some named after the patient — with extension-less names like real exports."""
  root = tmp_path_factory.mktemp('export')
  for sub in ('A/S1', 'A/S2', 'B', 'junk', f'{PHI_FOLDER}/19610723'):
    (root / sub).mkdir(parents=True)
  phi = f'{PHI_FOLDER}/19610723'
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')   # pydicom warns about BAD_UID while writing it (not the converter)
    good = {
        'A/S1/IM0001': F.write_cine(root / 'A/S1/IM0001', encoding='jpeg', seed=1),
        'A/S1/IM0002': F.write_cine(root / 'A/S1/IM0002', encoding='rle', seed=2),
        'A/S2/IM0003': F.write_cine(root / 'A/S2/IM0003', encoding='mono2', seed=3, study_uid=OTHER_STUDY),
        'B/outside_box': F.write_cine(root / 'B/outside_box', encoding='jpeg', seed=4,
                                      region_box=(84, 31, 595, 414)),
        f'{phi}/IM0005': F.write_cine(root / phi / 'IM0005', encoding='jpeg', seed=5, tissue_text=True,
                                      noise_sigma=3.0),
        f'{phi}/IM0006': F.write_cine(root / phi / 'IM0006', encoding='mono2', seed=6, study_uid=BAD_UID),
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
      f'{phi}/short': 'cine too short',
  }
  (root / 'junk/notes.txt').write_text('not an image')
  F.structured_report(root / 'junk/sr')
  F.no_pixel_data(root / 'junk/nopix')
  F.single_frame(root / 'junk/still')
  F.write_cine(root / 'junk/colour', encoding='jpeg', colour_blobs=True)
  F.write_cine(root / 'junk/slow', encoding='mono2', frame_time_ms=50.0)
  F.write_cine(root / phi / 'short', encoding='mono2', frames=8, seed=7)
  F.fake_encapsulated(root / 'junk/jpegls', uids.JPEGLSLossless)
  F.fake_encapsulated(root / 'junk/garbage_jpeg', uids.JPEGBaseline8Bit)
  data = (root / 'A/S1/IM0001').read_bytes()
  (root / 'junk/truncated').write_bytes(data[:len(data) // 2])
  return root, good, bad


@pytest.fixture(scope='module')
def converted(dicom_tree, tmp_path_factory):
  root, _, _ = dicom_tree
  out = tmp_path_factory.mktemp('out')
  key_map = tmp_path_factory.mktemp('private') / 'keys.csv'
  with captured_everything() as output:
    summary = convert_dicom.convert_dicom_folder(root, out, salt=SALT, workers=2, progress=True,
                                                 key_map=str(key_map))
  return out, summary, key_map, output.getvalue()


def _key_map(key_map):
  return {row['source_key']: row for row in convert_dicom.read_key_map(key_map)}


def test_layout_and_manifest(dicom_tree, converted):
  root, good, bad = dicom_tree
  out, summary, _, _ = converted
  assert summary['converted'] == len(good) and summary['rejected'] == len(bad)
  assert summary['total_studies'] == 3
  rows = convert_dicom.read_manifest(out)
  with open(out / 'manifest.csv', newline='') as f:
    assert REQUIRED_COLUMNS <= set(csv.DictReader(f).fieldnames)
  assert len(rows) == len(good)
  study = dicom.study_key(F.STUDY_UID, SALT)
  assert sorted(r['video_num'] for r in rows if r['study_id'] == study) == [0, 1, 2, 3]
  for row in rows:
    assert row['status'] == 'ok' and row['fpath'] == f'videos/{row["video_id"]}.avi'
    frames, fps = read_video(row['path'])
    assert frames.shape == (20, 112, 112) and fps == pytest.approx(50.0, abs=0.01)
    assert row['num_frames'] == 20 and row['fps_source'] == 'FrameTime'
    assert (out / 'previews' / f'{row["video_id"]}.png').exists()
    assert json.loads(row['geometry'])['kind'] == 'sector'
  sources = {r['mask_source'] for r in rows}
  assert sources == {'region+motion', 'motion (region box outside image)'}
  assert sorted(os.listdir(out / 'videos')) == sorted(f'{r["video_id"]}.avi' for r in rows)
  assert sum(r['overlay_removed'] > 0 for r in rows) == 1      # the cine with text over the tissue


def test_rejected_csv_names_files_by_salted_key_only(dicom_tree, converted):
  _, _, bad = dicom_tree
  out, summary, key_map, _ = converted
  with open(out / 'rejected.csv', newline='') as f:
    assert tuple(csv.DictReader(f).fieldnames) == convert_dicom.REJECT_COLUMNS
  keys = _key_map(key_map)
  rejects = {keys[r['source_key']]['source_path']: r['reason'] for r in convert_dicom.read_rejects(out)}
  assert set(rejects) == set(bad)
  for path, reason in bad.items():
    assert rejects[path].startswith(reason), (path, rejects[path])
  assert sum(summary['reject_reasons'].values()) == len(bad)
  assert all(r['path'] == f'dicom:{r["source_key"]}' for r in convert_dicom.read_rejects(out))


def test_key_map_is_private_and_complete(dicom_tree, converted):
  root, good, bad = dicom_tree
  out, _, key_map, _ = converted
  keys = _key_map(key_map)
  assert not str(key_map).startswith(str(out))
  assert {r['source_path'] for r in keys.values()} == set(good) | set(bad)
  manifest = {r['source_key']: r for r in convert_dicom.read_manifest(out)}
  for key, row in keys.items():
    assert row['status'] == ('converted' if key in manifest else 'rejected')
    if key in manifest:
      assert row['video_id'] == manifest[key]['video_id'] and row['study_id'] == manifest[key]['study_id']
      assert row['accession_number'] == F.PHI['AccessionNumber']
      assert row['accession_key'] == dicom.study_key(F.PHI['AccessionNumber'], SALT)
  with pytest.raises(ValueError, match='must not be written inside the output folder'):
    convert_dicom.convert_dicom_folder(root, out, salt=SALT, progress=False, key_map=str(out / 'keys.csv'))
  # Another module may add a column (e.g. the registry's study id) and write it back.
  rows = convert_dicom.read_key_map(key_map)
  for row in rows:
    row['registry_study'] = 'R' + row['source_key'][:4]
  copy = key_map.parent / 'with_registry.csv'
  convert_dicom.write_key_map(copy, rows)
  with open(copy, newline='') as f:
    assert csv.DictReader(f).fieldnames == list(convert_dicom.KEY_MAP_COLUMNS) + ['registry_study']


def test_no_header_value_path_or_salt_in_any_output_or_log(dicom_tree, converted):
  root, good, _ = dicom_tree
  out, _, key_map, output = converted
  secrets = list(F.PHI_STRINGS) + [F.STUDY_UID, OTHER_STUDY, BAD_UID, 'QZXUIDLEAK7', PHI_FOLDER, SALT]
  secrets += [str(pydicom.dcmread(c.path, stop_before_pixels=True).SOPInstanceUID) for c in good.values()]
  secrets.append(dicom.study_key('echojax-salt-check', SALT))       # the old, fast salt check
  files = [os.path.join(d, n) for d, _, names in os.walk(out) for n in names]
  assert len(files) >= 3 * len(good) + 3
  for path in files:
    data = open(path, 'rb').read()
    for secret in secrets:
      assert secret.encode() not in data, (path, secret)
      assert secret not in os.path.relpath(path, out)
  assert 'DICOM' in output                      # the progress bar was captured: the capture works
  assert not [s for s in secrets if s in output]
  # The key map, outside the output, is where the PHI went (so the greps above had something to find).
  private = key_map.read_text()
  assert PHI_FOLDER in private and F.PHI['AccessionNumber'] in private


def test_conversion_json_salt_check_is_slow_and_audit_complete(dicom_tree, converted):
  out, _, _, _ = converted
  config = json.loads((out / 'conversion.json').read_text())
  check = config['salt_check']
  assert check['kdf'] == 'scrypt' and check['n'] >= 2 ** 14 and len(check['nonce']) == 32
  assert convert_dicom.salt_matches(check, SALT) and not convert_dicom.salt_matches(check, SALT + 'x')
  audit = config['deidentification']
  assert {'outside_sector', 'inside_sector', 'not_removed', 'limits'} <= set(audit['policy'])
  rows = convert_dicom.read_manifest(out)
  assert set(audit['files']) == {r['video_id'] for r in rows}
  for row in rows:
    record = audit['files'][row['video_id']]
    assert record['mask_source'] == row['mask_source'] and record['crop_box'] == row['crop_box']
    assert record['geometry'] == json.loads(row['geometry']) and 'geometry_output' in record
    assert len(record['removed_regions']) == row['overlay_removed']
  assert audit['summary']['videos'] == len(rows) and audit['summary']['videos_with_inpainted_overlay'] == 1
  bad_uid = next(r for r in rows if r['study_id'] == dicom.study_key(BAD_UID, SALT))
  assert audit['files'][bad_uid['video_id']]['pydicom_warnings'] >= 1


def test_avi_keeps_masked_output(dicom_tree, converted):
  """The written AVI (lossy MJPG) matches convert_one's output and keeps the in-box text area black."""
  _, good, _ = dicom_tree
  out, _, _, _ = converted
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


def test_avi_shows_no_trace_of_text_over_the_tissue(dicom_tree, converted, tmp_path):
  _, good, _ = dicom_tree
  out, _, _, _ = converted
  source = good[f'{PHI_FOLDER}/19610723/IM0005']
  _, meta = dicom.convert_one(source.path, salt=SALT)
  frames, _ = read_video(next(r['path'] for r in convert_dicom.read_manifest(out)
                              if r['video_id'] == meta['video_id']))
  twin = F.write_cine(tmp_path / 'twin', encoding='jpeg', seed=5, text=False, noise_sigma=3.0)
  twin_video, twin_meta = dicom.convert_one(twin.path, salt=SALT)
  assert twin_meta['crop_box'] == meta['crop_box']
  weight = F.to_output(F.tissue_glyphs(), sector_mask.parse_box(meta['crop_box']))
  F.assert_no_glyph_shape(frames, twin_video, weight, 'avi')


def test_preview_does_not_show_banner(dicom_tree, converted):
  _, good, _ = dicom_tree
  out, _, _, _ = converted
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
  out, first, _, _ = converted
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
    convert_dicom.convert_dicom_folder(root, out, salt='another-salt-0123456789', progress=False)
  with pytest.raises(ValueError, match='other options'):
    convert_dicom.convert_dicom_folder(root, out, salt=SALT, max_frames=50, progress=False)
  with pytest.raises(ValueError, match='salt is too weak'):
    convert_dicom.convert_dicom_folder(root, out, salt='folder-salt', progress=False)


def test_old_outputs_are_upgraded(tmp_path):
  """A folder from before this version (fast salt check, source paths in rejected.csv) is rewritten."""
  src, out = tmp_path / 'in', tmp_path / 'out'
  (src / PHI_FOLDER).mkdir(parents=True)
  (src / PHI_FOLDER / 'notes.txt').write_text('not an image')
  out.mkdir()
  (out / 'conversion.json').write_text(json.dumps(dict(
      salt_check=dicom.study_key('echojax-salt-check', SALT),
      options=dict(max_frames=100, min_frames=16, min_fps=25.0, allow_color=False))))
  with open(out / 'rejected.csv', 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['path', 'reason', 'source_key'])
    writer.writerow([f'{PHI_FOLDER}/old.dcm', 'not a DICOM file', 'ab' * 8])
  convert_dicom.convert_dicom_folder(src, out, salt=SALT, progress=False)
  assert json.loads((out / 'conversion.json').read_text())['salt_check']['kdf'] == 'scrypt'
  assert PHI_FOLDER not in (out / 'rejected.csv').read_text()
  assert len(convert_dicom.read_rejects(out)) == 2


def test_cli_salts_and_retry_rejected(tmp_path, monkeypatch, capsys):
  monkeypatch.delenv('ECHOJAX_DICOM_SALT', raising=False)
  src = tmp_path / 'in'
  src.mkdir()
  F.write_cine(src / 'colour.dcm', encoding='jpeg', colour_blobs=True)
  out = tmp_path / 'out'
  salt_file = tmp_path / 'salt.txt'
  salt_file.write_text(SALT + '\n')
  assert convert_dicom.main(['--input', str(src), '--output', str(out), '--salt-file', str(salt_file),
                             '--no-progress']) == 0
  assert [r['reason'][:14] for r in convert_dicom.read_rejects(out)] == ['colour Doppler']
  monkeypatch.setenv('ECHOJAX_DICOM_SALT', SALT)        # the same salt from the environment
  assert convert_dicom.main(['--input', str(src), '--output', str(out), '--no-progress',
                             '--allow-color', '--retry-rejected']) == 0
  assert convert_dicom.read_rejects(out) == [] and len(convert_dicom.read_manifest(out)) == 1
  monkeypatch.delenv('ECHOJAX_DICOM_SALT')
  with pytest.raises(SystemExit):
    convert_dicom.main(['--input', str(src), '--output', str(out)])   # no salt
  for weak in ('a', '   ', 'short-salt', 'x' * 30):
    capsys.readouterr()
    with pytest.raises(SystemExit):
      convert_dicom.main(['--input', str(src), '--output', str(tmp_path / 'weak'), '--salt', weak])
    assert 'salt' in capsys.readouterr().err and not (tmp_path / 'weak').exists()
  with pytest.raises(SystemExit):
    convert_dicom.main(['--input', str(src), '--output', str(out), '--salt', SALT, '--key-map',
                        str(out / 'keys.csv')])
  assert 'must not be written inside the output folder' in capsys.readouterr().err
  # An output folder inside the input folder is not walked as input.
  nested = src / 'converted'
  for _ in range(2):
    summary = convert_dicom.convert_dicom_folder(src, nested, salt=SALT, allow_color=True, progress=False)
  assert summary['skipped'] == 1 and summary['total_rejected'] == 0 and summary['total_videos'] == 1
