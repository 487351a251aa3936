"""Tissue motion and tissue-locked speckle of the 2.x synthetic_echo generator (pure numpy + OpenCV).

Scatterers live on a material canvas (the end-diastolic frame) and every frame samples it through the inverse
motion field, so speckle moves with the myocardium; the canvas decorrelates gradually (out-of-plane motion,
an AR(1) whose rate is set per second) and each frame adds a little independent noise.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence, Tuple

import cv2
import numpy as np

from echojax.data.synthetic_latents import Acquisition, Motion

FRAME_SIZE = 112
MARGIN = 14           # material canvas margin (px): tissue inside the sector travels ≤ ~13 px from its rest place
_BLOCK = 4            # the motion field is smooth: evaluated at 28² block centres, bilinearly upsampled
_APEX_U = -95.0       # heart-coordinate long-axis position of the (off-sector) apex: it does not descend
_TAPER_U = (-35.0, -95.0)  # where the posterior wall converges on the septum (as `synthetic_anatomy.heart_layers`)
_FIXED_DEPTH = 15.0   # px below the pericardium / LA wall where the motion has faded to zero


# ------------------------------------------------------------------------------------------- the motion
def drift(acq: Acquisition, motion: Motion) -> np.ndarray:
  """(T, 2) px rigid translation of the heart (breathing, probe hold) at every frame."""
  seconds = np.arange(acq.num_frames) / acq.fps
  wave = np.sin(2 * np.pi * (seconds / motion.drift_period_s + motion.drift_phase))
  return wave[:, None] * np.asarray(motion.drift, np.float64)[None]


def descend(polys: np.ndarray, descent: np.ndarray) -> np.ndarray:
  """Moves heart-coordinate points (T, ..., 2) along the long axis: the base (u ≥ 0) by `descent` (T,) toward
  the apex, linearly less toward the apex (ring motion; the apex stays put)."""
  polys = np.array(np.broadcast_to(polys, (len(descent),) + np.shape(polys)[-2:]) if np.ndim(polys) == 2
                   else polys, np.float64)
  u = polys[..., 0]
  share = np.clip((u - _APEX_U) / -_APEX_U, 0.0, 1.0)
  polys[..., 0] = u - descent.reshape((-1,) + (1,) * (u.ndim - 1)) * share
  return polys


def _ascend(u: np.ndarray, descent: np.ndarray) -> np.ndarray:
  """Inverse of `descend` on the long-axis coordinate (exact: the map is piecewise linear)."""
  base = u + descent
  mid = (u + descent) / (1.0 - descent / -_APEX_U)
  return np.where(u >= -descent, base, np.where(u >= _APEX_U, mid, u))


def _piecewise_inverse(v: np.ndarray, now: np.ndarray, rest: np.ndarray) -> np.ndarray:
  """Rest position of the tissue now at `v`: linear between consecutive knots (now[..., k] → rest[..., k]);
  identity outside (the end knots do not move)."""
  k = np.clip((v[..., None] >= now).sum(-1, keepdims=True) - 1, 0, now.shape[-1] - 2)
  n0, n1 = np.take_along_axis(now, k, -1)[..., 0], np.take_along_axis(now, k + 1, -1)[..., 0]
  r0, r1 = np.take_along_axis(rest, k, -1)[..., 0], np.take_along_axis(rest, k + 1, -1)[..., 0]
  inside = (v >= now[..., 0]) & (v < now[..., -1])
  return np.where(inside, r0 + (v - n0) * (r1 - r0) / np.maximum(n1 - n0, 1e-6), v)


def _knots(walls: Mapping[str, np.ndarray], rest: Mapping[str, np.ndarray], u: np.ndarray):
  """Across-axis knots (…, K) of the LV and of the root/LA region at long-axis positions u (T, P)."""
  def col(x):
    return np.broadcast_to(np.reshape(x, (-1, 1)) if np.ndim(x) else x, u.shape)
  w = np.clip((_TAPER_U[0] - u) / (_TAPER_U[0] - _TAPER_U[1]), 0.0, 1.0)
  taper_now, taper_rest = col(walls['apex_taper']) * w, col(rest['apex_taper']) * w
  deep_lv = col(rest['pb']) + _FIXED_DEPTH - taper_rest
  deep_ao = col(rest['la_b']) + _FIXED_DEPTH
  top = col(walls['rv_top'] - 4.0)

  def lv(wl, taper):
    return [top, col(wl['st']), col(wl['sb']), col(wl['pt']) - taper, col(wl['pb']) - taper,
            col(wl['pb'] + 2.5) - taper, deep_lv]

  def ao(wl):
    return [top, col(wl['ao_t'] - 3.5), col(wl['ao_t']), col(wl['ao_b']), col(wl['la_t']), col(wl['la_b']),
            col(wl['la_b'] + 2.5), deep_ao]
  stack = lambda ks: np.stack(ks, -1)
  return (stack(lv(walls, taper_now)), stack(lv(rest, taper_rest)), stack(ao(walls)), stack(ao(rest)))


def material_displacement(walls: Mapping[str, np.ndarray], rest: Mapping[str, np.ndarray],
                          descent: np.ndarray, shifts: np.ndarray, m: np.ndarray,
                          active: np.ndarray) -> np.ndarray:
  """(T, 28, 28, 2) float32 displacement (dx, dy) px from each 4×4 block centre of every frame to where its
  tissue sits at end-diastole (the material canvas); 0 at the blocks where `active` (28, 28) is False.

  Pixel → heart coordinates (undoing the drift) → undo the base descent → undo wall thickening, LV
  shortening and root/LA motion (piecewise linear across the long axis, LV and root blended at the outflow).
  """
  t, cells = len(descent), FRAME_SIZE // _BLOCK
  centre = np.arange(cells, dtype=np.float32) * _BLOCK + (_BLOCK - 1) / 2   # pixel centres are integers
  gy, gx = np.meshgrid(centre, centre, indexing='ij')
  grid = np.stack([gx[active], gy[active]], -1)                 # (P, 2) active block centres
  lin, off = m[:, :2].astype(np.float32), m[:, 2].astype(np.float32)
  heart = (grid[None] - off - shifts[:, None].astype(np.float32)) @ np.linalg.inv(lin).T   # (T, P, 2)
  as32 = lambda d: {k: np.asarray(x, np.float32) for k, x in d.items()}
  walls, rest = as32(walls), as32(rest)
  u = _ascend(heart[..., 0], descent[:, None].astype(np.float32))
  lv_now, lv_rest, ao_now, ao_rest = _knots(walls, rest, u)
  v_lv = _piecewise_inverse(heart[..., 1], lv_now, lv_rest)
  v_ao = _piecewise_inverse(heart[..., 1], ao_now, ao_rest)
  blend = np.clip((u + 2.0) / 6.0, 0.0, 1.0)                   # LV outflow → aortic root over 6 px
  material = np.stack([u, v_lv + blend * (v_ao - v_lv)], -1) @ lin.T + off
  out = np.zeros((t, cells, cells, 2), np.float32)
  out[:, active] = material - grid
  return out


def contraction_speed(contraction_at, phase: np.ndarray, heart_rate: float) -> np.ndarray:
  """|d contraction / dt| (1/s) at each frame's phase; `contraction_at(phase)` is the LV envelope."""
  eps = 1e-3
  return np.abs(contraction_at(phase + eps) - contraction_at(phase - eps)) / (2 * eps) * heart_rate / 60.0


# ---------------------------------------------------------------------------------------------- speckle
def blurred_fields(rng: np.random.Generator, count: int, rows: int, cols: int, sx: float, sy: float,
                   channels: int = 1, as_bytes: bool = False):
  """(count, rows, cols[, channels]) Gaussian-blurred uniform bytes (≈ Gaussian by the central limit; bytes
  are ~10× cheaper to draw than normals) and their variance: float32 with zero mean, or (`as_bytes`, 2× faster)
  uint8 around 127.5 (rounding adds 1/12 to the variance). 1.x draws its speckle so (channels=1, float)."""
  pad = 3
  shape = (count * (rows + 2 * pad), cols) + ((channels,) if channels > 1 else ())
  field = np.frombuffer(rng.bytes(int(np.prod(shape))), np.uint8).reshape(shape)
  if not as_bytes:
    field = field.astype(np.float32)
    field -= np.float32(127.5)
  # Fields are stacked along rows, padded so the blur does not mix neighbours.
  field = cv2.GaussianBlur(field, (0, 0), sigmaX=sx, sigmaY=sy, borderType=cv2.BORDER_REFLECT)
  field = field.reshape((count, rows + 2 * pad) + shape[1:])[:, pad:-pad]
  # OpenCV's default kernel size is round(8σ+1)|1 for float images, round(6σ+1)|1 for bytes; Σw² sets the
  # blurred field's variance.
  size = (lambda s: int(round(6 * s + 1)) | 1) if as_bytes else (lambda s: int(round(8 * s + 1)) | 1)
  kx, ky = (cv2.getGaussianKernel(size(s), s) for s in (sx, sy))
  variance = (256.0 ** 2 - 1) / 12 * float((kx ** 2).sum() * (ky ** 2).sum())
  return field, variance + (1 / 12 if as_bytes else 0.0)


def _neighbour_correlation(sigma: float) -> float:
  """Correlation of a Gaussian-blurred white field one pixel apart (OpenCV's default kernel)."""
  k = cv2.getGaussianKernel(int(round(8 * sigma + 1)) | 1, sigma)[:, 0]
  return float((k[1:] * k[:-1]).sum() / (k ** 2).sum())


def _interp_variance(frac: np.ndarray, rho: float) -> np.ndarray:
  """Variance of a unit-variance field linearly interpolated at sub-pixel offset `frac` (ρ one pixel apart)."""
  return 1.0 - 2.0 * frac * (1.0 - frac) * (1.0 - rho)


def tissue_locked_power(rng: np.random.Generator, displacement: np.ndarray, outline: np.ndarray,
                        keep: np.ndarray, nugget: float, sigmas: Tuple[float, float]) -> np.ndarray:
  """Speckle power |z|² (T, 112, 112) float32, mean 1, of complex scatterers on the material canvas.

  `displacement`: `material_displacement` (bilinearly upsampled per frame). The canvas is a static field
  outside the heart (`outline`, (N, 2) px at rest: chest wall and deep tissue stay put) and, inside, an
  AR(1) keeping `keep[t]` of itself from frame t-1 (out-of-plane motion). Each frame adds independent noise
  of weight η = `nugget`: the frame's innovation field read 2·MARGIN px away from where the canvas uses it.
  Linear interpolation lowers a correlated field's variance by a known amount at each sub-pixel offset; it
  is divided out, so brightness does not ripple with the tissue's sub-pixel position.
  """
  t, n, side = len(displacement), FRAME_SIZE, FRAME_SIZE + 2 * MARGIN
  sx, sy = sigmas
  fields, variance = blurred_fields(rng, t + 1, side, side, sx, sy, channels=2, as_bytes=True)
  unit = 1 / math.sqrt(2 * variance)                    # bytes → unit-variance complex field: (b - 127.5)·unit
  heart = np.zeros((side, side), np.float32)
  cv2.fillPoly(heart, [np.round((outline + MARGIN) * 16).astype(np.int32)], 1.0, cv2.LINE_AA, 4)
  heart = cv2.GaussianBlur(heart, (0, 0), 3.0)[..., None]   # tissue around the heart is dragged along a little
  speckle_share = math.sqrt(1 - nugget ** 2)
  inside = np.repeat(np.sqrt(heart) * np.float32(speckle_share), 2, -1)
  as_unit = lambda b: (b.astype(np.float32) - np.float32(127.5)) * np.float32(unit)
  static = as_unit(fields[0]) * (np.sqrt(1 - heart) * np.float32(speckle_share))
  moving = as_unit(fields[1])
  # Variance lost by interpolation at the sub-pixel offset: smooth in the displacement, so from block centres.
  frac = displacement - np.floor(displacement)
  rho = np.array([_neighbour_correlation(sx), _neighbour_correlation(sy)], np.float32)
  restore = (1 / np.sqrt(np.prod(1 - 2 * frac * (1 - frac) * (1 - rho), -1, keepdims=True))).repeat(2, -1)
  y, x = np.mgrid[0:n, 0:n].astype(np.float32) + np.float32(MARGIN)
  identity = np.stack([x, y], -1)
  power = np.empty((t, n, n), np.float32)
  canvas = np.empty_like(moving)
  size = (n, n)
  for i in range(t):
    if i:
      fresh = math.sqrt(max(1.0 - keep[i] ** 2, 0.0)) * unit
      cv2.addWeighted(moving, float(keep[i]), fields[i + 1], fresh, -127.5 * fresh, dst=moving, dtype=cv2.CV_32F)
    cv2.multiply(inside, moving, dst=canvas)
    cv2.add(canvas, static, dst=canvas)
    where = cv2.add(cv2.resize(displacement[i], size, interpolation=cv2.INTER_LINEAR), identity)
    z = cv2.remap(canvas, where, None, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    z = cv2.multiply(z, cv2.resize(restore[i], size, interpolation=cv2.INTER_LINEAR))
    z = cv2.addWeighted(z, 1.0, fields[i + 1, 2 * MARGIN:, 2 * MARGIN:], nugget * unit, -127.5 * nugget * unit,
                        dtype=cv2.CV_32F)
    np.square(z, out=z)
    np.add(z[..., 0], z[..., 1], out=power[i])
  return power


def blur_frames(frames: np.ndarray, sx: float, sy: float) -> np.ndarray:
  """Gaussian blur of every frame of a float32 (T, H, W) stack, in place (frame by frame: a stacked blur
  would leak rows between frames)."""
  for frame in frames:
    cv2.GaussianBlur(frame, (0, 0), sigmaX=sx, sigmaY=sy, dst=frame, borderType=cv2.BORDER_REFLECT)
  return frames
