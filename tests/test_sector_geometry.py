"""Tests of echojax.data.sector_geometry / sector_mask.find_sector: the noise floor, the fan/linear model fit,
and the same 112² geometry for one acquisition at another resolution, with or without a region box, from one
cardiac cycle, under frame-grabber noise — on generated cines and on pydicom's real SonoSite cine."""
import json

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from echojax.data import dicom, sector_geometry as G, sector_mask
from tests import dicom_fixtures as F

SALT = 'test-salt-geometry-0123'


def _stats_of(gray):
  return sector_mask.temporal_stats(np.ascontiguousarray(gray))


def _close(a: dict, b: dict, *, px=2.0, deg=1.5):
  """Two in_output() geometries agree: apex and radii within px output pixels, angles within deg."""
  assert a['kind'] == b['kind'] == 'sector', (a, b)
  assert np.allclose(a['apex'], b['apex'], atol=px), (a, b)
  assert np.allclose(a['half_angles_deg'], b['half_angles_deg'], atol=deg), (a, b)
  assert abs(a['radius'] - b['radius']) <= px and abs(a['inner_radius'] - b['inner_radius']) <= px, (a, b)


# ---------------------------------------------------------------------------------------------------------
# Noise floor

@pytest.mark.parametrize('sigma', [1.0, 3.0, 5.0])
def test_noise_floor_of_a_noisy_capture(sigma):
  """A mid-grey static background with white noise: σ is recovered and the motion threshold sits above it."""
  rng = np.random.default_rng(0)
  frames = np.clip(100 + rng.normal(0, sigma, (20, 120, 160)), 0, 255).astype(np.uint8)
  stats = _stats_of(frames)
  noise = stats.noise()
  assert noise.sigma == pytest.approx(sigma, rel=0.15)
  assert (stats.std_smooth > noise.moving_threshold).mean() < 0.001   # noise never counts as motion


def test_noise_floor_of_a_digital_export():
  frames = np.zeros((20, 120, 160), np.uint8)
  frames[:, 40:80, 60:100] = np.random.default_rng(0).integers(0, 255, (20, 40, 40))
  noise = _stats_of(frames).noise()
  assert noise.sigma == 0 and noise.moving_threshold == G.MIN_MOVING


# ---------------------------------------------------------------------------------------------------------
# Model fit on drawn regions

def _fan(shape, apex, radius, left, right, inner=0.0):
  geometry = G.Geometry(kind='sector', apex=apex, half_angles_deg=(left, right), radius=radius,
                        inner_radius=inner)
  return geometry.to_mask(shape)


def _fit(region, std_smooth=None, static=None):
  std_smooth = np.where(region, 10.0, 0.0).astype(np.float32) if std_smooth is None else std_smooth
  return G.fit_geometry(region, std_smooth, G.NoiseFloor(0.0, 0.0, G.MIN_MOVING), static)


def test_fit_recovers_a_phased_array_fan():
  region = _fan((240, 320), (160.0, 30.0), 170.0, 40.0, 40.0)
  fit = _fit(region)
  assert fit.kind == 'sector' and fit.inner_radius == 0 and fit.symmetric
  assert np.allclose(fit.apex, (160, 30), atol=1.5) and np.allclose(fit.half_angles_deg, 40, atol=1)
  assert fit.radius == pytest.approx(170, abs=2)


def test_fit_recovers_a_curvilinear_footprint():
  region = _fan((240, 320), (160.0, -60.0), 280.0, 30.0, 30.0, inner=80.0) & (np.arange(240)[:, None] >= 0)
  fit = _fit(region)
  assert fit.kind == 'sector' and fit.inner_radius == pytest.approx(80, abs=4)
  assert np.allclose(fit.apex, (160, -60), atol=4) and fit.radius == pytest.approx(280, abs=4)


def test_fit_of_a_linear_footprint():
  region = np.zeros((240, 320), bool)
  region[20:220, 90:230] = True
  fit = _fit(region)
  assert fit.kind == 'linear' and fit.rect == sector_mask.Box(90, 20, 229, 219)


def test_dim_wing_is_mirrored_only_when_it_varies_and_is_not_graphics():
  """A fan whose right wing (the last 15°) varies too little to pass the threshold but more than noise."""
  shape = (240, 320)
  full = _fan(shape, (160.0, 30.0), 170.0, 40.0, 40.0)
  detected = _fan(shape, (160.0, 30.0), 170.0, 40.0, 27.0)
  wing = full & ~detected
  floor = G.NoiseFloor(1.0, 0.2, 0.6)
  std_smooth = np.full(shape, 0.2, np.float32)
  std_smooth[detected] = 10.0
  std_smooth[wing] = 0.45                 # above the noise floor, below the motion threshold
  fit = G.fit_geometry(detected, std_smooth, floor)
  assert fit.symmetric and np.allclose(fit.half_angles_deg, 40, atol=1.5)
  quiet = np.where(wing, 0.2, std_smooth).astype(np.float32)      # background there: a truly narrower fan
  assert not G.fit_geometry(detected, quiet, floor).symmetric
  graphics = G.fit_geometry(detected, std_smooth, floor, static=wing)  # a scale column drawn there
  assert not graphics.symmetric and graphics.half_angles_deg[1] == pytest.approx(27, abs=1.5)


def test_find_sector_sources():
  shape = (120, 160)
  still = sector_mask.TemporalStats(mean=np.zeros(shape, np.float32), std=np.zeros(shape, np.float32))
  box = sector_mask.Box(10, 10, 89, 99)
  assert sector_mask.find_sector(still, None) is None
  found = sector_mask.find_sector(still, box)
  assert found.source == 'region (no motion)' and found.crop_box == box and found.geometry.kind == 'box'
  moving_std = np.zeros(shape, np.float32)
  moving_std[20:100, 100:150] = 20.0            # motion only outside the region box
  moving = sector_mask.TemporalStats(mean=np.full(shape, 10, np.float32), std=moving_std)
  disagreed = sector_mask.find_sector(moving, box)
  assert disagreed.source == 'motion (region box disagreed)' and disagreed.crop_box.x0 >= 95
  only_motion = sector_mask.find_sector(moving, None, region_box_untrusted=True)
  assert only_motion.source == 'motion (region box outside image)'
  assert abs(only_motion.crop_box.x0 - 100) <= 3 and abs(only_motion.crop_box.y1 - 99) <= 3
  inside = sector_mask.find_sector(moving, sector_mask.Box(90, 10, 159, 110))
  assert inside.source == 'region+motion'


# ---------------------------------------------------------------------------------------------------------
# One acquisition, many exports: generated cines through the whole converter

def _geometry(cine_path):
  ds = dicom.read_dataset(cine_path)
  cine = dicom.convert_dataset(ds, salt=SALT)
  return cine.deid['geometry_output'], cine.metadata


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  path = tmp_path_factory.mktemp('ref') / 'ref.dcm'
  F.write_cine(path, encoding='rgb', frames=40)
  return _geometry(str(path))


@pytest.mark.parametrize('variant', [
    dict(region_box=None), dict(scale=0.6), dict(scale=1.5, region_box=None), dict(frames=16),
    dict(noise_sigma=1.0), dict(noise_sigma=3.0, region_box=None), dict(noise_sigma=5.0, encoding='jpeg'),
    dict(noise_sigma=5.0, scale=0.6, region_box=None)])
def test_same_output_geometry_for_every_export(tmp_path, reference, variant):
  variant = dict(dict(encoding='rgb', frames=40), **variant)
  geometry, meta = _geometry(F.write_cine(tmp_path / 'c.dcm', **variant).path)
  _close(geometry, reference[0])
  assert meta['mask_source'] == ('motion' if 'region_box' in variant else 'region+motion')
  # The true fan (apex (160, 28), radius 175, 42°) itself, mapped into the output, is what was fitted.
  fitted = json.loads(meta['geometry'])
  scale = variant.get('scale', 1.0)
  assert np.allclose(fitted['apex'], (160 * scale, 28 * scale), atol=3 * scale + 1)
  assert fitted['half_angles_deg'] == pytest.approx([42, 42], abs=1)


# ---------------------------------------------------------------------------------------------------------
# pydicom's real SonoSite cine (JPEG YBR_FULL_422, 30 frames, a dim right wing, region box of a 2x original)

@pytest.fixture(scope='module')
def sonosite():
  path = get_testdata_file('examples_ybr_color.dcm')
  if path is None:
    pytest.skip("pydicom's examples_ybr_color.dcm is not available")
  ds = dicom.read_dataset(path)
  gray = np.stack([dicom.to_luma(f) for f in dicom.decode_frames(ds)])
  return ds, gray


def _output_geometry(gray, box=None):
  sector = sector_mask.find_sector(_stats_of(gray), box)
  return sector, sector.geometry.in_output(sector.crop_box, 112)


def test_sonosite_fan_includes_both_wings(sonosite):
  _, gray = sonosite
  sector, _ = _output_geometry(gray)
  assert sector.geometry.kind == 'sector' and sector.geometry.symmetric
  # The region box (of the 480x640 original) halved is the fan's extent; the motion-only mask of the old
  # converter stopped at x = 252, missing the dim right wing.
  box = sector.crop_box
  assert abs(box.x0 - 42) <= 4 and abs(box.x1 - 297) <= 6 and abs(box.y1 - 207) <= 5
  assert abs(sector.geometry.apex[0] - (42 + 297) / 2) <= 3


def test_sonosite_geometry_is_stable(sonosite):
  ds, gray = sonosite
  _, full = _output_geometry(gray)
  for variant in (gray[:15],                                                   # one cardiac cycle
                  np.stack([cv2.resize(f, (160, 120), interpolation=cv2.INTER_AREA) for f in gray]),
                  np.stack([cv2.resize(f, (640, 480), interpolation=cv2.INTER_LINEAR) for f in gray])):
    _close(_output_geometry(variant)[1], full)
  # With the region box, rescaled to this image (it fits now): the same geometry as without it.
  region = ds.SequenceOfUltrasoundRegions[0]
  box = sector_mask.Box(*(int(round(getattr(region, f'RegionLocation{k}') / 2))
                          for k in ('MinX0', 'MinY0', 'MaxX1', 'MaxY1')))
  with_box, geometry = _output_geometry(gray, box)
  assert with_box.source == 'region+motion'
  _close(geometry, full, px=1.0, deg=0.5)


def test_sonosite_converts_with_recorded_geometry(sonosite):
  path = get_testdata_file('examples_ybr_color.dcm')
  ds, gray = sonosite
  cine = dicom.convert_dataset(pydicom.dcmread(path), salt=SALT)
  assert cine.video.shape == (30, 112, 112) and cine.video.mean() > 5
  record = cine.deid
  assert record['mask_source'] == 'motion (region box outside image)'
  assert record['geometry']['kind'] == 'sector' and record['noise_sigma'] == 0
  assert json.loads(cine.metadata['geometry']) == record['geometry']
  # Its burned-in text is gone: every static bright pixel maps outside the output or onto 0, except inside
  # regions recorded as inpainted, where it is no longer bright.
  stats = _stats_of(gray)
  static = (stats.std == 0) & (stats.mean > 100)
  removed = np.zeros_like(static)
  for x0, y0, x1, y1 in record['removed_regions']:
    removed[y0:y1 + 1, x0:x1 + 1] = True
  box = sector_mask.parse_box(cine.metadata['crop_box'])
  for part, check in ((static & ~removed, lambda v, src: v.max(initial=0) == 0),
                      (static & removed, lambda v, src: v.size == 0 or v.mean() < 0.5 * src.mean())):
    ys, xs = np.nonzero(part)
    mapped = np.round(sector_mask.to_output_coords(np.stack([xs, ys], 1), box, 112)).astype(int)
    inside = (mapped >= 0).all(1) & (mapped < 112).all(1)
    assert check(cine.video[:, mapped[inside, 1], mapped[inside, 0]], gray[:, ys, xs])
  assert static.sum() > 100
  assert str(ds.PatientName) not in json.dumps(record) + repr(cine.metadata)
