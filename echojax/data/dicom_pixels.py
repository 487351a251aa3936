"""Pixel decoding of DICOM cines: which transfer syntaxes can be decoded here, and uint8 RGB/grey frames out
of every photometric interpretation pydicom 3 supports (YBR converted exactly once, LUTs applied)."""
from __future__ import annotations

import re
from typing import Iterator, Optional

import cv2
import numpy as np
import pydicom
from pydicom._uid_dict import UID_dictionary
from pydicom.pixels import apply_color_lut, get_decoder, iter_pixels

CHROMA_LEVEL = 60           # max-min over RGB; colour-flow maps are saturated, B-mode tints stay well below
_PIP_NAMES = {'gdcm': 'python-gdcm'}
# Every interpretation pydicom 3 hands back as RGB or grey (YBR_FULL(_422) converted by pydicom, YBR_RCT/ICT
# by the JPEG 2000 decoder, PALETTE COLOR through its LUT here); others would need a conversion we lack.
SUPPORTED_PHOTOMETRIC = ('MONOCHROME1', 'MONOCHROME2', 'RGB', 'YBR_FULL', 'YBR_FULL_422', 'YBR_RCT', 'YBR_ICT',
                         'PALETTE COLOR')


class DecodeError(Exception):
  """Frames could not be decoded; the message is PHI-free (no decoder text, which may quote the header)."""


def decoder_problem(ds) -> Optional[str]:
  """Why this transfer syntax cannot be decoded here (naming the packages that would), or None."""
  uid = getattr(ds, 'file_meta', pydicom.Dataset()).get('TransferSyntaxUID')
  if uid is None:
    return 'missing transfer syntax UID'
  named = f'{uid.name} ({uid})' if uid in UID_dictionary else '(an unregistered UID)'
  try:
    decoder = get_decoder(uid)
  except NotImplementedError:
    return (f'unsupported transfer syntax {named}: no pydicom decoder exists for it '
            '(transcode it first, e.g. with gdcmconv or dcmtk)')
  if decoder.is_available:
    return None
  options = []
  for dependency in decoder.missing_dependencies:
    plugin, _, needs = dependency.partition(' - requires ')
    packages = [re.split(r'[<>=]', p.strip())[0] for p in needs.split(' and ')] if needs else [plugin]
    packages = [_PIP_NAMES.get(p, p) for p in packages if p != 'numpy']
    options.append(' + '.join(packages))
  return f'unsupported transfer syntax {named}: no decoder installed; install {" or ".join(options)}'


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


def decode_cine(ds, shape, max_frames, min_frames):
  """(gray (T, H, W) uint8, bool (H, W) of pixels saturated in colour in any frame, first decoded frame);
  DecodeError when the frames cannot be decoded or disagree with the header."""
  gray, coloured, first = [], np.zeros(shape, bool), None
  try:
    for frame in decode_frames(ds, max_frames):
      if first is None:
        first = frame
      if frame.ndim == 3:
        r, g, b = cv2.split(frame)
        chroma = cv2.subtract(cv2.max(cv2.max(r, g), b), cv2.min(cv2.min(r, g), b))
        coloured |= chroma > CHROMA_LEVEL
      gray.append(to_luma(frame))
  except Exception as e:  # pylint: disable=broad-except
    # Decoder messages may quote header values or the file's name: only the exception type leaves.
    raise DecodeError(type(e).__name__) from None
  if len(gray) < min_frames:
    raise DecodeError(f'only {len(gray)} frames decoded')
  gray = np.stack(gray)
  if gray.shape[1:] != shape:
    raise DecodeError(f'frames of shape {gray.shape[1:]} but Rows/Columns {shape}')
  return gray, coloured, first
