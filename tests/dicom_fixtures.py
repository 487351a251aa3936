"""Synthetic ultrasound DICOM cines for the DICOM tests: a fan-shaped sector of moving speckle, burned-in
banner text made of the header's PHI strings, an ECG trace and a bottom menu bar outside the sector;
optionally PHI text over the moving tissue, frame-grabber noise and another resolution. `text=False` gives the
text-free twin of a cine (same content, same noise), against which de-identified outputs are compared.

All identities below are invented; each PHI string is long and distinctive so a byte search of the outputs
cannot match by chance.
"""
from __future__ import annotations

import dataclasses
import io
from typing import Optional

import cv2
import numpy as np
import pydicom
from PIL import Image
from pydicom import uid as uids
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence

from echojax.data.video_io import to_square_gray

PHI = dict(
    PatientName='QZXDOE^JANEWUV', PatientID='PIDQ778899', PatientBirthDate='19610723',
    StudyDate='20240131', SeriesDate='20240131', ContentDate='20240131', AccessionNumber='ACCQ55667',
    InstitutionName='QZVGENERAL HOSPITAL', ReferringPhysicianName='QZXSMITH^JOHNWUV',
    StationName='QZSTATION9')
PHI_STRINGS = ['QZXDOE', 'JANEWUV', 'PIDQ778899', '19610723', '20240131', 'ACCQ55667', 'QZVGENERAL',
               'QZXSMITH', 'QZSTATION9']
STUDY_UID = '1.2.826.0.1.3680043.8.498.11111111111111111111'
ROWS, COLS = 240, 320
APEX = (160, 28)            # (x, y) of the fan apex
RADIUS = 175
HALF_ANGLE = np.deg2rad(42)
BANNER_ORG = (6, 14)        # cv2.putText origin (bottom-left of the text), top-left, above the fan
BOX_TEXT_ORG = (46, 202)    # birth date inside the region box and the crop box, but outside the fan
TISSUE_TEXT = ((f'{PHI["PatientName"][:6]} {PHI["PatientID"]}', (104, 122)),   # over the moving tissue
               (PHI['PatientBirthDate'], (130, 138)))
TISSUE_FONT = 0.33
REGION_BOX = (4, 22, 315, 222)   # x0 y0 x1 y1 (inclusive), encloses the fan and BOX_TEXT
ECG_ROWS = (206, 222)
BAR_ROWS = (226, 239)


@dataclasses.dataclass
class Cine:
  path: str
  gray: np.ndarray          # (T, H, W) uint8 ground-truth luma of the sector content
  sector: np.ndarray        # bool (H, W) true fan
  rgb: np.ndarray           # (T, H, W, 3) the frames that were encoded


def fan_mask(rows=ROWS, cols=COLS) -> np.ndarray:
  ys, xs = np.mgrid[0:rows, 0:cols]
  dx, dy = xs - APEX[0], ys - APEX[1]
  return (np.hypot(dx, dy) <= RADIUS) & (np.abs(np.arctan2(dx, dy)) <= HALF_ANGLE) & (dy >= 0)


def sector_content(frames: int, rows=ROWS, cols=COLS, seed=0) -> np.ndarray:
  """(T, H, W) uint8 moving, JPEG-friendly speckle (smooth noise that drifts) with a pulsating bright wall."""
  rng = np.random.default_rng(seed)
  base = rng.random((rows // 4 + 8, cols // 4 + 8)).astype(np.float32)
  out = []
  ys, xs = np.mgrid[0:rows, 0:cols]
  for t in range(frames):
    shifted = np.roll(base, (t % 4, t // 2), axis=(0, 1))[:rows // 4, :cols // 4]
    speckle = cv2.resize(shifted, (cols, rows), interpolation=cv2.INTER_CUBIC)
    wall = np.exp(-((np.hypot(xs - APEX[0], ys - APEX[1]) - 110 - 12 * np.sin(t / 3)) / 6) ** 2)
    out.append(np.clip(40 + 130 * speckle + 120 * wall, 0, 255).astype(np.uint8))
  return np.stack(out)


def ecg_trace() -> np.ndarray:
  """(N, 2) int32 (x, y) points of a fixed ECG-like waveform in the ECG_ROWS band."""
  xs = np.arange(20, 300)
  ys = ECG_ROWS[1] - 1 - np.round(10 * np.exp(-(((xs - 20) % 90) - 45) ** 2 / 6)).astype(int)
  return np.stack([xs, ys], 1).astype(np.int32)


MARKER_ORG = (150, 110)     # a static depth label drawn over the sector (inside the fan)


def draw_tissue_text(image: np.ndarray, colour=(255, 255, 255)) -> None:
  for text, org in TISSUE_TEXT:
    cv2.putText(image, text, org, cv2.FONT_HERSHEY_SIMPLEX, TISSUE_FONT, colour, 1, cv2.LINE_AA)


def draw_frames(gray: np.ndarray, *, colour_blobs: bool = False, marker: bool = False, text: bool = True,
                tissue_text: bool = False) -> np.ndarray:
  """RGB frames: content inside the fan, PHI banner + in-box text, a sweeping green ECG, a menu bar;
  optionally a static text marker or PHI text over the sector itself. text=False draws no text at all."""
  sector = fan_mask()
  frames = []
  for t, g in enumerate(gray):
    rgb = np.zeros((ROWS, COLS, 3), np.uint8)
    rgb[sector] = g[sector][:, None]
    if text:
      cv2.putText(rgb, f'{PHI["PatientName"]} {PHI["PatientID"]} {PHI["PatientBirthDate"]}', BANNER_ORG,
                  cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
      cv2.putText(rgb, PHI['PatientBirthDate'], BOX_TEXT_ORG, cv2.FONT_HERSHEY_SIMPLEX, 0.3, (255, 255, 255), 1,
                  cv2.LINE_AA)
    rgb[ECG_ROWS[0]:ECG_ROWS[1] + 1] = 0
    trace = ecg_trace()
    drawn = trace[trace[:, 0] < 20 + 14 * (t + 1)]   # a sweep: the trace is drawn progressively over time
    if len(drawn) > 1:
      cv2.polylines(rgb, [drawn], False, (0, 220, 0), 1)
    rgb[BAR_ROWS[0]:BAR_ROWS[1] + 1, 30:290] = 90
    if text:
      cv2.putText(rgb, PHI['InstitutionName'], (40, 236), cv2.FONT_HERSHEY_SIMPLEX, 0.3, (250, 250, 250), 1)
    if marker and text:
      cv2.putText(rgb, '12', MARKER_ORG, cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 3)
    if tissue_text and text:
      draw_tissue_text(rgb)
    if colour_blobs:
      cy, cx = 120 + int(10 * np.sin(t)), 160
      cv2.circle(rgb, (cx, cy), 18, (230, 30, 20), -1)
      cv2.circle(rgb, (cx + 30, cy + 10), 12, (20, 40, 230), -1)
    frames.append(rgb)
  return np.stack(frames)


def base_dataset(*, frames: int, sop_uid: Optional[str] = None, study_uid: str = STUDY_UID,
                 transfer_syntax=uids.ExplicitVRLittleEndian, modality='US',
                 sop_class=uids.UltrasoundMultiFrameImageStorage) -> Dataset:
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = sop_class
  meta.MediaStorageSOPInstanceUID = sop_uid or uids.generate_uid()
  meta.TransferSyntaxUID = transfer_syntax
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID = sop_class
  ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
  ds.StudyInstanceUID = study_uid
  ds.SeriesInstanceUID = uids.generate_uid()
  ds.Modality = modality
  for keyword, value in PHI.items():
    setattr(ds, keyword, value)
  if frames > 1:
    ds.NumberOfFrames = frames
  return ds


def add_region(ds, box=REGION_BOX, data_type=1, spatial=1) -> None:
  region = Dataset()
  region.RegionSpatialFormat = spatial
  region.RegionDataType = data_type
  region.RegionFlags = 0
  region.RegionLocationMinX0, region.RegionLocationMinY0, region.RegionLocationMaxX1, region.RegionLocationMaxY1 = box
  region.PhysicalUnitsXDirection = 3
  region.PhysicalUnitsYDirection = 3
  region.PhysicalDeltaX = 0.05
  region.PhysicalDeltaY = 0.05
  ds.SequenceOfUltrasoundRegions = Sequence([*ds.get('SequenceOfUltrasoundRegions', []), region])


def _jpeg(rgb: np.ndarray, quality=95) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rgb).convert('YCbCr').save(buf, format='JPEG', quality=quality, subsampling='4:2:2')
  return buf.getvalue()


def _j2k(rgb: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format='JPEG2000', no_jp2=True, irreversible=False, mct=1)
  return buf.getvalue()


def _set_image(ds, frames: np.ndarray, encoding: str) -> None:
  """Fills the Image Pixel module; `frames` is RGB (T, H, W, 3)."""
  ds.Rows, ds.Columns = frames.shape[1:3]
  ds.BitsAllocated = ds.BitsStored = 8
  ds.HighBit = 7
  ds.PixelRepresentation = 0
  luma = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])
  if encoding in ('jpeg', 'j2k'):
    ds.file_meta.TransferSyntaxUID = uids.JPEGBaseline8Bit if encoding == 'jpeg' else uids.JPEG2000Lossless
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PhotometricInterpretation = 'YBR_FULL_422' if encoding == 'jpeg' else 'YBR_RCT'
    ds.PixelData = encapsulate([(_jpeg if encoding == 'jpeg' else _j2k)(f) for f in frames])
    ds['PixelData'].VR = 'OB'
  elif encoding in ('rgb', 'rle'):
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PhotometricInterpretation = 'RGB'
    ds.PixelData = frames.tobytes()
    if encoding == 'rle':
      ds.compress(uids.RLELossless, generate_instance_uid=False)
  elif encoding in ('mono2', 'mono1'):
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = 'MONOCHROME2' if encoding == 'mono2' else 'MONOCHROME1'
    ds.PixelData = (luma if encoding == 'mono2' else 255 - luma).tobytes()
  elif encoding == 'palette':
    # An inverting grey LUT with 16-bit entries: the output matches the content only if the LUT is applied.
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = 'PALETTE COLOR'
    lut = ((255 - np.arange(256)) * 257).astype('<u2').tobytes()
    for colour in ('Red', 'Green', 'Blue'):
      setattr(ds, f'{colour}PaletteColorLookupTableDescriptor', [256, 0, 16])
      setattr(ds, f'{colour}PaletteColorLookupTableData', lut)
    ds.PixelData = (255 - luma).tobytes()
  else:
    raise ValueError(encoding)


def tissue_glyphs(scale: float = 1.0, marker: bool = False) -> np.ndarray:
  """uint8 (H, W) 255 where the over-tissue text (and marker) is drawn, at the encoded resolution."""
  glyph = np.zeros((ROWS, COLS), np.uint8)
  draw_tissue_text(glyph, 255)
  if marker:
    cv2.putText(glyph, '12', MARKER_ORG, cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 3)
  return glyph if scale == 1 else rescale(glyph[None], scale)[0]


def to_output(image: np.ndarray, crop_box) -> np.ndarray:
  """A source-resolution uint8 map put through the converter's crop, pad and resize."""
  return to_square_gray(np.ascontiguousarray(image[crop_box.y0:crop_box.y1 + 1, crop_box.x0:crop_box.x1 + 1]))


def add_noise(rgb: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
  """Frame-grabber noise: independent grey Gaussian noise per pixel and frame (clipped to 8 bits)."""
  noise = np.random.default_rng(1000 + seed).normal(0.0, sigma, rgb.shape[:3]).astype(np.float32)
  return np.clip(rgb + noise[..., None], 0, 255).astype(np.uint8)


def rescale(frames: np.ndarray, scale: float) -> np.ndarray:
  """The same cine exported at another resolution (INTER_AREA down, bilinear up)."""
  rows, cols = int(round(frames.shape[1] * scale)), int(round(frames.shape[2] * scale))
  method = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
  return np.stack([cv2.resize(f, (cols, rows), interpolation=method) for f in frames])


def write_cine(path, *, frames: int = 20, encoding: str = 'jpeg', frame_time_ms: Optional[float] = 20.0,
               region_box=REGION_BOX, colour_blobs=False, marker=False, seed=0, sop_uid=None, study_uid=STUDY_UID,
               text: bool = True, tissue_text: bool = False, noise_sigma: float = 0.0, scale: float = 1.0,
               **tags) -> Cine:
  """Writes a US multi-frame cine (50 fps via FrameTime by default) and returns its ground truth (at the
  base resolution ROWS×COLS: `scale` only resamples the frames that are encoded, and the region box)."""
  gray = sector_content(frames, seed=seed)
  rgb = draw_frames(gray, colour_blobs=colour_blobs, marker=marker, text=text, tissue_text=tissue_text)
  if noise_sigma:
    rgb = add_noise(rgb, noise_sigma, seed)
  encoded = rgb if scale == 1 else rescale(rgb, scale)
  ds = base_dataset(frames=frames, sop_uid=sop_uid, study_uid=study_uid)
  if frame_time_ms is not None:
    ds.FrameTime = frame_time_ms
    ds.FrameIncrementPointer = pydicom.tag.Tag('FrameTime')
  if region_box is not None:
    add_region(ds, [int(round(v * scale)) for v in region_box])
  for keyword, value in tags.items():
    setattr(ds, keyword, value)
  _set_image(ds, encoded, encoding)
  ds.save_as(str(path), enforce_file_format=True)
  return Cine(path=str(path), gray=gray, sector=fan_mask(), rgb=rgb)


def write_dataset(path, ds) -> str:
  ds.save_as(str(path), enforce_file_format=True)
  return str(path)


def structured_report(path) -> str:
  ds = base_dataset(frames=1, sop_class=uids.ComprehensiveSRStorage, modality='SR')
  ds.ValueType = 'CONTAINER'
  return write_dataset(path, ds)


def no_pixel_data(path) -> str:
  ds = base_dataset(frames=20)
  ds.Rows, ds.Columns = ROWS, COLS
  return write_dataset(path, ds)


def single_frame(path) -> str:
  ds = base_dataset(frames=1, sop_class=uids.UltrasoundImageStorage)
  _set_image(ds, draw_frames(sector_content(1))[:1], 'rgb')
  return write_dataset(path, ds)


def fake_encapsulated(path, transfer_syntax, *, frames: int = 20) -> str:
  """A cine whose fragments are garbage bytes under a compressed transfer syntax."""
  ds = base_dataset(frames=frames, transfer_syntax=transfer_syntax)
  ds.FrameTime = 20.0
  ds.Rows, ds.Columns = ROWS, COLS
  ds.BitsAllocated = ds.BitsStored = 8
  ds.HighBit = 7
  ds.PixelRepresentation = 0
  ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
  ds.PhotometricInterpretation = 'YBR_FULL_422'
  ds.PixelData = encapsulate([b'\xff\xd8\xff\xe0' + bytes(range(200)) for _ in range(frames)])
  ds['PixelData'].VR = 'OB'
  return write_dataset(path, ds)


def assert_no_glyph_shape(shown, twin, glyph_weight, what, *, max_bright=6.0, max_corr=0.4, mean_corr=0.15):
  """`shown` (T, H, W) vs its text-free twin where `glyph_weight` (0–255, (H, W)) says text was drawn: no
  bright letters, no letter-shaped holes, no difference that correlates with the letters. Inpainted tissue
  differs from the true tissue at random in each frame; a glyph residue differs the same way in all."""
  glyph = glyph_weight >= 64
  assert glyph.sum() > 10, what
  ys, xs = np.nonzero(glyph_weight > 0)
  window = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
  diff = shown.astype(np.float64) - twin
  mean_diff = diff.mean(0)
  bright = mean_diff[glyph].mean() - mean_diff[window][~glyph[window]].mean()
  assert abs(bright) < max_bright, (what, bright)      # letters neither brighter nor darker than around them
  corr = [np.corrcoef(f[window].ravel(), glyph_weight[window].ravel())[0, 1] for f in diff]
  corr = np.nan_to_num(corr)
  assert np.abs(corr).max() < max_corr and abs(corr.mean()) < mean_corr, (what, corr.min(), corr.max())
  return bright
