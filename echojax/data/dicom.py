"""DICOM ultrasound cine → de-identified, masked, cropped 112×112 grayscale cine plus technical (PHI-free)
metadata.

`convert_one` reads a file, rejects what is not a usable 2D B-mode cine (`DicomReject` with a specific reason),
decodes it with pydicom 3 + Pillow, fits the imaging sector (sector_mask), inpaints burned-in overlay inside
it (deid), zeroes everything outside it, crops, pads to square and resizes. Identifiers leave only as salted
hashes (`study_key`); no other header value is returned, and pydicom's warnings (which quote values) are
captured, never printed.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import warnings
from typing import Optional, Tuple

import numpy as np
import pydicom

from echojax.data import deid, sector_mask
from echojax.data.dicom_pixels import (  # pylint: disable=unused-import (decode_frames, to_luma re-exported)
    SUPPORTED_PHOTOMETRIC, DecodeError, decode_cine, decode_frames, decoder_problem, to_luma)
from echojax.data.video_io import to_square_gray

OUTPUT_SIZE = 112
# Used when a cine states no timing at all; 30 fps is the usual display rate of exported echo loops.
DEFAULT_FPS = 30.0
HASH_CHARS = 16
MIN_SALT_CHARS = 16
MIN_SALT_DISTINCT = 8      # 'aaaa…' or '1212…' are long but guessable
COLOUR_FRACTION = 0.005     # of sector pixels (changing ones) coloured in some frame → colour Doppler
_PIXEL_DATA_TAG = b'\xe0\x7f\x10\x00'
_TIMING_KEYWORDS = ('FrameTime', 'FrameTimeVector', 'CineRate', 'RecommendedDisplayFrameRate')
# Header values quoted in reject reasons only when they are one of these defined terms (anything else could
# be free text typed at the scanner).
_MODALITIES = frozenset(
    'AR ASMT AU BDUS BI BMD CR CT CTPROTOCOL DG DOC DX ECG EPS ES FID GM HC HD IO IOL IVOCT IVUS KER KO LEN LS '
    'MG MR M3D NM OAM OCT OP OPM OPT OPTBSV OPTENF OPV OSS OT PLAN PR PT PX REG RESP RF RG RTDOSE RTIMAGE '
    'RTINTENT RTPLAN RTRAD RTRECORD RTSEGANN RTSTRUCT RWV SEG SM SMR SR SRF STAIN TEXTUREMAP TG US VA XA XC'
    .split())
_PHOTOMETRICS = frozenset(('MONOCHROME1', 'MONOCHROME2', 'PALETTE COLOR', 'RGB', 'HSV', 'ARGB', 'CMYK',
                           'YBR_FULL', 'YBR_FULL_422', 'YBR_PARTIAL_422', 'YBR_PARTIAL_420', 'YBR_ICT',
                           'YBR_RCT', 'XYB'))


class DicomReject(Exception):
  """A file that is not converted; `reason` is specific and free of header values."""

  def __init__(self, reason: str):
    self.reason = ' '.join(str(reason).split())   # one line: it goes into a CSV cell
    super().__init__(self.reason)


def check_salt(salt) -> str:
  """The salt, or a ValueError saying why it is too weak (never quoting it).

  The ids are fast hashes of guessable values (date-like accession numbers, UIDs): whoever knows the salt
  can recover them, and a short salt is found by brute force from one known (UID, study_id) pair.
  """
  if not salt or not str(salt).strip():
    raise ValueError('a secret salt is required (unsalted hashes of UIDs/accessions can be reversed)')
  salt = str(salt)
  if len(salt) < MIN_SALT_CHARS or len(set(salt)) < MIN_SALT_DISTINCT:
    raise ValueError(
        f'the salt is too weak ({len(salt)} characters, {len(set(salt))} distinct; needs at least '
        f'{MIN_SALT_CHARS} characters with {MIN_SALT_DISTINCT} distinct). Generate one with '
        '`python -c "import secrets; print(secrets.token_urlsafe(24))"`, keep it secret (e.g. in a file read '
        'with --salt-file) and reuse it for every conversion whose ids must match')
  return salt


def study_key(value: str, salt: str) -> str:
  """Salted sha256 (truncated) of a raw identifier: StudyInstanceUID → study_id, or an accession number →
  the manifest's accession_key, so a label CSV keyed by either can be joined without storing the raw value."""
  value = str(value).strip()
  if not value:
    raise ValueError('empty identifier')
  check_salt(salt)
  return hashlib.sha256(f'{salt}\x1f{value}'.encode()).hexdigest()[:HASH_CHARS]


def is_dicom_file(path) -> bool:
  """DICOM by content: the 'DICM' preamble, or (for preamble-less files) pydicom parsing without force."""
  with open(path, 'rb') as f:
    head = f.read(132)
  if len(head) == 132 and head[128:132] == b'DICM':
    return True
  try:
    with captured_pydicom():
      pydicom.dcmread(path, stop_before_pixels=True)
    return True
  except Exception:  # pylint: disable=broad-except
    return False


_CAPTURES = []   # the open captured_pydicom blocks, innermost last


@contextlib.contextmanager
def captured_pydicom():
  """Records pydicom's warnings and log lines instead of printing them: they quote header values (a
  non-conformant UID, a date). Yields the list of recorded warnings (only ever counted, never written).

  pydicom converts and validates an element when it is first accessed, so every access of a dataset
  belongs inside this block, not only dcmread.
  """
  logger = logging.getLogger('pydicom')
  level, propagate = logger.level, logger.propagate
  logger.setLevel(logging.CRITICAL + 1)
  logger.propagate = False
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter('always')
      _CAPTURES.append(caught)
      yield caught
  finally:
    _CAPTURES.pop()
    if _CAPTURES:              # nested: the enclosing block counts these too
      _CAPTURES[-1].extend(caught)
    logger.setLevel(level)
    logger.propagate = propagate


def identity(ds, salt: str) -> dict:
  """The PHI-bearing identity of a parsed file, for the private key map only: its salted study id, raw
  accession number and the accession's salted key ('' when absent)."""
  with captured_pydicom():
    study = str(ds.get('StudyInstanceUID', '') or '').strip()
    accession = str(ds.get('AccessionNumber', '') or '').strip()
  return dict(study_id=study_key(study, salt) if study else '', accession_number=accession,
              accession_key=study_key(accession, salt) if accession else '')


def read_dataset(path):
  """Parses a file; raises DicomReject for non-DICOM, unreadable or truncated files."""
  if not is_dicom_file(path):
    raise DicomReject('not a DICOM file')
  with open(path, 'rb') as f:
    data = f.read()
  with captured_pydicom() as caught:
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


@dataclasses.dataclass
class ConvertedCine:
  video: np.ndarray       # uint8 (T, 112, 112)
  metadata: dict          # manifest row
  preview: np.ndarray     # uint8 RGB QC image (de-identified first frame, outside of the sector pixelated)
  deid: dict = dataclasses.field(default_factory=dict)   # audit record: mask source, geometry, overlay


def _check_header(ds, *, min_frames, min_fps, allow_color) -> None:
  sop_class = ds.get('SOPClassUID')
  if str(ds.get('Modality', '')).upper() == 'SR' or (sop_class is not None and 'SR' in sop_class.name.split()):
    raise DicomReject('structured report (no image)')
  if 'DirectoryRecordSequence' in ds:
    raise DicomReject('DICOMDIR (media directory, no image)')
  if 'PixelData' not in ds:
    raise DicomReject('no pixel data')
  modality = str(ds.get('Modality', '')).strip().upper()
  if modality and modality != 'US':
    raise DicomReject(f'not ultrasound (Modality {modality if modality in _MODALITIES else "non-standard"})')
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
    named = photometric if photometric in _PHOTOMETRICS else ('(missing)' if not photometric else '(non-standard)')
    raise DicomReject(f'unsupported photometric interpretation {named}')
  if not ds['PixelData'].is_undefined_length:
    expected = (shape[0] * shape[1] * int(ds.get('SamplesPerPixel', 1)) * int(ds.BitsAllocated) * frames
                + 7) // 8
    if photometric == 'YBR_FULL_422':
      expected = expected * 2 // 3
    if len(ds.PixelData) < expected:
      raise DicomReject(f'truncated pixel data ({len(ds.PixelData)} of {expected} bytes)')


def _deidentify_pixels(gray, coloured, regions, allow_color):
  """Sector, overlay and colour checks; inpaints the overlay in `gray` in place. Raises DicomReject."""
  stats = sector_mask.temporal_stats(gray)
  noise = stats.noise()
  static = deid.static_overlay(stats.mean, stats.std, noise, stats.minimum)
  sector = sector_mask.find_sector(stats, regions.tissue_box, region_box_untrusted=regions.tissue_box_untrusted,
                                   static=static)
  if sector is None:
    raise DicomReject('no imaging sector found (no changing region and no usable region box)')
  moving = stats.std_smooth > noise.moving_threshold
  colour_fraction = float((coloured & sector.mask & moving).sum() / sector.mask.sum())
  if not allow_color and colour_fraction > COLOUR_FRACTION:
    raise DicomReject(f'colour Doppler (colour pixels in {100 * colour_fraction:.1f}% of the sector)')
  overlay = deid.find_overlay(static, sector.mask)
  problem = deid.removal_problem(overlay, stats.std, sector.mask, noise)
  if problem:
    raise DicomReject(problem)
  for t in range(len(gray)):
    gray[t] = deid.remove(gray[t], overlay)
  return sector, overlay, noise, colour_fraction


def convert_dataset(ds, *, salt: str, max_frames: int = 100, min_frames: int = 16, min_fps: float = 25.0,
                    allow_color: bool = False) -> ConvertedCine:
  """The checks and conversion of `convert_one` on an already parsed dataset."""
  check_salt(salt)
  with captured_pydicom() as caught:
    _check_header(ds, min_frames=min_frames, min_fps=min_fps, allow_color=allow_color)
    shape = (int(ds.Rows), int(ds.Columns))
    regions = ultrasound_regions(ds, shape)
    try:
      gray, coloured, first = decode_cine(ds, shape, max_frames, min_frames)
    except DecodeError as e:
      raise DicomReject(f'decoder error: {e}') from None
    fps, fps_source = frame_rate(ds)
    study_id = study_key(ds.StudyInstanceUID, salt)
    video_id = f'{study_id}_{study_key(ds.SOPInstanceUID, salt)[:12]}'
    accession = str(ds.get('AccessionNumber', '') or '').strip()
    source_frames = int(ds.get('NumberOfFrames', 1) or 1)
    photometric = str(ds.get('PhotometricInterpretation', ''))
    transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
  sector, overlay, noise, colour_fraction = _deidentify_pixels(gray, coloured, regions, allow_color)
  box = sector.crop_box
  video = np.stack([to_square_gray(np.where(sector.mask, g, 0).astype(np.uint8)[box.y0:box.y1 + 1,
                                                                               box.x0:box.x1 + 1],
                                   OUTPUT_SIZE) for g in gray])
  side = max(box.width, box.height)
  delta = regions.physical_delta_x_cm
  geometry = sector.geometry_dict()
  record = dict(mask_source=sector.source, geometry=geometry, crop_box=str(box),
                geometry_output=sector.geometry.in_output(box, OUTPUT_SIZE) if sector.geometry else None,
                noise_sigma=round(noise.sigma, 3), pydicom_warnings=len(caught), **overlay.report())
  metadata = dict(
      study_id=study_id, video_id=video_id,
      accession_key=study_key(accession, salt) if accession else '',
      fps=round(fps, 4), fps_source=fps_source, num_frames=len(video),
      source_num_frames=source_frames, orig_rows=shape[0], orig_cols=shape[1],
      photometric=photometric, transfer_syntax=transfer_syntax,
      crop_box=str(box), mask_source=sector.source, colour_fraction=round(colour_fraction, 5),
      geometry=json.dumps(geometry, separators=(',', ':')), noise_sigma=record['noise_sigma'],
      overlay_removed=len(overlay.removed), overlay_masked=len(overlay.masked),
      overlay_fraction=record['removed_fraction'],
      physical_delta_x_cm='' if delta is None else delta,
      output_pixel_cm='' if delta is None else delta * side / OUTPUT_SIZE,
      status='ok')
  preview = sector_mask.render_preview(deid.remove(first, overlay), sector, overlay.removed, overlay.masked)
  return ConvertedCine(video=video, metadata=metadata, preview=preview, deid=record)


def convert_file(path, *, salt: str, **options) -> Tuple[Optional[ConvertedCine], Optional[str], dict]:
  """(cine, None, identity) or (None, reject reason, identity) for one file; never raises on bad input.

  `identity` (see `identity`, empty when the header was unreadable) is for the private key map only.
  """
  check_salt(salt)
  ident = {}
  try:
    with captured_pydicom() as caught:   # a value's first access warns once: count it wherever it happens
      ds = read_dataset(os.fspath(path))
      ident = identity(ds, salt)
      cine = convert_dataset(ds, salt=salt, **options)
    cine.deid['pydicom_warnings'] = len(caught)
    return cine, None, ident
  except DicomReject as e:
    return None, e.reason, ident
  except OSError as e:
    return None, f'unreadable file: {type(e).__name__}', ident
  except Exception as e:  # pylint: disable=broad-except
    # Unexpected failures are reported by type only: their messages may quote header values or paths.
    return None, f'internal error: {type(e).__name__}', ident


def convert_one(path, *, salt: str, max_frames: int = 100, min_frames: int = 16, min_fps: float = 25.0,
                allow_color: bool = False) -> Tuple[np.ndarray, dict]:
  """(uint8 (T, 112, 112) video, metadata dict) of one DICOM file, or raises DicomReject(reason)."""
  ds = read_dataset(os.fspath(path))
  cine = convert_dataset(ds, salt=salt, max_frames=max_frames, min_frames=min_frames, min_fps=min_fps,
                         allow_color=allow_color)
  return cine.video, cine.metadata
