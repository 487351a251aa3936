"""Tests of burned-in overlay removal (echojax.data.deid through the converter): text over moving tissue,
frame-grabber noise (σ 1–5), with and without a region box, at another resolution. Each cine is compared
with its text-free twin (same content, same noise): the text-free pixels and the geometry must be unchanged,
and no glyph shape may remain — neither bright letters nor letter-shaped holes — in the video or the preview.
"""
import cv2
import numpy as np
import pydicom
import pytest

from echojax.data import deid, dicom, sector_geometry, sector_mask
from tests import dicom_fixtures as F

SALT = 'test-salt-deid-0123456789'


def _convert(path):
  return dicom.convert_dataset(dicom.read_dataset(str(path)), salt=SALT)


def _box_mask(boxes, shape, grow=0):
  mask = np.zeros(shape, np.uint8)
  for x0, y0, x1, y1 in boxes:
    mask[max(y0 - grow, 0):y1 + grow + 1, max(x0 - grow, 0):x1 + grow + 1] = 255
  return mask


def test_the_glyph_check_sees_holes_and_bright_letters():
  twin = np.random.default_rng(0).integers(40, 200, (5, 40, 60)).astype(np.uint8)
  weight = np.zeros((40, 60), np.uint8)
  cv2.putText(weight, 'QZX', (5, 30), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 255, 2)
  for residue in (np.where(weight > 0, 0, twin), np.where(weight > 0, 255, twin)):
    with pytest.raises(AssertionError):
      F.assert_no_glyph_shape(residue, twin, weight, 'residue')


VARIANTS = {
    'rgb': dict(encoding='rgb'),
    'jpeg_marker': dict(encoding='jpeg', marker=True),
    'noise1_mono': dict(encoding='mono2', noise_sigma=1.0),
    'noise3_no_box': dict(encoding='rgb', noise_sigma=3.0, region_box=None),
    'noise5_jpeg': dict(encoding='jpeg', noise_sigma=5.0),
    'noise5_no_box_marker': dict(encoding='rgb', noise_sigma=5.0, region_box=None, marker=True),
    'downscaled_noise3': dict(encoding='mono2', noise_sigma=3.0, scale=0.6),
    'upscaled_jpeg': dict(encoding='jpeg', scale=1.5, region_box=None),
}


@pytest.mark.parametrize('name', sorted(VARIANTS))
def test_text_over_tissue_is_removed_and_nothing_else_changes(tmp_path, name):
  kwargs = VARIANTS[name]
  scale = kwargs.get('scale', 1.0)
  cine = _convert(F.write_cine(tmp_path / 'phi.dcm', tissue_text=True, **kwargs).path)
  twin = _convert(F.write_cine(tmp_path / 'twin.dcm', text=False, **kwargs).path)
  # (a) the geometry is the twin's
  assert cine.metadata['crop_box'] == twin.metadata['crop_box'], name
  assert cine.metadata['mask_source'] == twin.metadata['mask_source']
  for key in ('apex', 'half_angles_deg'):
    assert np.allclose(cine.deid['geometry_output'][key], twin.deid['geometry_output'][key], atol=0.5)
  assert twin.deid['removed_regions'] == [] and cine.metadata['overlay_removed'] >= 2
  box = sector_mask.parse_box(cine.metadata['crop_box'])
  shape = (int(round(F.ROWS * scale)), int(round(F.COLS * scale)))
  # (b) outside the inpainted boxes (grown by a JPEG block and the resize footprint) the video is the twin's
  touched = F.to_output(_box_mask(cine.deid['removed_regions'], shape, grow=8), box) > 0
  assert touched.mean() < 0.25
  same = np.abs(cine.video.astype(int) - twin.video)[:, ~touched]
  assert same.mean() < 0.3 and (same > 3).mean() < 0.002, (name, same.mean(), (same > 3).mean())
  # (c) no residue of the text in the video
  weight = F.to_output(F.tissue_glyphs(scale, kwargs.get('marker', False)), box)
  F.assert_no_glyph_shape(cine.video, twin.video, weight, name)
  # (d) nor in the preview (one frame at full resolution: the inpainted tissue's random error does not average
  # out, a residue would still stand out by 50-200 grey levels), inside the removed boxes (outlines aside)
  inner = _box_mask(cine.deid['removed_regions'], shape, grow=-1) > 0
  glyph = np.where(inner, F.tissue_glyphs(scale, kwargs.get('marker', False)), 0)
  gray = lambda image: np.where(inner, cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), 0)[None]
  F.assert_no_glyph_shape(gray(cine.preview), gray(twin.preview), glyph, name + ' preview', max_bright=15,
                        max_corr=0.3, mean_corr=0.3)


@pytest.mark.parametrize('sigma,region_box', [(0.0, F.REGION_BOX), (5.0, None)])
def test_preview_outlines_removed_regions_and_hides_the_banner(tmp_path, sigma, region_box):
  cine = _convert(F.write_cine(tmp_path / 'phi.dcm', tissue_text=True, encoding='rgb', noise_sigma=sigma,
                               region_box=region_box).path)
  preview = cine.preview
  x0, y0, x1, y1 = cine.deid['removed_regions'][0]
  edge = preview[y0, x0:x1 + 1]
  assert (edge == sector_mask.REMOVED_COLOUR).all(-1).mean() > 0.9
  assert cine.deid['masked_regions'] and (preview == sector_mask.MASKED_COLOUR).all(-1).sum() > 50
  banner = np.zeros((F.ROWS, F.COLS), np.uint8)
  cv2.putText(banner, 'QZXDOE^JANEWUV PIDQ778899 19610723', F.BANNER_ORG, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 255, 1)
  shown = cv2.cvtColor(preview, cv2.COLOR_RGB2GRAY)[2:17, 6:260].astype(float)
  assert np.corrcoef(shown.ravel(), banner[2:17, 6:260].ravel())[0, 1] < 0.2
  # Only the flat fill, pixelated into 16 px blocks, and the outline there: no glyph texture (strokes would
  # make a third of the pixels jump from their neighbour).
  outline = (preview[2:17, 6:260] == sector_mask.MASKED_COLOUR).all(-1)
  jumps = (np.abs(np.diff(shown, axis=1)) > 8) & ~outline[:, 1:] & ~outline[:, :-1]
  assert jumps.mean() < 0.05


def _dense_text_cine(path):
  """Every other text line over the whole fan: no neighbourhood left to inpaint from with confidence."""
  gray = F.sector_content(20)
  rgb = F.draw_frames(gray)
  for frame in rgb:
    for y in range(50, 200, 11):
      cv2.putText(frame, 'QZXDOE PIDQ778899 19610723 QZXDOE', (40, y), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                  (255, 255, 255), 1, cv2.LINE_AA)
  ds = F.base_dataset(frames=20)
  ds.FrameTime = 20.0
  F._set_image(ds, rgb, 'rgb')
  return F.write_dataset(path, ds)


def test_text_over_most_of_the_sector_is_rejected(tmp_path):
  with pytest.raises(dicom.DicomReject, match=r'^burned-in overlay covers \d+% of the sector'):
    dicom.convert_one(_dense_text_cine(tmp_path / 'dense.dcm'), salt=SALT)


def test_frozen_cine_is_rejected(tmp_path):
  """Text cannot be told from tissue when nothing changes (a frame repeated)."""
  gray = np.repeat(F.sector_content(1), 20, axis=0)
  ds = F.base_dataset(frames=20)
  ds.FrameTime = 20.0
  F.add_region(ds)
  F._set_image(ds, F.draw_frames(gray, tissue_text=True), 'rgb')
  with pytest.raises(dicom.DicomReject, match='^tissue barely changes .* burned-in text cannot be told'):
    dicom.convert_one(F.write_dataset(tmp_path / 'frozen.dcm', ds), salt=SALT)


@pytest.mark.parametrize('sigma', [0.0, 1.0, 3.0, 5.0])
def test_static_overlay_detection_under_noise(sigma):
  """Glyph pixels over moving tissue are found at every noise level; tissue and background are not."""
  gray = F.sector_content(24)
  rgb = F.draw_frames(gray, text=False)
  for frame in rgb:
    F.draw_tissue_text(frame)
  if sigma:
    rgb = F.add_noise(rgb, sigma)
  frames = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in rgb])
  stats = sector_mask.temporal_stats(frames)
  static = deid.static_overlay(stats.mean, stats.std, stats.noise(), stats.minimum)
  glyph = F.tissue_glyphs() >= 200
  sector = F.fan_mask()
  assert static[glyph].mean() > 0.6
  grown = cv2.dilate(glyph.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
  assert static[sector & ~grown].mean() < 0.002
  overlay = deid.find_overlay(static, sector)
  filled = overlay.fill
  assert filled[glyph].all() and len(overlay.removed) == 2 and overlay.fraction < 0.1


def test_reject_reasons_quote_no_free_text(tmp_path):
  cine = F.write_cine(tmp_path / 'c.dcm', encoding='mono2')
  ds = pydicom.dcmread(cine.path)
  ds.Modality = 'QZXDOE'
  with pytest.raises(dicom.DicomReject) as info:
    dicom.convert_one(F.write_dataset(tmp_path / 'm.dcm', ds), salt=SALT)
  assert info.value.reason == 'not ultrasound (Modality non-standard)'
  ds = pydicom.dcmread(cine.path)
  ds.PhotometricInterpretation = 'QZXDOE'
  with pytest.raises(dicom.DicomReject) as info:
    dicom.convert_one(F.write_dataset(tmp_path / 'p.dcm', ds), salt=SALT)
  assert info.value.reason == 'unsupported photometric interpretation (non-standard)'


def test_overlay_fill_is_inpainting_not_zeroing():
  frame = np.full((60, 80), 120, np.uint8)
  frame[20:30, 20:60] = 255
  overlay = deid.Overlay(removed=[sector_geometry.Box(18, 18, 61, 31)], fill=_box_mask([(18, 18, 61, 31)],
                                                                                       (60, 80)) > 0,
                         masked=[], fraction=0.1)
  filled = deid.remove(frame, overlay)
  assert np.abs(filled[18:32, 18:62].astype(int) - 120).max() <= 3     # the surroundings' level, no hole
