"""Tests of echojax.data.dicom / sector_mask: decoding (colour spaces, LUTs), sector masking, frame rates,
rejects with specific reasons, salts, captured pydicom warnings, and pydicom's own ultrasound samples.
(Overlay removal: test_deid.py; sector geometry: test_sector_geometry.py.)"""
import glob
import logging
import os
import secrets
import warnings

import cv2
import numpy as np
import pydicom
import pytest
from pydicom import uid as uids
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from echojax.data import dicom, sector_mask
from echojax.data.video_io import to_square_gray
from tests import dicom_fixtures as F

SALT = 'test-salt-0123456789'
ENCODINGS = ['jpeg', 'j2k', 'rle', 'rgb', 'mono2', 'mono1', 'palette']


def _read(path):
  return dicom.read_dataset(str(path))


def _expected_output(cine, box):
  """The ground-truth sector content put through the same crop/pad/resize as the converter's output."""
  return np.stack([to_square_gray(np.where(cine.sector, g, 0).astype(np.uint8)[box.y0:box.y1 + 1,
                                                                                box.x0:box.x1 + 1])
                   for g in cine.gray])


def _pure_graphics_in_output(cine, box):
  """Output pixels that come only from drawn graphics (text, ECG, bar), none from the sector."""
  drawn = (cine.rgb.max(-1) > 0).any(0) & ~cine.sector
  crop = lambda m: to_square_gray((m * 255).astype(np.uint8)[box.y0:box.y1 + 1, box.x0:box.x1 + 1])
  return (crop(drawn) > 0) & (crop(cine.sector) == 0)


@pytest.mark.parametrize('encoding', ENCODINGS)
def test_encodings_mask_crop_and_content(tmp_path, encoding):
  cine = F.write_cine(tmp_path / 'cine.dcm', encoding=encoding)
  video, meta = dicom.convert_one(cine.path, salt=SALT)
  assert video.dtype == np.uint8 and video.shape == (20, 112, 112)
  assert (meta['fps'], meta['fps_source']) == (50.0, 'FrameTime')
  assert meta['mask_source'] == 'region+motion'
  assert (meta['orig_rows'], meta['orig_cols']) == (F.ROWS, F.COLS)
  box = sector_mask.parse_box(meta['crop_box'])
  ys, xs = np.nonzero(cine.sector)
  assert np.allclose([box.x0, box.y0, box.x1, box.y1], [xs.min(), ys.min(), xs.max(), ys.max()], atol=4)
  # Sector content survives (inside the fan, away from its edge).
  expected = _expected_output(cine, box)
  inner_src = cv2.erode(cine.sector.astype(np.uint8), np.ones((9, 9), np.uint8))
  inner = to_square_gray((inner_src * 255)[box.y0:box.y1 + 1, box.x0:box.x1 + 1]) > 200
  assert np.corrcoef(video[:, inner].ravel(), expected[:, inner].ravel())[0, 1] > 0.95
  # The in-box date text (inside the crop box) and anything else drawn outside the fan is zero.
  graphics = _pure_graphics_in_output(cine, box)
  assert graphics.sum() > 20     # the check below covers real text pixels
  assert video[:, graphics].max() == 0
  # Banner (above the fan) maps outside the output, or onto zeros.
  banner = np.array([[x, y] for x in range(F.BANNER_ORG[0], 200, 4) for y in range(5, 16)])
  mapped = np.round(sector_mask.to_output_coords(banner, box, 112)).astype(int)
  inside = (mapped >= 0).all(1) & (mapped < 112).all(1)
  assert video[:, mapped[inside, 1], mapped[inside, 0]].max(initial=0) == 0
  assert meta['physical_delta_x_cm'] == pytest.approx(0.05)
  assert meta['output_pixel_cm'] == pytest.approx(0.05 * max(box.width, box.height) / 112)


def test_motion_mask_alone_removes_text_and_ecg(tmp_path):
  cine = F.write_cine(tmp_path / 'c.dcm', encoding='jpeg', region_box=None)
  video, meta = dicom.convert_one(cine.path, salt=SALT)
  assert meta['mask_source'] == 'motion'
  box = sector_mask.parse_box(meta['crop_box'])
  graphics = _pure_graphics_in_output(cine, box)
  assert graphics.sum() > 20 and video[:, graphics].max() == 0
  assert meta['physical_delta_x_cm'] == ''


def test_region_box_outside_image_falls_back_to_motion(tmp_path):
  cine = F.write_cine(tmp_path / 'c.dcm', encoding='rgb', region_box=(84, 31, 595, 414))
  video, meta = dicom.convert_one(cine.path, salt=SALT)
  assert meta['mask_source'] == 'motion (region box outside image)'
  assert meta['physical_delta_x_cm'] == ''   # the box's scale belongs to another image size
  graphics = _pure_graphics_in_output(cine, sector_mask.parse_box(meta['crop_box']))
  assert video[:, graphics].max() == 0


@pytest.mark.parametrize('sigma', [1.0, 3.0, 5.0])
@pytest.mark.parametrize('region_box', [F.REGION_BOX, None], ids=['box', 'no_box'])
def test_frame_grabber_noise_does_not_widen_the_sector(tmp_path, sigma, region_box):
  """With noise everywhere, the sector is still the fan: banner, in-box text, ECG and menu stay zero."""
  cine = F.write_cine(tmp_path / 'c.dcm', encoding='rgb', noise_sigma=sigma, region_box=region_box)
  video, meta = dicom.convert_one(cine.path, salt=SALT)
  assert meta['noise_sigma'] > 0.4 * sigma
  box = sector_mask.parse_box(meta['crop_box'])
  ys, xs = np.nonzero(cine.sector)
  assert np.allclose([box.x0, box.y0, box.x1, box.y1], [xs.min(), ys.min(), xs.max(), ys.max()], atol=4)
  clean = F.Cine(path=cine.path, gray=cine.gray, sector=cine.sector, rgb=F.draw_frames(cine.gray))
  graphics = _pure_graphics_in_output(clean, box)
  assert graphics.sum() > 20 and video[:, graphics].max() < 2 * sigma + 2   # noise at the fan's rim, no text
  outside = cv2.dilate(cine.sector.astype(np.uint8), np.ones((5, 5), np.uint8)) == 0   # 2 px off the fan
  outside = to_square_gray((outside * 255).astype(np.uint8)[box.y0:box.y1 + 1, box.x0:box.x1 + 1]) == 255
  assert outside.sum() > 1000 and video[:, outside].max() == 0   # the noisy background is masked, not "sector"


def test_clip_region_box():
  assert sector_mask.clip_region_box(sector_mask.Box(0, 0, 320, 240), (240, 320)) == \
      sector_mask.Box(0, 0, 319, 239)      # one-pixel overhang: clipped, trusted
  assert sector_mask.clip_region_box(sector_mask.Box(84, 31, 595, 414), (240, 320)) is None
  assert sector_mask.clip_region_box(sector_mask.Box(10, 10, 5, 50), (240, 320)) is None
  assert sector_mask.clip_region_box(sector_mask.Box(400, 300, 500, 400), (240, 320)) is None


def _frames_of_colour(colour, n=16, rows=64, cols=64):
  frames = np.zeros((n, rows, cols, 3), np.uint8)
  frames[:] = colour
  return frames


@pytest.mark.parametrize('encoding', ['jpeg', 'j2k', 'rle', 'rgb'])
def test_known_colour_decodes_once(tmp_path, encoding):
  """pydicom 3 already turns YBR_FULL_422 JPEG into RGB: a second YBR→RGB conversion would tint it."""
  colour = np.array([200, 40, 60])
  ds = F.base_dataset(frames=16)
  F._set_image(ds, _frames_of_colour(colour), encoding)
  path = F.write_dataset(tmp_path / 'c.dcm', ds)
  first = next(dicom.decode_frames(_read(path)))
  assert first.shape == (64, 64, 3)
  assert np.abs(first.reshape(-1, 3).mean(0) - colour).max() < 8
  twice = pydicom.pixels.convert_color_space(first, 'YBR_FULL', 'RGB')
  assert np.abs(twice.reshape(-1, 3).mean(0) - colour).max() > 40   # the test would see a double conversion


@pytest.mark.parametrize('name', ['examples_ybr_color.dcm', 'SC_ybr_full_422_uncompressed.dcm'])
def test_ybr_conversion_matches_pydicom(name):
  """decode_frames converts raw YCbCr with OpenCV; it must agree with pydicom's own (single) conversion."""
  ds = _read(get_testdata_file(name))
  ours = next(dicom.decode_frames(ds)).astype(int)
  theirs = pydicom.pixels.pixel_array(get_testdata_file(name), index=0).astype(int)
  assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 2


def test_monochrome1_and_palette_are_mapped(tmp_path):
  ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
  frames = np.repeat(np.repeat(ramp[None, :, :, None], 3, -1), 16, 0)
  for encoding in ('mono1', 'palette', 'mono2'):
    ds = F.base_dataset(frames=16)
    F._set_image(ds, frames, encoding)
    path = F.write_dataset(tmp_path / f'{encoding}.dcm', ds)
    first = next(dicom.decode_frames(_read(path)))
    assert first.dtype == np.uint8
    assert np.abs(dicom.to_luma(first).astype(int) - ramp).max() <= 1, encoding


def _fps(**tags):
  ds = Dataset()
  for keyword, value in tags.items():
    setattr(ds, keyword, value)
  return dicom.frame_rate(ds)


def test_frame_rate_sources():
  assert _fps(FrameTime=20.0) == (50.0, 'FrameTime')
  assert _fps(FrameTimeVector=[0, 25, 25, 25]) == (40.0, 'FrameTimeVector')
  assert _fps(CineRate=45) == (45.0, 'CineRate')
  assert _fps(RecommendedDisplayFrameRate=60) == (60.0, 'RecommendedDisplayFrameRate')
  assert _fps() == (dicom.DEFAULT_FPS, 'default')
  assert _fps(FrameTime=0) == (dicom.DEFAULT_FPS, 'default')      # nonsense values are ignored
  # FrameIncrementPointer names the authoritative tag, even when another timing tag is present.
  pointer = pydicom.tag.Tag('FrameTimeVector')
  assert _fps(FrameTime=20.0, FrameTimeVector=[0, 40, 40], FrameIncrementPointer=pointer) == \
      (25.0, 'FrameTimeVector')


def _truncated(tmp_path):
  cine = F.write_cine(tmp_path / 'full.dcm', encoding='jpeg')
  data = open(cine.path, 'rb').read()
  path = tmp_path / 'truncated.dcm'
  path.write_bytes(data[:int(len(data) * 0.6)])
  return path


def _colour_region(tmp_path):
  cine = F.write_cine(tmp_path / 'c.dcm', encoding='rgb')
  ds = pydicom.dcmread(cine.path)
  F.add_region(ds, (100, 60, 220, 150), data_type=2)
  return F.write_dataset(tmp_path / 'colour_region.dcm', ds)


def _spectral_region(tmp_path):
  cine = F.write_cine(tmp_path / 'c.dcm', encoding='rgb')
  ds = pydicom.dcmread(cine.path)
  F.add_region(ds, (0, 150, 319, 239), data_type=3, spatial=3)
  return F.write_dataset(tmp_path / 'spectral.dcm', ds)


def _hsv(tmp_path):
  cine = F.write_cine(tmp_path / 'c.dcm', encoding='rgb')
  ds = pydicom.dcmread(cine.path)
  ds.PhotometricInterpretation = 'HSV'
  return F.write_dataset(tmp_path / 'hsv.dcm', ds)


def _not_us(tmp_path):
  cine = F.write_cine(tmp_path / 'c.dcm', encoding='mono2')
  ds = pydicom.dcmread(cine.path)
  ds.Modality = 'CT'
  return F.write_dataset(tmp_path / 'ct.dcm', ds)


def _write(path, data):
  path.write_bytes(data)
  return path


BAD_INPUTS = {
    'truncated': (_truncated, 'truncated DICOM'),
    'not_dicom': (lambda p: _write(p / 'notes.txt', b'hello, not an image\n'), 'not a DICOM file'),
    'corrupt_header': (lambda p: _write(p / 'x.dcm', bytes(128) + b'DICM' + bytes(range(256)) * 3),
                       'unreadable DICOM'),
    'random_bytes': (lambda p: _write(p / 'blob.bin', bytes(range(256)) * 4), 'not a DICOM file'),
    'no_pixels': (lambda p: F.no_pixel_data(p / 'np.dcm'), 'no pixel data'),
    'sr': (lambda p: F.structured_report(p / 'sr.dcm'), 'structured report'),
    'single_frame': (lambda p: F.single_frame(p / 'one.dcm'), 'single-frame image'),
    'short': (lambda p: F.write_cine(p / 's.dcm', frames=10, encoding='mono2').path,
              'cine too short (10 frames < 16)'),
    'colour_flag': (lambda p: F.write_cine(p / 'c.dcm', encoding='mono2', UltrasoundColorDataPresent=1).path,
                    'colour Doppler (UltrasoundColorDataPresent=1)'),
    'colour_region': (_colour_region, 'colour Doppler (colour-flow region'),
    'colour_pixels': (lambda p: F.write_cine(p / 'c.dcm', encoding='jpeg', colour_blobs=True).path,
                      'colour Doppler (colour pixels in'),
    'fps20': (lambda p: F.write_cine(p / 'c.dcm', encoding='mono2', frame_time_ms=50.0).path,
              'frame rate 20.0 fps < 25'),
    'jpeg_ls': (lambda p: F.fake_encapsulated(p / 'ls.dcm', uids.JPEGLSLossless),
                'unsupported transfer syntax JPEG-LS Lossless'),
    'mpeg4': (lambda p: F.fake_encapsulated(p / 'mp4.dcm', uids.MPEG4HP41),
              'unsupported transfer syntax MPEG-4'),
    'decoder_error': (lambda p: F.fake_encapsulated(p / 'bad.dcm', uids.JPEGBaseline8Bit), 'decoder error'),
    'spectral': (_spectral_region, 'spectral Doppler / M-mode'),
    'not_us': (_not_us, 'not ultrasound (Modality CT)'),
    'photometric': (_hsv, 'unsupported photometric interpretation HSV'),
}


@pytest.mark.parametrize('name', sorted(BAD_INPUTS))
def test_bad_inputs_rejected_with_reason(tmp_path, name):
  make, reason = BAD_INPUTS[name]
  with pytest.raises(dicom.DicomReject) as info:
    dicom.convert_one(make(tmp_path), salt=SALT)
  assert info.value.reason.startswith(reason), info.value.reason
  if name == 'jpeg_ls':
    assert 'python-gdcm' in info.value.reason and 'pylibjpeg + pylibjpeg-libjpeg' in info.value.reason
  if name == 'mpeg4':
    assert 'no pydicom decoder exists' in info.value.reason
  for phi in F.PHI_STRINGS:
    assert phi not in info.value.reason


def test_allow_color_keeps_colour_doppler(tmp_path):
  cine = F.write_cine(tmp_path / 'c.dcm', encoding='jpeg', colour_blobs=True, UltrasoundColorDataPresent=1)
  video, meta = dicom.convert_one(cine.path, salt=SALT, allow_color=True)
  assert video.shape == (20, 112, 112) and meta['colour_fraction'] > dicom.COLOUR_FRACTION


def test_max_frames_and_ids(tmp_path):
  cine = F.write_cine(tmp_path / 'c.dcm', encoding='mono2', frames=24)
  video, meta = dicom.convert_one(cine.path, salt=SALT, max_frames=18)
  assert video.shape[0] == 18 and meta['num_frames'] == 18 and meta['source_num_frames'] == 24
  assert meta['study_id'] == dicom.study_key(F.STUDY_UID, SALT)
  assert meta['video_id'].startswith(meta['study_id'] + '_')
  assert meta['accession_key'] == dicom.study_key(F.PHI['AccessionNumber'], SALT)
  assert dicom.study_key(F.STUDY_UID, 'other-salt-0123456789') != meta['study_id']
  text = repr(meta)
  for phi in F.PHI_STRINGS + [F.STUDY_UID, pydicom.dcmread(cine.path).SOPInstanceUID]:
    assert phi not in text
  with pytest.raises(ValueError):
    dicom.study_key(F.STUDY_UID, '')


def _pydicom_us_files():
  folder = os.path.dirname(get_testdata_file('examples_ybr_color.dcm'))
  found = {}
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    for path in sorted(glob.glob(os.path.join(folder, '*.dcm'))):
      try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
      except Exception:  # pylint: disable=broad-except
        continue
      if ds.get('Modality') == 'US':
        found[os.path.basename(path)] = path
  return found


EXPECTED_PYDICOM_US = {
    'examples_ybr_color.dcm': None,                   # converts (above)
    'examples_jpeg2k.dcm': 'single-frame image',      # power Doppler still, JPEG 2000 YBR_RCT
    'examples_palette.dcm': 'single-frame image',     # PALETTE COLOR still (+ colour flag)
    'examples_rgb_color.dcm': 'single-frame image',
    'ExplVR_BigEnd.dcm': 'single-frame image',        # big-endian RGB still
}


def test_pydicom_us_samples_convert_or_reject_with_reason():
  found = _pydicom_us_files()
  assert set(EXPECTED_PYDICOM_US) <= set(found)
  for name, path in found.items():
    expected = EXPECTED_PYDICOM_US.get(name, 'single-frame image')
    if expected is None:
      dicom.convert_one(path, salt=SALT)
      continue
    with pytest.raises(dicom.DicomReject) as info:
      dicom.convert_one(path, salt=SALT)
    assert info.value.reason == expected, name
  # Their pixels still decode correctly: J2K YBR_RCT and the palette come out as RGB with their colours.
  j2k = next(dicom.decode_frames(_read(found['examples_jpeg2k.dcm'])))
  assert j2k.shape == (480, 640, 3) and (j2k.max(-1).astype(int) - j2k.min(-1) > 100).mean() > 0.01
  palette = next(dicom.decode_frames(_read(found['examples_palette.dcm'])))
  assert palette.shape == (350, 800, 3) and palette.dtype == np.uint8 and palette.max() > 200


def test_other_pydicom_files_rejected_with_reason():
  expectations = {'reportsi.dcm': 'structured report', 'MR_small.dcm': 'not ultrasound (Modality MR)',
                  'rtplan.dcm': 'no pixel data', 'no_meta.dcm': 'not a DICOM file',
                  'README.txt': 'not a DICOM file'}
  for name, reason in expectations.items():
    with pytest.raises(dicom.DicomReject) as info:
      dicom.convert_one(get_testdata_file(name), salt=SALT)
    assert info.value.reason.startswith(reason), (name, info.value.reason)


@pytest.mark.parametrize('salt', ['', '   ', 'a', 'short-salt', 'a' * 24, '12' * 12, ' ' * 20])
def test_weak_salts_are_refused(salt):
  with pytest.raises(ValueError) as info:
    dicom.check_salt(salt)
  assert 'salt' in str(info.value) and (len(salt.strip()) < 5 or salt not in str(info.value))
  with pytest.raises(ValueError):
    dicom.study_key(F.STUDY_UID, salt)


def test_strong_salt_is_accepted():
  salt = secrets.token_urlsafe(24)
  assert dicom.check_salt(salt) == salt and len(dicom.study_key(F.STUDY_UID, salt)) == dicom.HASH_CHARS


def test_pydicom_warnings_never_reach_logs(tmp_path, capfd, caplog):
  """A non-conformant UID makes pydicom warn, quoting the value; the converter records, never prints it."""
  uid = '1.2.826.0.1.3680043.8.498.QZXUIDLEAK7'
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')
    cine = F.write_cine(tmp_path / 'c.dcm', encoding='mono2', study_uid=uid)
  caplog.set_level(logging.DEBUG)
  caplog.clear()
  capfd.readouterr()      # writing the fixture warned (pydicom validates on write too): not the converter
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    ds = dicom.read_dataset(cine.path)
    converted = dicom.convert_dataset(ds, salt=SALT)
  out, err = capfd.readouterr()
  text = out + err + caplog.text + '\n'.join(str(w.message) for w in caught)
  assert 'QZXUIDLEAK7' not in text
  assert converted.deid['pydicom_warnings'] >= 1
  assert converted.metadata['study_id'] == dicom.study_key(uid, SALT)
