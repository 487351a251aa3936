"""Grad-CAM (Selvaraju et al.) on the last residual stage (layer4) a clinician can read: the map of every eval
clip that makes the prediction, placed back on the video's frames and averaged where clips overlap, masked
to the imaging sector, one fixed scale per study, shown (perceptual colour map + colour bar) beside the raw
frame of peak saliency at >= 224 px with a caption; and the valve-box localisation score (energy inside a
known box, pointing game) against random maps. Works on prepared eval clips and raw uint8 frames; reading
inputs is the tools' job and dataset splits the jobs'."""
from __future__ import annotations

import os
from typing import Optional, Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

COLORMAP = 'inferno'
PANEL_PX = 256          # each panel (raw frame, overlay) is drawn at least this wide


def clip_cams(model, variables, clips: jax.Array, output_index: int = 0):
  """Eval clips (N, L, S, S, C) → (logits (N, outputs), Grad-CAMs (N, t, h, w) on the layer4 grid, ≥ 0).

  The gradient is of logit `output_index` of each clip; eval mode (running BN statistics), so clips are
  independent and one backward pass over their sum gives every clip's gradient."""
  logits, fmap = model.apply(variables, clips, train=False, return_feature_map=True)

  def summed_logit(m):
    out = model.apply(variables, m, train=False, method=type(model).logits_from_feature_map)
    return out[:, output_index].sum()

  grads = jax.grad(summed_logit)(fmap)
  alphas = grads.mean(axis=(1, 2, 3))                              # (N, C): α_c per clip
  cams = jax.nn.relu(jnp.einsum('nthwc,nc->nthw', fmap.astype(jnp.float32), alphas))
  return logits, cams


def eval_clip_starts(num_frames: int, num_clips: int, clip_len: int) -> np.ndarray:
  """First frame of each eval clip: k·max((T − L) // N, 0), as the eval pipeline samples them."""
  return np.arange(num_clips) * max((num_frames - clip_len) // num_clips, 0)


def video_cam(cams: np.ndarray, num_frames: int, clip_len: int, size: int) -> np.ndarray:
  """Per-clip layer4 maps (N, t, h, w) → (T, size, size) per video frame: each map upsampled (linear in time,
  bilinear in space) to its clip's frames and averaged over the clips covering a frame; NaN where none does."""
  cams = np.asarray(cams, np.float32)
  up = np.asarray(jax.image.resize(jnp.asarray(cams), (len(cams), clip_len, size, size), method='linear'))
  total = np.zeros((num_frames, size, size), np.float64)
  count = np.zeros(num_frames)
  for start, cam in zip(eval_clip_starts(num_frames, len(cams), clip_len), up):
    frames = np.arange(start, start + clip_len)
    keep = frames < num_frames                                    # zero-padded tail of a short video
    total[frames[keep]] += cam[keep]
    count[frames[keep]] += 1
  with np.errstate(invalid='ignore'):
    return (total / count[:, None, None]).astype(np.float32)


def sector_mask(frames: np.ndarray) -> np.ndarray:
  """bool (H, W): the convex hull of the pixels that are ever non-zero (the masked cines are black outside
  the imaging sector, so the hull is the fan)."""
  ever = (np.asarray(frames).reshape(-1, *np.shape(frames)[-2:]) > 0).any(0)
  mask = np.zeros(ever.shape, np.uint8)
  points = cv2.findNonZero(ever.astype(np.uint8))
  if points is not None:
    cv2.fillConvexPoly(mask, cv2.convexHull(points), 1)
  return mask.astype(bool)


def peak_frame(cam: np.ndarray, mask: np.ndarray) -> int:
  """The frame whose in-sector saliency peak is highest (frames no clip covers are skipped)."""
  inside = np.where(mask[None], np.nan_to_num(cam, nan=-1.0), -1.0)
  return int(np.argmax(inside.reshape(len(cam), -1).max(1)))


def _box_mask(box, shape) -> np.ndarray:
  x0, y0, x1, y1 = (int(v) for v in box)
  m = np.zeros(shape, bool)
  m[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = True
  return m


def box_scores(cam: np.ndarray, box, mask: np.ndarray) -> dict:
  """Localisation of a (T, H, W) map against a box (x0, y0, x1, y1), end-exclusive, in frame pixels — one
  for the whole video, or (T, 4) per frame: 'energy' = share of the in-sector saliency inside the box,
  'hit' = the in-sector peak lies in it (pointing game), 'area' = the box's share of the sector (what a
  uniform map scores). Frames no clip covers are left out."""
  box = np.asarray(box)
  covered = np.isfinite(cam).all(axis=(1, 2))
  cam, boxes = cam[covered], (np.broadcast_to(box, (len(covered), 4)))[covered]
  inside = np.stack([_box_mask(b, mask.shape) & mask for b in boxes])
  weights = np.where(mask[None], np.maximum(cam, 0), 0.0)
  total = weights.sum()
  peak = np.unravel_index(np.argmax(weights), weights.shape)
  return {'energy': float((weights * inside).sum() / total) if total > 0 else float('nan'),
          'hit': float(inside[peak]), 'area': float(inside.sum() / (mask.sum() * len(cam)))}


def random_box_scores(cam_shape, box, mask, num_frames: int, clip_len: int, n_maps: int = 20,
                      seed: int = 0) -> dict:
  """The same scores for random maps drawn on the layer4 grid (uniform noise) and upsampled exactly as the
  model's: the baseline a map that ignores the image gets, averaged over n_maps."""
  rng = np.random.default_rng(seed)
  scores = [box_scores(video_cam(rng.random(cam_shape, np.float32), num_frames, clip_len, mask.shape[0]),
                       box, mask) for _ in range(n_maps)]
  return {k: float(np.mean([s[k] for s in scores])) for k in ('energy', 'hit', 'area')}


def study_figure(panels: Sequence[dict], caption: str, path: str, vmax: float, label: str) -> str:
  """One PNG per study: a row per video, raw frame (left) and Grad-CAM overlay (right), one colour scale;
  the map's opacity grows with its value, so low-saliency anatomy stays visible.

  panels: {'frame': uint8 (H, W), 'cam': float (H, W), 'mask': bool (H, W), 'title': str}."""
  import textwrap
  from matplotlib.figure import Figure
  inch = PANEL_PX / 100 * 1.15                                    # margins and titles take the rest
  lines = textwrap.wrap(caption, 80)
  fig = Figure(figsize=(2 * inch + 1.3, inch * len(panels) + 0.25 * len(lines) + 0.4), dpi=100,
               layout='constrained')
  axes = fig.subplots(len(panels), 2, squeeze=False)
  image = None
  for (raw_ax, cam_ax), panel in zip(axes, panels):
    raw_ax.imshow(panel['frame'], cmap='gray', vmin=0, vmax=255, interpolation='bilinear')
    cam_ax.imshow(panel['frame'], cmap='gray', vmin=0, vmax=255, interpolation='bilinear')
    shown = np.ma.masked_where(~panel['mask'], panel['cam'])       # nothing drawn outside the sector
    opacity = np.where(panel['mask'], 0.15 + 0.6 * np.clip(panel['cam'] / vmax, 0, 1), 0.0)
    image = cam_ax.imshow(shown, cmap=COLORMAP, vmin=0.0, vmax=vmax, alpha=opacity, interpolation='bilinear')
    raw_ax.set_title(panel['title'], fontsize=8)
    cam_ax.set_title('Grad-CAM overlay (sector only)', fontsize=8)
    for ax in (raw_ax, cam_ax):
      ax.set_axis_off()
  bar = fig.colorbar(image, ax=axes.ravel().tolist(), fraction=0.05, pad=0.02)
  bar.solids.set_alpha(1.0)
  bar.set_label(label, fontsize=8)
  bar.ax.tick_params(labelsize=7)
  fig.suptitle('\n'.join(lines), fontsize=9)
  fig.savefig(path, format='png')
  return path


def study_saliency(model, variables, study_id: str, videos: Sequence[dict], out_dir: str, *,
                   clip_len: int, output_index: int = 0, caption: str = '') -> dict:
  """Grad-CAM figure of one study. videos: {'video_id', 'frames' uint8 (T, H, W), 'clips' (N, L, S, S, 1)
  eval clips[, 'box']}; every clip of each video contributes. Returns {'png', 'peaks', 'scores', 'vmax'}."""
  cams_of = jitted_cams(model, output_index)
  maps = []
  for v in videos:
    _, cams = cams_of(variables, jnp.asarray(v['clips']))
    frames = np.asarray(v['frames'])
    cam = video_cam(np.asarray(cams), len(frames), clip_len, frames.shape[-1])
    mask = sector_mask(frames)
    maps.append((v, frames, cam, mask))
  # One scale for the whole study: the maps of its videos are comparable, and a flat study stays flat.
  vmax = max([float(np.nanmax(np.where(m[None], c, 0.0))) for _, _, c, m in maps] + [1e-12])
  panels, peaks, scores = [], [], []
  for v, frames, cam, mask in maps:
    f = peak_frame(cam, mask)
    peaks.append(f)
    panels.append({'frame': frames[f], 'cam': np.nan_to_num(cam[f]), 'mask': mask,
                   'title': f"video {v['video_id']}, frame {f} of {len(frames)} (peak saliency)"})
    if v.get('box') is not None:
      scores.append(box_scores(cam, v['box'], mask))
  os.makedirs(out_dir, exist_ok=True)
  png = study_figure(panels, caption or f'study {study_id}', os.path.join(out_dir, safe_name(study_id) + '.png'),
                     vmax, 'Grad-CAM, layer4 (one scale per study)')
  return {'study_id': study_id, 'png': png, 'peaks': peaks, 'scores': scores, 'vmax': vmax}


_JITTED = {}


def jitted_cams(model, output_index: int):
  """One compiled Grad-CAM per (model, output); the model is kept with it so a reused id cannot alias."""
  cached = _JITTED.get((id(model), output_index))
  if cached is None or cached[0] is not model:
    cached = (model, jax.jit(lambda v, c: clip_cams(model, v, c, output_index)))
    _JITTED[(id(model), output_index)] = cached
  return cached[1]


def safe_name(name: str) -> str:
  return ''.join(c if c.isalnum() or c in '-_.' else '_' for c in str(name))
