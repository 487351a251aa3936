"""DICOM ultrasound cine → masked, cropped 112×112 grayscale cine plus technical (PHI-free) metadata.

`convert_one` reads a file, rejects what is not a usable 2D B-mode cine (`DicomReject` with a specific reason),
decodes it with pydicom 3 + Pillow, zeroes everything outside the imaging sector (sector_mask), crops, pads to
square and resizes. Identifiers leave only as salted hashes (`study_key`); no other header value is returned.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import os
import re
import warnings
from typing import Iterator, Optional, Tuple

import cv2
import numpy as np
import pydicom
from pydicom.pixels import apply_color_lut, get_decoder, iter_pixels

from echojax.data import sector_mask
from echojax.data.video_io import to_square_gray

OUTPUT_SIZE = 112
# Used when a cine states no timing at all; 30 fps is the usual display rate of exported echo loops.
DEFAULT_FPS = 30.0
HASH_CHARS = 16
CHROMA_LEVEL = 60           # max-min over RGB; colour-flow maps are saturated, B-mode tints stay well below
COLOUR_FRACTION = 0.005     # of sector pixels (changing ones) coloured in some frame → colour Doppler
_PIXEL_DATA_TAG = b'\xe0\x7f\x10\x00'
_TIMING_KEYWORDS = ('FrameTime', 'FrameTimeVector', 'CineRate', 'RecommendedDisplayFrameRate')
# Header values that must never reach an output, even inside an exception message.
_PHI_KEYWORDS = (
    'PatientName', 'PatientID', 'OtherPatientIDs', 'PatientBirthDate', 'AccessionNumber', 'StudyID',
    'StudyDate', 'SeriesDate', 'AcquisitionDate', 'ContentDate', 'StudyTime', 'InstitutionName',
    'InstitutionAddress', 'ReferringPhysicianName', 'OperatorsName', 'PerformingPhysicianName',
    'StationName', 'StudyInstanceUID', 'SeriesInstanceUID', 'SOPInstanceUID', 'DeviceSerialNumber')
_PIP_NAMES = {'gdcm': 'python-gdcm'}
# Every interpretation pydicom 3 hands back as RGB or grey (YBR_FULL(_422) converted by pydicom, YBR_RCT/ICT
# by the JPEG 2000 decoder, PALETTE COLOR through its LUT here); others would need a conversion we lack.
SUPPORTED_PHOTOMETRIC = ('MONOCHROME1', 'MONOCHROME2', 'RGB', 'YBR_FULL', 'YBR_FULL_422', 'YBR_RCT', 'YBR_ICT',
                         'PALETTE COLOR')


class DicomReject(Exception):
  """A file that is not converted; `reason` is specific and free of header values."""

  def __init__(self, reason: str):
    self.reason = ' '.join(str(reason).split())   # one line: it goes into a CSV cell
    super().__init__(self.reason)


def study_key(value: str, salt: str) -> str:
  """Salted sha256 (truncated) of a raw identifier: StudyInstanceUID → study_id, or an accession number →
  the manifest's accession_key, so a label CSV keyed by either can be joined without storing the raw value."""
  value = str(value).strip()
  if not value:
    raise ValueError('empty identifier')
  if not salt:
    raise ValueError('a non-empty salt is required (unsalted hashes of UIDs/accessions can be reversed)')
  return hashlib.sha256(f'{salt}\x1f{value}'.encode()).hexdigest()[:HASH_CHARS]


def is_dicom_file(path) -> bool:
  """DICOM by content: the 'DICM' preamble, or (for preamble-less files) pydicom parsing without force."""
  with open(path, 'rb') as f:
    head = f.read(132)
  if len(head) == 132 and head[128:132] == b'DICM':
    return True
  try:
    with _quiet_pydicom():
      pydicom.dcmread(path, stop_before_pixels=True)
    return True
  except Exception:  # pylint: disable=broad-except
    return False


@contextlib.contextmanager
def _quiet_pydicom():
  """pydicom warnings/log lines may quote header values (dates, names): keep them out of logs."""
  logger = logging.getLogger('pydicom')
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter('ignore')
      yield
  finally:
    logger.setLevel(level)


def scrub(message: str, ds) -> str:
  """Removes any PHI header value that appears verbatim in `message` (e.g. a decoder's error text)."""
  for keyword in _PHI_KEYWORDS:
    value = str(ds.get(keyword, '') or '') if ds is not None else ''
    for part in {value, *value.split('^')}:
      if len(part.strip()) >= 2:
        message = message.replace(part.strip(), '<redacted>')
  return message


def read_dataset(path):
  """Parses a file; raises DicomReject for non-DICOM, unreadable or truncated files."""
  if not is_dicom_file(path):
    raise DicomReject('not a DICOM file')
  with open(path, 'rb') as f:
    data = f.read()
  with _quiet_pydicom(), warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')   # recorded here, never printed
    try:
      ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:  # pylint: disable=broad-except
      raise DicomReject(f'unreadable DICOM (corrupt or truncated header): {type(e).__name__}') from None
  # pydicom stops quietly (a warning) at a premature end of file and drops the element it was reading.
  ended_early = any('end of file' in str(w.message).lower() for w in caught)
  if ended_early or ('PixelData' not in ds and _PIXEL_DATA_TAG in data):
    raise DicomReject('truncated DICOM (file ends before its last element is complete)')
  if 'SOPClassUID' not in ds and 'TransferSyntaxUID' not in getattr(ds, 'file_meta', {}):
    raise DicomReject('unreadable DICOM (no SOP Class UID or transfer syntax: corrupt header)')
  return ds


def frame_rate(ds) -> Tuple[float, str]:
  """(fps, source keyword): FrameIncrementPointer's target first, then the usual tags, else DEFAULT_FPS."""
  pointed = []
  pointer = ds.get('FrameIncrementPointer')
  if pointer is not None:
    tags = pointer if isinstance(pointer, (list, pydicom.multival.MultiValue)) else [pointer]
    pointed = [pydicom.datadict.keyword_for_tag(t) for t in tags]
  order = [k for k in pointed if k in _TIMING_KEYWORDS] + list(_TIMING_KEYWORDS)
  for keyword in order:
    fps = _fps_from(ds, keyword)
    if fps is not None:
      return fps, keyword
  return DEFAULT_FPS, 'default'


def _fps_from(ds, keyword) -> Optional[float]:
  value = ds.get(keyword)
  if value is None or value == '':
    return None
  try:
    if keyword == 'FrameTime':
      fps = 1000.0 / float(value)
    elif keyword == 'FrameTimeVector':
      # The vector holds increments (ms) from the previous frame; its first entry is 0.
      steps = [float(v) for v in (value if isinstance(value, (list, pydicom.multival.MultiValue)) else [value])]
      steps = [s for s in steps if s > 0]
      fps = 1000.0 / float(np.mean(steps)) if steps else None
    else:
      fps = float(value)
  except (TypeError, ValueError, ZeroDivisionError):
    return None
  return fps if fps is not None and 0 < fps < 1000 else None


@dataclasses.dataclass
class Regions:
  tissue_box: Optional[sector_mask.Box] = None   # trusted (clipped) 2D tissue region
  tissue_box_untrusted: bool = False              # a 2D tissue region existed but did not fit the image
  colour_flow: bool = False
  spectral_or_mmode: bool = False
  physical_delta_x_cm: Optional[float] = None


def ultrasound_regions(ds, shape) -> Regions:
  """Reads SequenceOfUltrasoundRegions; the largest 2D tissue region that fits the image is the sector box."""
  out = Regions()
  candidates = []
  for region in ds.get('SequenceOfUltrasoundRegions', None) or []:
    spatial, kind = region.get('RegionSpatialFormat'), region.get('RegionDataType')
    if kind == 2:
      out.colour_flow = True
    if spatial in (2, 3) or kind in (3, 4):
      out.spectral_or_mmode = True
    if spatial == 1 and kind == 1:
      try:
        box = sector_mask.Box(int(region.RegionLocationMinX0), int(region.RegionLocationMinY0),
                              int(region.RegionLocationMaxX1), int(region.RegionLocationMaxY1))
      except (AttributeError, TypeError, ValueError):
        out.tissue_box_untrusted = True
        continue
      clipped = sector_mask.clip_region_box(box, shape)
      if clipped is None:
        out.tissue_box_untrusted = True
      else:
        candidates.append((clipped.area, clipped, region))
  if candidates:
    _, out.tissue_box, region = max(candidates, key=lambda c: c[0])
    out.tissue_box_untrusted = False
    if region.get('PhysicalUnitsXDirection') == 3 and region.get('PhysicalDeltaX'):
      out.physical_delta_x_cm = float(region.PhysicalDeltaX)
  return out


def decoder_problem(ds) -> Optional[str]:
  """Why this transfer syntax cannot be decoded here (naming the packages that would), or None."""
  uid = getattr(ds, 'file_meta', pydicom.Dataset()).get('TransferSyntaxUID')
  if uid is None:
    return 'missing transfer syntax UID'
  try:
    decoder = get_decoder(uid)
  except NotImplementedError:
    return (f'unsupported transfer syntax {uid.name} ({uid}): no pydicom decoder exists for it '
            '(transcode it first, e.g. with gdcmconv or dcmtk)')
  if decoder.is_available:
    return None
  options = []
  for dependency in decoder.missing_dependencies:
    plugin, _, needs = dependency.partition(' - requires ')
    packages = [re.split(r'[<>=]', p.strip())[0] for p in needs.split(' and ')] if needs else [plugin]
    packages = [_PIP_NAMES.get(p, p) for p in packages if p != 'numpy']
    options.append(' + '.join(packages))
  return (f'unsupported transfer syntax {uid.name} ({uid}): no decoder installed; '
          f'install {" or ".join(options)}')


def _bits_to_uint8(frame: np.ndarray, ds) -> np.ndarray:
  if frame.dtype == np.uint8:
    return frame
  bits = int(ds.get('BitsStored', 8) or 8)
  frame = frame.astype(np.int64)
  if int(ds.get('PixelRepresentation', 0) or 0) == 1:
    frame = frame + (1 << (bits - 1))
  return np.clip(frame >> max(bits - 8, 0), 0, 255).astype(np.uint8)


def decode_frames(ds, max_frames: Optional[int] = None) -> Iterator[np.ndarray]:
  """Yields uint8 frames: RGB (H, W, 3) for colour data, (H, W) for monochrome (MONOCHROME1 inverted).

  Every colour frame is converted to RGB exactly once. pydicom 3 would convert YBR_FULL/YBR_FULL_422 (native
  or JPEG) itself, in float numpy (slow); we ask for the raw YCbCr instead and convert with OpenCV (same
  full-range BT.601 equations, ~50x faster). J2K YBR_RCT/ICT come out as RGB from the decoder's inverse
  component transform, so they are not converted again; PALETTE COLOR goes through its LUT.
  """
  photometric = str(ds.get('PhotometricInterpretation', '')).strip().upper()
  count = int(ds.get('NumberOfFrames', 1) or 1)
  indices = range(min(count, max_frames) if max_frames else count)
  table = None
  if photometric == 'PALETTE COLOR':
    bits = int(ds.get('BitsStored', 8) or 8)
    lut = apply_color_lut(np.arange(1 << bits, dtype=np.uint16 if bits > 8 else np.uint8), ds)
    # Descriptors often declare 16-bit entries; some vendors fill them with 8-bit values.
    table = (lut >> 8 if lut.max() > 255 else lut).astype(np.uint8)
  ybr = photometric in ('YBR_FULL', 'YBR_FULL_422') and int(ds.get('BitsAllocated', 8)) == 8
  for frame in iter_pixels(ds, indices=indices, raw=ybr):
    if ybr:
      frame = cv2.cvtColor(np.ascontiguousarray(frame[..., [0, 2, 1]]), cv2.COLOR_YCrCb2RGB)
    elif table is not None:
      frame = table[frame]
    elif photometric == 'MONOCHROME1':
      frame = _bits_to_uint8(frame, ds)
      frame = 255 - frame
    else:
      frame = _bits_to_uint8(frame, ds)
    if frame.ndim == 3 and frame.shape[-1] == 1:
      frame = frame[..., 0]
    yield frame


def to_luma(frame: np.ndarray) -> np.ndarray:
  """uint8 (H, W) luma (BT.601 weights, as OpenCV) of an RGB or monochrome frame."""
  return cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY) if frame.ndim == 3 else frame


@dataclasses.dataclass
class ConvertedCine:
  video: np.ndarray       # uint8 (T, 112, 112)
  metadata: dict
  preview: np.ndarray     # uint8 RGB QC image (first frame, outside of the sector pixelated)


def _check_header(ds, *, min_frames, min_fps, allow_color) -> None:
  sop_class = ds.get('SOPClassUID')
  if str(ds.get('Modality', '')).upper() == 'SR' or (sop_class is not None and 'SR' in sop_class.name.split()):
    raise DicomReject('structured report (no image)')
  if 'DirectoryRecordSequence' in ds:
    raise DicomReject('DICOMDIR (media directory, no image)')
  if 'PixelData' not in ds:
    raise DicomReject('no pixel data')
  modality = str(ds.get('Modality', '')).upper()
  if modality and modality != 'US':
    raise DicomReject(f'not ultrasound (Modality {modality})')
  if not ds.get('StudyInstanceUID') or not ds.get('SOPInstanceUID'):
    raise DicomReject('missing StudyInstanceUID or SOPInstanceUID (cannot be grouped by study)')
  frames = int(ds.get('NumberOfFrames', 1) or 1)
  if frames < 2:
    raise DicomReject('single-frame image')
  if frames < min_frames:
    raise DicomReject(f'cine too short ({frames} frames < {min_frames})')
  shape = (int(ds.Rows), int(ds.Columns))
  regions = ultrasound_regions(ds, shape)
  if regions.spectral_or_mmode:
    raise DicomReject('spectral Doppler / M-mode region present (not a 2D cine)')
  if not allow_color:
    if int(ds.get('UltrasoundColorDataPresent', 0) or 0) == 1:
      raise DicomReject('colour Doppler (UltrasoundColorDataPresent=1)')
    if regions.colour_flow:
      raise DicomReject('colour Doppler (colour-flow region, RegionDataType 2)')
  fps, source = frame_rate(ds)
  if fps < min_fps:
    raise DicomReject(f'frame rate {fps:.1f} fps < {min_fps:g} ({source}; likely Doppler/M-mode)')
  problem = decoder_problem(ds)
  if problem:
    raise DicomReject(problem)
  photometric = str(ds.get('PhotometricInterpretation', '')).strip().upper()
  if photometric not in SUPPORTED_PHOTOMETRIC:
    raise DicomReject(f'unsupported photometric interpretation {photometric or "(missing)"}')
  if not ds['PixelData'].is_undefined_length:
    expected = (shape[0] * shape[1] * int(ds.get('SamplesPerPixel', 1)) * int(ds.BitsAllocated) * frames
                + 7) // 8
    if str(ds.get('PhotometricInterpretation', '')).upper() == 'YBR_FULL_422':
      expected = expected * 2 // 3
    if len(ds.PixelData) < expected:
      raise DicomReject(f'truncated pixel data ({len(ds.PixelData)} of {expected} bytes)')


def convert_dataset(ds, *, salt: str, max_frames: int = 100, min_frames: int = 16, min_fps: float = 25.0,
                    allow_color: bool = False) -> ConvertedCine:
  """The checks and conversion of `convert_one` on an already parsed dataset."""
  _check_header(ds, min_frames=min_frames, min_fps=min_fps, allow_color=allow_color)
  shape = (int(ds.Rows), int(ds.Columns))
  regions = ultrasound_regions(ds, shape)
  gray, coloured, first = [], np.zeros(shape, bool), None
  try:
    with _quiet_pydicom():
      for frame in decode_frames(ds, max_frames):
        if first is None:
          first = frame
        if frame.ndim == 3:
          r, g, b = cv2.split(frame)
          chroma = cv2.subtract(cv2.max(cv2.max(r, g), b), cv2.min(cv2.min(r, g), b))
          coloured |= chroma > CHROMA_LEVEL
        gray.append(to_luma(frame))
  except Exception as e:  # pylint: disable=broad-except
    raise DicomReject(f'decoder error: {type(e).__name__}: {scrub(str(e), ds)[:200]}') from None
  if len(gray) < min_frames:
    raise DicomReject(f'decoder error: only {len(gray)} frames decoded')
  gray = np.stack(gray)
  if gray.shape[1:] != shape:
    raise DicomReject(f'decoder error: frames of shape {gray.shape[1:]} but Rows/Columns {shape}')
  stats = sector_mask.temporal_stats(gray)
  sector = sector_mask.find_sector(stats, regions.tissue_box,
                                   region_box_untrusted=regions.tissue_box_untrusted)
  if sector is None:
    raise DicomReject('no imaging sector found (no changing region and no usable region box)')
  colour_fraction = float((coloured & sector.mask & (stats.std > sector_mask.MOVING_STD)).sum() / sector.mask.sum())
  if not allow_color and colour_fraction > COLOUR_FRACTION:
    raise DicomReject(f'colour Doppler (colour pixels in {100 * colour_fraction:.1f}% of the sector)')
  box = sector.crop_box
  video = np.stack([to_square_gray(np.where(sector.mask, g, 0).astype(np.uint8)[box.y0:box.y1 + 1,
                                                                               box.x0:box.x1 + 1],
                                   OUTPUT_SIZE) for g in gray])
  fps, fps_source = frame_rate(ds)
  study_id = study_key(ds.StudyInstanceUID, salt)
  accession = str(ds.get('AccessionNumber', '') or '').strip()
  side = max(box.width, box.height)
  delta = regions.physical_delta_x_cm
  metadata = dict(
      study_id=study_id,
      video_id=f'{study_id}_{study_key(ds.SOPInstanceUID, salt)[:12]}',
      accession_key=study_key(accession, salt) if accession else '',
      fps=round(fps, 4), fps_source=fps_source, num_frames=len(video),
      source_num_frames=int(ds.get('NumberOfFrames', 1) or 1), orig_rows=shape[0], orig_cols=shape[1],
      photometric=str(ds.get('PhotometricInterpretation', '')), transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
      crop_box=str(box), mask_source=sector.source, colour_fraction=round(colour_fraction, 5),
      physical_delta_x_cm='' if delta is None else delta,
      output_pixel_cm='' if delta is None else delta * side / OUTPUT_SIZE,
      status='ok')
  return ConvertedCine(video=video, metadata=metadata, preview=sector_mask.render_preview(first, sector))


def convert_one(path, *, salt: str, max_frames: int = 100, min_frames: int = 16, min_fps: float = 25.0,
                allow_color: bool = False) -> Tuple[np.ndarray, dict]:
  """(uint8 (T, 112, 112) video, metadata dict) of one DICOM file, or raises DicomReject(reason)."""
  ds = read_dataset(os.fspath(path))
  cine = convert_dataset(ds, salt=salt, max_frames=max_frames, min_frames=min_frames, min_fps=min_fps,
                         allow_color=allow_color)
  return cine.video, cine.metadata
