"""Finds the imaging sector of an ultrasound cine so everything around it (burned-in text, ECG, menus) is zeroed.

Two sources: the DICOM SequenceOfUltrasoundRegions box (trusted only when it fits the image) and a data-driven
mask (pixels that change over time → largest component → convex hull). When both exist they are intersected,
and static bright pixels inside the result (text/markers drawn over the sector) are removed as well. Also the
geometry helpers of the crop (to_output_coords) and the PHI-safe QC preview (render_preview).
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

# A region box may overhang the image by a rounding pixel or two; one losing more area than this is a box
# copied from a differently-sized original (e.g. pydicom's examples_ybr_color.dcm, a 2x downscale).
MIN_BOX_AREA_INSIDE = 0.9
MIN_SECTOR_FRACTION = 0.02     # of the image; smaller "sectors" are noise or a cursor
MOVING_STD = 1.0               # grey levels of temporal std (after smoothing) that count as "changing"
STATIC_STD = 0.75              # a pixel below this std and above STATIC_MIN_LEVEL is a drawn graphic
STATIC_MIN_LEVEL = 40.0


@dataclasses.dataclass(frozen=True)
class Box:
  """Inclusive pixel box (x0, y0, x1, y1), the DICOM RegionLocation convention."""
  x0: int
  y0: int
  x1: int
  y1: int

  @property
  def width(self) -> int:
    return self.x1 - self.x0 + 1

  @property
  def height(self) -> int:
    return self.y1 - self.y0 + 1

  @property
  def area(self) -> int:
    return max(self.width, 0) * max(self.height, 0)

  def __str__(self) -> str:
    return f'{self.x0} {self.y0} {self.x1} {self.y1}'

  def to_mask(self, shape: Tuple[int, int]) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[self.y0:self.y1 + 1, self.x0:self.x1 + 1] = True
    return mask


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


def _odd(n: float) -> int:
  n = max(3, int(round(n)))
  return n if n % 2 else n + 1


@dataclasses.dataclass
class TemporalStats:
  """Per-pixel statistics over the frames of a cine (float32 (H, W) maps)."""
  mean: np.ndarray
  std: np.ndarray


def temporal_stats(gray: np.ndarray) -> TemporalStats:
  """Statistics of a (T, H, W) uint8 cine, accumulated frame by frame (no float copy of the cine)."""
  total = np.zeros(gray.shape[1:], np.float64)
  total_sq = np.zeros(gray.shape[1:], np.float64)
  for frame in gray:
    f = frame.astype(np.float64)
    total += f
    total_sq += f * f
  mean = total / len(gray)
  var = np.maximum(total_sq / len(gray) - mean * mean, 0.0)
  return TemporalStats(mean.astype(np.float32), np.sqrt(var).astype(np.float32))


def static_graphics(mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """Pixels that never change yet are bright: text, markers, scales (speckle always changes)."""
  static = ((std < STATIC_STD) & (mean > STATIC_MIN_LEVEL)).astype(np.uint8)
  # Anti-aliased glyph edges are dimmer than the core; grow the mask by a pixel to take them too.
  return cv2.dilate(static, np.ones((3, 3), np.uint8)).astype(bool)


def motion_hull(stats: TemporalStats) -> Optional[np.ndarray]:
  """Convex hull of the largest region of changing pixels, or None when no plausible sector changes.

  The map is box-smoothed first: this fills speckle/blood-pool holes inside the sector and dilutes thin
  moving lines (ECG trace, sweep cursor) so that an opening removes them before the component search.
  """
  rows, cols = stats.std.shape
  k = _odd(min(rows, cols) / 50)
  smooth = cv2.blur(stats.std, (k, k))
  moving = (smooth > MOVING_STD).astype(np.uint8)
  # An opening twice the blur width removes those blurred lines (and text flicker) but not the sector.
  opening = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1))
  moving = cv2.morphologyEx(moving, cv2.MORPH_OPEN, opening)
  count, labels, stats, _ = cv2.connectedComponentsWithStats(moving, connectivity=8)
  if count < 2:
    return None
  largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
  if stats[largest, cv2.CC_STAT_AREA] < MIN_SECTOR_FRACTION * rows * cols:
    return None
  ys, xs = np.nonzero(labels == largest)
  hull = cv2.convexHull(np.stack([xs, ys], axis=1).astype(np.int32))
  mask = np.zeros((rows, cols), np.uint8)
  cv2.fillConvexPoly(mask, hull, 1)
  return mask.astype(bool)


@dataclasses.dataclass
class SectorMask:
  mask: np.ndarray          # bool (H, W)
  crop_box: Box             # bounding box of the mask (inclusive)
  source: str               # 'region+motion', 'motion', 'motion (region box outside image)', 'region', ...


def find_sector(stats: TemporalStats, region_box: Optional[Box], *,
                region_box_untrusted: bool = False) -> Optional[SectorMask]:
  """Imaging-sector mask from a cine's `temporal_stats`; None when neither the region box nor motion finds one.

  `region_box` is an already clipped, trusted box; `region_box_untrusted` records that the file had a 2D
  tissue region that did not fit the image (reported in `source`).
  """
  hull = motion_hull(stats)
  shape = stats.std.shape
  if region_box is not None:
    box_mask = region_box.to_mask(shape)
    if hull is not None and (hull & box_mask).sum() >= 0.25 * region_box.area:
      mask, source = hull & box_mask, 'region+motion'
    else:
      mask, source = box_mask, 'region (motion mask disagreed)' if hull is not None else 'region (no motion)'
  elif hull is not None:
    mask = hull
    source = 'motion (region box outside image)' if region_box_untrusted else 'motion'
  else:
    return None
  mask = mask & ~static_graphics(stats.mean, stats.std)
  if mask.sum() < MIN_SECTOR_FRACTION * mask.size:
    return None
  ys, xs = np.nonzero(mask)
  return SectorMask(mask=mask, crop_box=Box(int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())),
                    source=source)


def to_output_coords(points: Sequence[Tuple[float, float]], crop_box: Box, size: int) -> np.ndarray:
  """Maps (x, y) source-pixel positions into the size×size output (crop, centred zero pad, resize)."""
  side = max(crop_box.width, crop_box.height)
  pad_x, pad_y = (side - crop_box.width) // 2, (side - crop_box.height) // 2
  pts = np.asarray(points, np.float64)
  out = np.empty_like(pts)
  out[:, 0] = (pts[:, 0] - crop_box.x0 + pad_x + 0.5) * size / side - 0.5
  out[:, 1] = (pts[:, 1] - crop_box.y0 + pad_y + 0.5) * size / side - 0.5
  return out


def render_preview(first: np.ndarray, sector: SectorMask) -> np.ndarray:
  """QC image: the first frame with the sector outline (green) and crop box (red).

  Outside the sector the frame is pixelated into blocks larger than text glyphs, so the preview shows where
  the mask cut without reproducing burned-in names or dates.
  """
  rgb = first if first.ndim == 3 else cv2.cvtColor(first, cv2.COLOR_GRAY2RGB)
  rows, cols = rgb.shape[:2]
  block = max(16, min(rows, cols) // 24)
  small = cv2.resize(rgb, (max(cols // block, 1), max(rows // block, 1)), interpolation=cv2.INTER_AREA)
  coarse = cv2.resize(small, (cols, rows), interpolation=cv2.INTER_NEAREST) // 2
  image = np.where(sector.mask[..., None], rgb, coarse).astype(np.uint8)
  contours, _ = cv2.findContours(sector.mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
  image = np.ascontiguousarray(image)
  cv2.drawContours(image, contours, -1, (0, 255, 0), 1)
  box = sector.crop_box
  cv2.rectangle(image, (box.x0, box.y0), (box.x1, box.y1), (255, 0, 0), 1)
  return image
