"""PLAX heart geometry of the synthetic echo model: wall positions over the contraction, the anatomy as
reflectivity polygons in heart coordinates (long axis u, across it v) and the heart→pixel affine. Pure numpy;
`synthetic` paints it and `synthetic_motion` moves the speckle with it.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from echojax.data.synthetic_latents import Acquisition, StudyLatents

REFL = dict(blood=0.002, deep=0.015, chest=0.07, myo=0.075, fibrous=0.22, pericardium=0.8, calc=1.0)


def _poly(*points):
  """Polygon (T, N, 2) from N points whose coordinates are scalars or (T,) arrays."""
  cols = np.broadcast_arrays(*(np.asarray(c, np.float64) for p in points for c in p))
  return np.stack(cols, -1).reshape(cols[0].shape + (len(points), 2))


def _ellipse(cu, cv, au, av, n=20):
  a = np.linspace(0, 2 * np.pi, n, endpoint=False)
  cu, cv, au, av = (x[..., None] for x in np.broadcast_arrays(*(np.asarray(x, np.float64)
                                                                  for x in (cu, cv, au, av))))
  return np.stack([cu + au * np.cos(a), cv + av * np.sin(a)], -1)


def _segment(p0, p1, w0, w1):
  """Quadrilateral (T, 4, 2) of a tapered stroke from p0 (width w0) to p1 (width w1)."""
  d = p1 - p0
  n = np.stack([-d[..., 1], d[..., 0]], -1) / np.maximum(np.linalg.norm(d, axis=-1, keepdims=True), 1e-6)
  return np.stack([p0 + n * w0 / 2, p1 + n * w1 / 2, p1 - n * w1 / 2, p0 - n * w0 / 2], -2)


def leaflets(lat: StudyLatents, aortic, root_dv):
  """Aortic leaflets: hinges and tips (each (T, 2, 2): [top, bottom]) in heart coordinates."""
  d, hinge_u = lat.aortic_root, 7.0
  length = lat.av_leaflet_len * d
  top = np.stack([np.full_like(root_dv, hinge_u), root_dv + 0.3], -1)
  bottom = np.stack([np.full_like(root_dv, hinge_u), root_dv + d - 0.3], -1)
  closed = np.arctan2(d / 2, -lat.av_bow)  # direction from a hinge to the coaptation point (toward the LV)
  tips = []
  for hinge, sign, asym in ((top, 1.0, 1 + lat.av_asymmetry), (bottom, -1.0, 1 - lat.av_asymmetry)):
    opening = np.clip(lat.av_opening * asym, 0.05, 0.98)
    open_angle = np.arcsin(np.clip((1 - opening) * d / 2 / length, 0, 1))
    angle = closed + (open_angle - closed) * aortic
    tips.append(hinge + length * np.stack([np.cos(angle), sign * np.sin(angle)], -1))
  return np.stack([top, bottom], 1), np.stack(tips, 1)


def wall_positions(lat: StudyLatents, contraction) -> dict:
  """Across-axis (v) positions of the walls at each contraction: the knots of the anatomy and its motion."""
  cmax = lat.frac_shortening / 0.35
  delta = lat.lvid * lat.frac_shortening * contraction
  sb = 0.3 * delta                                          # septum, LV side
  st = sb - lat.septum * (1 + 0.35 * cmax * contraction)    # septum, RV side
  pt = lat.lvid - 0.7 * delta                               # posterior wall, LV side
  pb = pt + lat.posterior_wall * (1 + 0.5 * cmax * contraction)
  rv_top = -lat.septum - lat.rv
  root_dv = -2.5 * contraction                              # the root moves anteriorly in systole
  ao_t, ao_b = root_dv, root_dv + lat.aortic_root
  la_t = ao_b + 3
  la_b = la_t + lat.left_atrium * (1 + 0.08 * contraction)
  apex_taper = 0.55 * (pt - sb)  # the posterior wall converges on the septum toward the (off-sector) apex
  return dict(sb=sb, st=st, pt=pt, pb=pb, rv_top=rv_top, root_dv=root_dv, ao_t=ao_t, ao_b=ao_b, la_t=la_t,
              la_b=la_b, apex_taper=apex_taper)


def heart_layers(lat: StudyLatents, contraction, aortic, mitral, valve_gain: float):
  """[(reflectivity, polygons (T, N, 2) in heart coordinates)] in painting order."""
  w = wall_positions(lat, contraction)
  sb, st, pt, pb, rv_top, root_dv = w['sb'], w['st'], w['pt'], w['pb'], w['rv_top'], w['root_dv']
  ao_t, ao_b, la_t, la_b, apex_taper = w['ao_t'], w['ao_b'], w['la_t'], w['la_b'], w['apex_taper']
  myo, blood = REFL['myo'] * lat.myo_echo, REFL['blood']
  hu, zeros = 7.0, np.zeros_like(contraction)
  layers = [
      (myo, _poly((-95, rv_top - 4), (62, rv_top - 4), (62, la_b + 2), (0, la_b + 2), (0, pb), (-35, pb),
                  (-95, pb - apex_taper))),
      (blood, _poly((-95, rv_top), (42, rv_top), (42, ao_t - 3.5), (2, ao_t - 3.5), (-2, st), (-95, st))),
      (blood, _poly((2, sb), (-95, sb), (-95, pt - apex_taper), (-35, pt), (2, pt))),
  ]
  top_edge = [(0, ao_t), (hu - 2, ao_t), (hu + 2, ao_t - 2), (hu + 12, ao_t - 2), (hu + 16, ao_t), (62, ao_t)]
  bot_edge = [(u, ao_b + (ao_t - v)) for u, v in top_edge]  # the sinus bulges mirror each other
  layers.append((REFL['fibrous'], _poly(*top_edge, *[(u, v - 2.5) for u, v in top_edge[::-1]])))
  layers.append((blood, _ellipse(22, (la_t + la_b) / 2, 21, (la_b - la_t) / 2)))
  layers.append((blood, _poly(*top_edge, *bot_edge[::-1])))
  layers.append((REFL['fibrous'] * 1.1, _poly(*bot_edge[1:], *[(u, v + 3) for u, v in bot_edge[:0:-1]])))
  layers.append((REFL['pericardium'], _poly(
      (-95, pb - apex_taper), (-35, pb), (0, pb), (0, la_b), (50, la_b), (50, la_b + 2.5), (2.5, la_b + 2.5),
      (2.5, pb + 2.5), (-35, pb + 2.5), (-95, pb + 2.5 - apex_taper))))
  dao_v = np.maximum(pb, la_b) + 9
  layers += [(REFL['fibrous'], _ellipse(4, dao_v, 7, 7, 14)), (blood, _ellipse(4, dao_v, 5.5, 5.5, 14)),
             (myo, _ellipse(0, pt, 3, 3, 10))]
  # Mitral valve: anterior leaflet hangs off the posterior aortic wall, posterior one off the annulus.
  aml_hinge = np.stack([zeros + 2, ao_b + 1.5], -1)
  aml_angle = np.deg2rad(105 + 95 * mitral)
  aml_tip = aml_hinge + 0.45 * lat.lvid * np.stack([np.cos(aml_angle), np.sin(aml_angle)], -1)
  pml_hinge = np.stack([zeros, pt], -1)
  pml_angle = np.deg2rad(-100 - 110 * mitral)
  pml_tip = pml_hinge + 0.22 * lat.lvid * np.stack([np.cos(pml_angle), np.sin(pml_angle)], -1)
  layers += [(lat.mitral_echo, _segment(aml_hinge, aml_tip, 1.6, 1.1)),
             (lat.mitral_echo, _segment(pml_hinge, pml_tip, 1.6, 1.1))]
  hinges, tips = leaflets(lat, aortic, root_dv)
  th, av_refl = lat.av_thickness, lat.av_brightness * valve_gain
  for k in range(2):
    layers.append((av_refl, _segment(hinges[:, k], tips[:, k], 0.7 * th, th)))
    layers.append((av_refl, _ellipse(tips[:, k, 0], tips[:, k, 1], th / 2, th / 2, 8)))
  for leaflet, pos, radius in lat.av_calcium:
    c = hinges[:, leaflet] + pos * (tips[:, leaflet] - hinges[:, leaflet])
    layers.append((REFL['calc'] * valve_gain, _ellipse(c[:, 0], c[:, 1], radius, radius, 8)))
  return layers


def to_pixels(lat: StudyLatents, acq: Acquisition, shift: Sequence[float] = (0.0, 0.0)) -> np.ndarray:
  """2×3 affine from heart coordinates to frame pixels (tilt, placement, zoom about the apex, jitter)."""
  def rot(deg):
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
  origin = np.array([50 + lat.heart_dx, lat.chest_wall + 11 + lat.rv + lat.septum + lat.heart_dy])
  linear = acq.zoom * rot(acq.rotation_deg) @ rot(lat.tilt_deg)
  offset = (np.array(acq.apex) + acq.zoom * rot(acq.rotation_deg) @ (origin - np.array([56.0, 0.0]))
            + np.array(acq.translate) + np.asarray(shift, np.float64))
  return np.concatenate([linear, offset[:, None]], 1)


def apply_affine(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
  """Points (..., 2) through a 2×3 affine."""
  return pts @ m[:, :2].T + m[:, 2]
