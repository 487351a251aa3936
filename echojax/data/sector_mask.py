"""Finds the imaging sector of an ultrasound cine so everything around it (burned-in text, ECG, menus) is zeroed.

The sector is a fitted model (sector_geometry: fan or linear footprint) of the pixels that change over time
more than the estimated noise, restricted to the DICOM SequenceOfUltrasoundRegions box when that box fits the
image and agrees with the pixels; the box alone only when nothing moves. Also the geometry helpers of the
crop (to_output_coords) and the PHI-safe QC preview (render_preview).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

from echojax.data import sector_geometry
from echojax.data.sector_geometry import Box, bounding_box   # pylint: disable=unused-import (re-exported)

# A region box may overhang the image by a rounding pixel or two; one losing more area than this is a box
# copied from a differently-sized original (e.g. pydicom's examples_ybr_color.dcm, a 2x downscale).
MIN_BOX_AREA_INSIDE = 0.9
MIN_SECTOR_FRACTION = sector_geometry.MIN_SECTOR_FRACTION   # of the image; smaller "sectors" are noise
MIN_BOX_AGREEMENT = 0.5        # share of the moving region inside a region box that agrees with the pixels
# Vendors draw region boxes a few pixels inside or outside the fan: the box bounds the fitted sector only
# beyond this margin (of the image's smaller side), so a file with a box gets the geometry of one without.
BOX_TOLERANCE = 0.03


def parse_box(text: str) -> Box:
  """Inverse of str(Box) (the manifest's crop_box column)."""
  return Box(*(int(v) for v in text.split()))


def clip_region_box(box: Box, shape: Tuple[int, int]) -> Optional[Box]:
  """The box clipped to an image of `shape` (rows, cols), or None when it does not fit the image."""
  rows, cols = shape
  if box.x1 < box.x0 or box.y1 < box.y0 or box.area == 0:
    return None
  clipped = Box(max(box.x0, 0), max(box.y0, 0), min(box.x1, cols - 1), min(box.y1, rows - 1))
  if clipped.x1 < clipped.x0 or clipped.y1 < clipped.y0:
    return None
  if clipped.area < MIN_BOX_AREA_INSIDE * box.area:
    return None
  if clipped.area < MIN_SECTOR_FRACTION * rows * cols:
    return None
  return clipped


@dataclasses.dataclass
class TemporalStats:
  """Per-pixel statistics over the frames of a cine (float32 (H, W) maps)."""
  mean: np.ndarray
  std: np.ndarray
  std_smooth: Optional[np.ndarray] = None   # temporal std of the box-averaged frames (noise suppressed)
  kernel: int = 3                           # that box's size
  minimum: Optional[np.ndarray] = None      # uint8 per-pixel minimum over time (overlay never gets dark)

  def __post_init__(self):
    if self.std_smooth is None:
      self.kernel = sector_geometry.smoothing_kernel(self.std.shape)
      self.std_smooth = cv2.blur(self.std, (self.kernel, self.kernel))
    if self.minimum is None:
      self.minimum = np.clip(self.mean, 0, 255).astype(np.uint8)

  def noise(self) -> sector_geometry.NoiseFloor:
    return sector_geometry.estimate_noise(self.std, self.std_smooth, self.kernel)


def temporal_stats(gray: np.ndarray) -> TemporalStats:
  """Statistics of a (T, H, W) uint8 cine, accumulated frame by frame (no float copy of the cine)."""
  kernel = sector_geometry.smoothing_kernel(gray.shape[1:])
  sums = [np.zeros(gray.shape[1:], np.float64) for _ in range(4)]
  minimum = np.full(gray.shape[1:], 255, np.uint8)
  for frame in gray:
    np.minimum(minimum, frame, out=minimum)
    f = frame.astype(np.float32)
    s = cv2.blur(f, (kernel, kernel))
    for total, value in zip(sums, (f, f * f, s, s * s)):
      total += value
  n = len(gray)
  std = lambda total, total_sq: np.sqrt(np.maximum(total_sq / n - (total / n) ** 2, 0.0)).astype(np.float32)
  return TemporalStats(mean=(sums[0] / n).astype(np.float32), std=std(sums[0], sums[1]),
                       std_smooth=std(sums[2], sums[3]), kernel=kernel, minimum=minimum)


@dataclasses.dataclass
class SectorMask:
  mask: np.ndarray          # bool (H, W)
  crop_box: Box             # bounding box of the mask (inclusive)
  source: str               # 'region+motion', 'motion', 'motion (region box outside image)', ...
  geometry: Optional[sector_geometry.Geometry] = None   # None: the moving region's hull (no model fitted)
  noise: Optional[sector_geometry.NoiseFloor] = None

  def geometry_dict(self) -> dict:
    if self.geometry is None:
      return dict(kind='hull', rect=[self.crop_box.x0, self.crop_box.y0, self.crop_box.x1, self.crop_box.y1])
    return self.geometry.to_dict()


def find_sector(stats: TemporalStats, region_box: Optional[Box], *, region_box_untrusted: bool = False,
                static: Optional[np.ndarray] = None) -> Optional[SectorMask]:
  """Imaging-sector mask from a cine's `temporal_stats`; None when neither the region box nor motion finds one.

  `region_box` is an already clipped, trusted box; `region_box_untrusted` records that the file had a 2D
  tissue region that did not fit the image (reported in `source`). `static` (bool, drawn graphics) keeps a
  mirrored fan wing from claiming a scale or text column.
  """
  shape = stats.std.shape
  noise = stats.noise()
  region = sector_geometry.moving_region(stats.std_smooth, noise, stats.kernel)
  box_mask = None
  if region_box is not None:
    grow = max(2, int(round(BOX_TOLERANCE * min(shape))))
    box_mask = Box(region_box.x0 - grow, region_box.y0 - grow, region_box.x1 + grow,
                   region_box.y1 + grow).to_mask(shape)
  if region is not None and box_mask is not None:
    if (region & box_mask).sum() >= MIN_BOX_AGREEMENT * region.sum():
      region, source = region & box_mask, 'region+motion'
    else:
      box_mask, source = None, 'motion (region box disagreed)'
  elif region is not None:
    source = 'motion (region box outside image)' if region_box_untrusted else 'motion'
  elif box_mask is not None:
    geometry = sector_geometry.Geometry(kind='box', rect=region_box)
    return SectorMask(mask=region_box.to_mask(shape), crop_box=region_box, source='region (no motion)',
                      geometry=geometry, noise=noise)
  else:
    return None
  geometry = sector_geometry.fit_geometry(region, stats.std_smooth, noise, static)
  # The model, plus any moving pixel it misses (a poor fit never cuts tissue away).
  mask = sector_geometry.hull_mask(region)
  if geometry is not None:
    mask |= geometry.to_mask(shape)
  if box_mask is not None:
    mask &= box_mask
  if mask.sum() < MIN_SECTOR_FRACTION * mask.size:
    return None
  return SectorMask(mask=mask, crop_box=bounding_box(mask), source=source, geometry=geometry, noise=noise)


def to_output_coords(points: Sequence[Tuple[float, float]], crop_box: Box, size: int) -> np.ndarray:
  """Maps (x, y) source-pixel positions into the size×size output (crop, centred zero pad, resize)."""
  side = max(crop_box.width, crop_box.height)
  pad_x, pad_y = (side - crop_box.width) // 2, (side - crop_box.height) // 2
  pts = np.asarray(points, np.float64)
  out = np.empty_like(pts)
  out[:, 0] = (pts[:, 0] - crop_box.x0 + pad_x + 0.5) * size / side - 0.5
  out[:, 1] = (pts[:, 1] - crop_box.y0 + pad_y + 0.5) * size / side - 0.5
  return out


REMOVED_COLOUR = (255, 0, 255)    # overlay inpainted inside the sector
MASKED_COLOUR = (255, 255, 0)     # overlay outside the sector (zeroed with the rest of the background)


def render_preview(first: np.ndarray, sector: SectorMask, removed: Sequence[Box] = (),
                   masked: Sequence[Box] = ()) -> np.ndarray:
  """QC image: the (already de-identified) first frame, sector outline (green), crop box (red), and the boxes
  of the overlay that was inpainted (magenta) or masked with the background (yellow).

  Outside the sector the masked overlay boxes are filled flat and the rest is pixelated into blocks larger
  than text glyphs, so the preview shows where the mask cut without reproducing burned-in names or dates.
  """
  rgb = first if first.ndim == 3 else cv2.cvtColor(first, cv2.COLOR_GRAY2RGB)
  rows, cols = rgb.shape[:2]
  outside = rgb.copy()
  for box in masked:
    outside[box.y0:box.y1 + 1, box.x0:box.x1 + 1] = 64
  block = max(16, min(rows, cols) // 24)
  small = cv2.resize(outside, (max(cols // block, 1), max(rows // block, 1)), interpolation=cv2.INTER_AREA)
  coarse = cv2.resize(small, (cols, rows), interpolation=cv2.INTER_NEAREST) // 2
  image = np.ascontiguousarray(np.where(sector.mask[..., None], rgb, coarse).astype(np.uint8))
  contours, _ = cv2.findContours(sector.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
  cv2.drawContours(image, contours, -1, (0, 255, 0), 1)
  box = sector.crop_box
  cv2.rectangle(image, (box.x0, box.y0), (box.x1, box.y1), (255, 0, 0), 1)
  for colour, boxes in ((MASKED_COLOUR, masked), (REMOVED_COLOUR, removed)):
    for b in boxes:
      cv2.rectangle(image, (b.x0, b.y0), (b.x1, b.y1), colour, 1)
  return image
