"""Burned-in overlay (names, dates, markers drawn into the pixels): detection and removal.

Overlay is what stays constant across frames relative to the capture noise and to the surrounding tissue's
variation (or, blended with tissue by thin or resampled strokes, never gets as dark as its neighbourhood), and
stands out from its surroundings. Inside the imaging sector it is grouped into word boxes and
every frame is inpainted over those boxes from the neighbouring tissue (cv2.inpaint), so no glyph shape
survives — neither bright letters nor letter-shaped holes. Outside the sector the sector mask zeroes it; it
is still located, for the audit trail and the preview.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import cv2
import numpy as np

from echojax.data.sector_geometry import MIN_MOVING, Box, NoiseFloor

STATIC_STD = 0.75          # grey levels: the static limit of a noise-free capture (JPEG flicker stays below)
NOISE_MARGIN = 2.5         # ... plus this many noise σ with capture noise (σ estimated from rectified noise)
RELATIVE_STATIC = 0.3      # or below this fraction of the surrounding pixels' temporal std
PARTIAL_STATIC = 0.7       # a glyph blended with tissue (thin or resampled strokes) keeps part of its motion
MIN_LIFT = 60.0            # ... but never gets as dark as its neighbourhood does: its minimum over time is lifted
STATIC_MIN_LEVEL = 40.0    # overlay is drawn bright; dark static pixels are background or blood pool
MIN_CONTRAST = 12.0        # grey levels a component stands out from its surroundings (strokes are sharp)
MAX_OVERLAY_FRACTION = 0.12    # of the sector: more cannot be filled from the neighbourhood with confidence
MIN_TISSUE_MOTION = 3.0    # median sector std, in units of the static limit, needed to tell text from tissue
INPAINT_RADIUS = 3
LINE_FILL_AREA = 0.03      # a group whose box exceeds this share of the sector is a line: fill its pixels


def _odd(n: float, minimum: int = 3) -> int:
  n = max(minimum, int(round(n)))
  return n if n % 2 else n + 1


def static_limit(noise: NoiseFloor) -> float:
  return STATIC_STD + NOISE_MARGIN * noise.sigma


def static_overlay(mean: np.ndarray, std: np.ndarray, noise: NoiseFloor,
                   minimum: Optional[np.ndarray] = None) -> np.ndarray:
  """bool (H, W): pixels of drawn graphics — constant over time (relative to the noise, or to the tissue
  around them), or blended with tissue yet never as dark as it gets (`minimum`, uint8 over time) — bright,
  in components that stand out from their surroundings."""
  rows, cols = std.shape
  window = _odd(min(rows, cols) / 20)
  around = cv2.blur(std, (window, window))
  static = std <= np.maximum(static_limit(noise), RELATIVE_STATIC * around)
  if minimum is not None:
    lifted = minimum.astype(np.float32) - cv2.medianBlur(minimum, window)
    static |= (lifted >= MIN_LIFT) & (std <= PARTIAL_STATIC * around)
  static &= mean >= STATIC_MIN_LEVEL
  static_u8 = static.astype(np.uint8)
  count, labels = cv2.connectedComponents(static_u8, connectivity=8)
  if count < 2:
    return static
  # Mean of the non-static ring around each pixel: a glyph is far brighter than the tissue beside it.
  ring = (cv2.dilate(static_u8, np.ones((7, 7), np.uint8)) > 0) & ~static
  weight = cv2.blur(ring.astype(np.float32), (9, 9))
  surround = cv2.blur(np.where(ring, mean, 0).astype(np.float32), (9, 9)) / np.maximum(weight, 1e-6)
  contrast = np.where(weight > 0, mean - surround, 255.0)   # no ring at all: a flat panel, keep it
  sums = np.bincount(labels.ravel(), weights=(contrast * static).ravel(), minlength=count)
  sizes = np.bincount(labels.ravel(), minlength=count)
  keep = sums / np.maximum(sizes, 1) >= MIN_CONTRAST
  keep[0] = False
  return keep[labels]


@dataclasses.dataclass
class Overlay:
  removed: List[Box]          # boxes (or line extents) inpainted inside the sector
  fill: np.ndarray            # bool (H, W): the pixels inpainted
  masked: List[Box]           # overlay outside the sector, zeroed with the background
  fraction: float             # share of the sector's pixels inpainted

  def report(self) -> dict:
    return dict(removed_regions=[[b.x0, b.y0, b.x1, b.y1] for b in self.removed],
                masked_regions=[[b.x0, b.y0, b.x1, b.y1] for b in self.masked],
                removed_fraction=round(self.fraction, 4))


def _groups(static: np.ndarray, shape):
  """(labels, stats) of overlay pixels merged into words/lines (letters and spaces bridged)."""
  rows, cols = shape
  bridge = cv2.getStructuringElement(cv2.MORPH_RECT, (_odd(min(rows, cols) / 30), _odd(min(rows, cols) / 80)))
  merged = cv2.dilate(static.astype(np.uint8), bridge)
  _, labels, stats, _ = cv2.connectedComponentsWithStats(merged, connectivity=8)
  return labels, stats


def find_overlay(static: np.ndarray, sector: np.ndarray) -> Overlay:
  """Splits the overlay into what is inpainted (groups touching the sector) and what the mask zeroes."""
  shape = static.shape
  rows, cols = shape
  margin = max(2, int(round(min(rows, cols) / 100)))    # anti-aliased rims and JPEG ringing of the strokes
  labels, stats = _groups(static, shape)
  sector_area = max(int(sector.sum()), 1)
  fill = np.zeros(shape, np.uint8)
  removed, masked = [], []
  on_sector = np.bincount(labels[static & sector], minlength=len(stats))
  for index in range(1, len(stats)):
    x, y, w, h, _ = (int(v) for v in stats[index])
    box = Box(max(x - margin, 0), max(y - margin, 0), min(x + w - 1 + margin, cols - 1),
              min(y + h - 1 + margin, rows - 1))
    if on_sector[index] == 0:
      masked.append(box)
      continue
    removed.append(box)
    if box.area > LINE_FILL_AREA * sector_area:   # a long line (caliper, outline): its own pixels, widened
      part = ((labels == index) & static).astype(np.uint8)
      fill |= cv2.dilate(part, np.ones((2 * margin + 1, 2 * margin + 1), np.uint8))
    else:
      fill[box.y0:box.y1 + 1, box.x0:box.x1 + 1] = 1
  fill = fill.astype(bool)
  return Overlay(removed=removed, fill=fill, masked=masked, fraction=float((fill & sector).sum() / sector_area))


def removal_problem(overlay: Overlay, std: np.ndarray, sector: np.ndarray, noise: NoiseFloor) -> Optional[str]:
  """Why the overlay of this cine cannot be removed with confidence (a reject reason), or None."""
  tissue = std[sector & ~overlay.fill]
  if tissue.size == 0 or float(np.median(tissue)) < MIN_TISSUE_MOTION * static_limit(noise):
    return ('tissue barely changes over time relative to the noise: burned-in text cannot be told from '
            'tissue with confidence')
  if overlay.fraction > MAX_OVERLAY_FRACTION:
    return (f'burned-in overlay covers {100 * overlay.fraction:.0f}% of the sector (over '
            f'{100 * MAX_OVERLAY_FRACTION:.0f}% cannot be removed with confidence)')
  return None


def remove(frame: np.ndarray, overlay: Overlay) -> np.ndarray:
  """One frame (grey or RGB uint8) with the overlay's fill inpainted from its neighbourhood."""
  if not overlay.fill.any():
    return frame
  return cv2.inpaint(np.ascontiguousarray(frame), overlay.fill.astype(np.uint8), INPAINT_RADIUS,
                     cv2.INPAINT_TELEA)


def policy() -> dict:
  """What the converter removes and with which limits (conversion.json), for a privacy review."""
  return dict(
      outside_sector='zeroed (banner, region-box text, ECG, menus): the sector is a fitted fan/linear model of '
                     'the pixels that change more than the estimated capture noise',
      inside_sector='bright overlay that is constant over time (relative to the noise and the surrounding '
                    "tissue) or never gets as dark as its neighbourhood, grouped into word boxes and inpainted "
                    'in every frame (cv2.inpaint, Telea)',
      not_removed='moving overlay inside the sector (ECG trace, sweeping cursor, changing counters), dark text '
                  'over bright tissue, static overlay below the brightness/contrast limits',
      rejected_when=f'overlay over {100 * MAX_OVERLAY_FRACTION:.0f}% of the sector, or tissue motion under '
                    f'{MIN_TISSUE_MOTION:g}x the static limit',
      limits=dict(static_std=STATIC_STD, noise_margin_sigma=NOISE_MARGIN, relative_static=RELATIVE_STATIC,
                  partial_static=PARTIAL_STATIC, min_lift=MIN_LIFT, static_min_level=STATIC_MIN_LEVEL,
                  min_contrast=MIN_CONTRAST, max_overlay_fraction=MAX_OVERLAY_FRACTION,
                  min_tissue_motion=MIN_TISSUE_MOTION, min_moving=MIN_MOVING),
      identifiers='study/video/accession ids are salted SHA-256 hashes; rejected.csv names files by salted '
                  'source key; no header value, source path or pydicom message is written or logged')
