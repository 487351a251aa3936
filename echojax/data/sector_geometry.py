"""Model-based geometry of an ultrasound imaging sector: a fan (apex, two straight edges, outer arc and, for
curvilinear probes, an inner arc) or a linear footprint, fitted robustly to the pixels whose temporal variation
exceeds the estimated frame-grabber noise. A model instead of a pixel mask gives one acquisition the same
geometry at any resolution, with or without a region box, from one cardiac cycle or many.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, Optional, Tuple

import cv2
import numpy as np

MIN_MOVING = 0.3          # grey levels of smoothed temporal std: the floor for noise-free (digital) captures
NOISE_RATIO = 2.0         # a k×k box average keeps 1/k of white noise; noise-dominated pixels keep < 2/k
MIN_NOISE_PIXELS = 0.005  # of the image: fewer noise-dominated pixels than this means a noise-free capture
MIN_SECTOR_FRACTION = 0.02
EDGE_BAND = (0.08, 0.5)   # rows (fraction of the sector's height) whose extents lie on the straight edges
PARALLEL_DEG = 4.0        # edges closer to parallel than this make a linear footprint
MAX_ASYMMETRY_DEG = 15.0  # half-angles differing by less are one symmetric fan with a weak (dim) wing
MIN_WING_SUPPORT = 0.2    # fraction of a mirrored wing that must vary above the noise floor
PHASED_INNER = 0.06       # inner radius below this fraction of the outer one: a phased array (apex in view)


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
    mask[max(self.y0, 0):self.y1 + 1, max(self.x0, 0):self.x1 + 1] = True
    return mask


def bounding_box(mask: np.ndarray) -> Box:
  ys, xs = np.nonzero(mask)
  return Box(int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))


def smoothing_kernel(shape: Tuple[int, int]) -> int:
  """Odd box size (~2 % of the image) whose average suppresses pixel noise but keeps tissue motion."""
  n = max(3, int(round(min(shape) / 50)))
  return n if n % 2 else n + 1


@dataclasses.dataclass(frozen=True)
class NoiseFloor:
  sigma: float              # temporal std of the capture noise per pixel (0: noise-free digital export)
  smooth_floor: float       # that noise's temporal std after the box average
  moving_threshold: float   # smoothed temporal std above which a pixel changes more than noise can


def estimate_noise(std: np.ndarray, std_smooth: np.ndarray, kernel: int) -> NoiseFloor:
  """Noise floor from the pixels whose variation is spatially white (noise), whatever their share.

  Tissue motion is spatially correlated and survives a k×k average; frame-grabber noise keeps 1/k of its
  std. The population below NOISE_RATIO/k is noise (background, static overlay), so no assumption on how
  much of the image the sector covers is needed.
  """
  candidates = (std > 0) & (std_smooth < NOISE_RATIO / kernel * std)
  # A digital export's background never changes at all; with capture noise (σ >= 1) over 16+ frames exactly
  # constant pixels are vanishingly rare, while JPEG flicker at the sector's block edges passes the ratio test.
  if candidates.sum() < max(MIN_NOISE_PIXELS * std.size, (std == 0).sum()):
    return NoiseFloor(0.0, 0.0, MIN_MOVING)
  sigma = float(np.median(std[candidates]))
  smooth = std_smooth[candidates]
  floor = float(np.median(smooth))
  spread = 1.4826 * float(np.median(np.abs(smooth - floor)))
  return NoiseFloor(sigma, floor, max(MIN_MOVING, floor + max(6 * spread, floor)))


def moving_region(std_smooth: np.ndarray, noise: NoiseFloor, kernel: int) -> Optional[np.ndarray]:
  """Largest connected region changing above the noise floor (bool), or None when none is plausible.

  An opening twice the smoothing width removes the blurred thin moving lines (ECG sweep, cursor, counters).
  """
  moving = (std_smooth > noise.moving_threshold).astype(np.uint8)
  opening = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * kernel + 1, 2 * kernel + 1))
  moving = cv2.morphologyEx(moving, cv2.MORPH_OPEN, opening)
  count, labels, stats, _ = cv2.connectedComponentsWithStats(moving, connectivity=8)
  if count < 2:
    return None
  largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
  # The box average spread the motion (k-1)/2 px beyond the sector's edge: take it back.
  region = cv2.erode((labels == largest).astype(np.uint8), np.ones((kernel, kernel), np.uint8)).astype(bool)
  return region if region.sum() >= MIN_SECTOR_FRACTION * region.size else None


def hull_mask(region: np.ndarray) -> np.ndarray:
  ys, xs = np.nonzero(region)
  hull = cv2.convexHull(np.stack([xs, ys], axis=1).astype(np.int32))
  mask = np.zeros(region.shape, np.uint8)
  cv2.fillConvexPoly(mask, hull, 1)
  return mask.astype(bool)


@dataclasses.dataclass(frozen=True)
class Geometry:
  """A fitted footprint in source pixels. kind: 'sector' (apex, half-angles from the downward vertical,
  outer/inner radius), 'linear' or 'box' (an axis-aligned rectangle: fitted, or the region box alone)."""
  kind: str
  apex: Tuple[float, float] = (0.0, 0.0)
  half_angles_deg: Tuple[float, float] = (0.0, 0.0)   # (left, right), both positive for a fan
  radius: float = 0.0
  inner_radius: float = 0.0
  rect: Optional[Box] = None
  symmetric: bool = False

  def to_mask(self, shape: Tuple[int, int]) -> np.ndarray:
    if self.kind != 'sector':
      return self.rect.to_mask(shape)
    mask = np.zeros(shape, np.uint8)
    left, right = (math.radians(a) for a in self.half_angles_deg)
    steps = max(16, int(self.radius * (left + right) / 2))   # ~2 px per polygon segment on the arc
    angles = np.linspace(-left, right, steps)
    outer = np.stack([self.apex[0] + self.radius * np.sin(angles), self.apex[1] + self.radius * np.cos(angles)], 1)
    if self.inner_radius > 0:
      inner = np.stack([self.apex[0] + self.inner_radius * np.sin(angles[::-1]),
                        self.apex[1] + self.inner_radius * np.cos(angles[::-1])], 1)
    else:
      inner = np.array([self.apex])
    polygon = np.round(np.concatenate([outer, inner]) * 16).astype(np.int32)   # 4 fractional bits
    cv2.fillPoly(mask, [polygon], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)

  def to_dict(self) -> Dict:
    if self.kind != 'sector':
      return dict(kind=self.kind, rect=[self.rect.x0, self.rect.y0, self.rect.x1, self.rect.y1])
    return dict(kind='sector', apex=[round(v, 1) for v in self.apex],
                half_angles_deg=[round(v, 2) for v in self.half_angles_deg], radius=round(self.radius, 1),
                inner_radius=round(self.inner_radius, 1), symmetric=self.symmetric)

  def in_output(self, crop_box: Box, size: int) -> Dict:
    """The same geometry in the size×size output's pixels (crop, centred pad, resize): what a model sees."""
    side = max(crop_box.width, crop_box.height)
    scale = size / side
    shift = np.array([crop_box.x0 - (side - crop_box.width) // 2, crop_box.y0 - (side - crop_box.height) // 2])
    to_out = lambda p: ((np.asarray(p, float) - shift + 0.5) * scale - 0.5).round(2).tolist()
    if self.kind != 'sector':
      r = self.rect
      return dict(kind=self.kind, rect=to_out([r.x0, r.y0]) + to_out([r.x1, r.y1]))
    return dict(kind='sector', apex=to_out(self.apex), half_angles_deg=[round(v, 2) for v in self.half_angles_deg],
                radius=round(self.radius * scale, 2), inner_radius=round(self.inner_radius * scale, 2))


def _row_extents(hull: np.ndarray):
  rows = np.nonzero(hull.any(1))[0]
  left = hull[rows].argmax(1)
  right = hull.shape[1] - 1 - hull[rows, ::-1].argmax(1)
  return rows, left, right


def _edge_line(ys: np.ndarray, xs: np.ndarray) -> Optional[Tuple[float, float]]:
  """x = a + b·y through the edge points, Huber-robust (cv2.fitLine); None with too few points."""
  if len(ys) < 4:
    return None
  vx, vy, x0, y0 = cv2.fitLine(np.stack([xs, ys], 1).astype(np.float32), cv2.DIST_HUBER, 0, 0.01, 0.01).ravel()
  if abs(vy) < 1e-6:
    return None
  slope = float(vx / vy)
  return float(x0 - slope * y0), slope


def _angles_and_radii(points_xy: np.ndarray, apex) -> Tuple[np.ndarray, np.ndarray]:
  dx, dy = points_xy[:, 0] - apex[0], points_xy[:, 1] - apex[1]
  return np.degrees(np.arctan2(dx, dy)), np.hypot(dx, dy)


def _arc_radii(region: np.ndarray, apex, left_deg: float, right_deg: float) -> Tuple[float, float]:
  """(outer, inner) radius: robust statistics of the region's farthest and nearest pixel per 1° bin."""
  ys, xs = np.nonzero(region)
  angles, radii = _angles_and_radii(np.stack([xs, ys], 1).astype(float), apex)
  margin = 0.15 * (left_deg + right_deg)
  keep = (angles > -left_deg + margin) & (angles < right_deg - margin)
  if keep.sum() < 10:
    keep = np.ones_like(angles, bool)
  bins = np.floor(angles[keep]).astype(int)
  bins -= bins.min()
  far = np.full(bins.max() + 1, -np.inf)
  near = np.full(bins.max() + 1, np.inf)
  np.maximum.at(far, bins, radii[keep])
  np.minimum.at(near, bins, radii[keep])
  # Upper/lower quartiles: a dim far field shortens some bins and the opening rounds the near field's
  # corners, neither ever moves a bin the other way.
  return float(np.percentile(far[np.isfinite(far)], 75)), float(np.percentile(near[np.isfinite(near)], 25))


def _linear(rows, left, right) -> Geometry:
  rect = Box(int(round(np.median(left))), int(rows.min()), int(round(np.median(right))), int(rows.max()))
  return Geometry(kind='linear', rect=rect)


def fit_geometry(region: np.ndarray, std_smooth: np.ndarray, noise: NoiseFloor,
                 static: Optional[np.ndarray] = None) -> Optional[Geometry]:
  """Fan or linear footprint of a moving `region` (bool, one component); None when it is neither.

  Edges are Huber line fits to the hull's row extents in the upper half (where a fan's sides are straight),
  skipping rows clipped by the image border; the apex is their intersection. When the two half-angles differ
  by less than MAX_ASYMMETRY_DEG and the missing part of the narrower wing still varies above the noise floor
  (a dim wing, not drawn graphics), the fan is made symmetric about the vertical through the apex.
  """
  hull = hull_mask(region)
  rows_all, left_all, right_all = _row_extents(hull)
  top, height = rows_all.min(), rows_all.max() - rows_all.min() + 1
  band = (rows_all >= top + EDGE_BAND[0] * height) & (rows_all <= top + EDGE_BAND[1] * height)
  width = hull.shape[1]
  keep_left = band & (left_all > 1)
  keep_right = band & (right_all < width - 2)
  left_line = _edge_line(rows_all[keep_left], left_all[keep_left])
  right_line = _edge_line(rows_all[keep_right], right_all[keep_right])
  if left_line is None or right_line is None:
    return None
  (a_left, b_left), (a_right, b_right) = left_line, right_line
  theta_left, theta_right = math.degrees(math.atan(-b_left)), math.degrees(math.atan(b_right))
  if abs(theta_left + theta_right) < PARALLEL_DEG:   # parallel edges (vertical, or steered alike)
    return _linear(rows_all, left_all[band], right_all[band])
  if theta_left <= 0 or theta_right <= 0:
    return None   # one side leans inwards: not a fan
  apex_y = (a_left - a_right) / (b_right - b_left)
  apex = (a_left + b_left * apex_y, apex_y)
  if apex_y > top + 0.15 * height or apex_y < top - 3 * height:
    return None
  outer, inner = _arc_radii(region, apex, theta_left, theta_right)
  if inner < PHASED_INNER * outer:
    inner = 0.0
  if outer <= inner or outer < 0.2 * height:
    return None
  symmetric = False
  if abs(theta_left - theta_right) < MAX_ASYMMETRY_DEG:
    if abs(theta_left - theta_right) < 0.5 or _wing_supported(
        apex, (theta_left, theta_right), (inner, outer), std_smooth, noise, static):
      theta_left = theta_right = max(theta_left, theta_right)
      symmetric = True
  return Geometry(kind='sector', apex=(float(apex[0]), float(apex[1])), half_angles_deg=(theta_left, theta_right),
                  radius=outer, inner_radius=inner, symmetric=symmetric)


def _wing_supported(apex, thetas, radii, std_smooth, noise, static) -> bool:
  """Whether the wedge added by mirroring the wider edge is tissue: it varies above the noise floor in
  enough of its pixels and is not drawn graphics."""
  ys, xs = np.mgrid[0:std_smooth.shape[0], 0:std_smooth.shape[1]]
  angles, radius = (v.reshape(xs.shape) for v in _angles_and_radii(np.stack([xs.ravel(), ys.ravel()], 1), apex))
  wide = max(thetas)
  if thetas[0] < thetas[1]:
    wedge = (angles < -thetas[0]) & (angles >= -wide)
  else:
    wedge = (angles > thetas[1]) & (angles <= wide)
  wedge &= (radius > max(radii[0], 0.1 * radii[1])) & (radius < radii[1]) & (ys >= apex[1])
  if wedge.sum() < 20:
    return True   # a sliver: mirroring changes nothing that matters
  if static is not None and static[wedge].mean() > 0.05:
    return False
  above = std_smooth[wedge] > max(noise.smooth_floor * 1.5, noise.smooth_floor + 1e-3)
  return bool(above.mean() >= MIN_WING_SUPPORT)
