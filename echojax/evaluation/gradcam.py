"""Grad-CAM (Selvaraju et al.) on the last residual stage (layer4) for the positive-class logit, as the
paper: the map is upsampled to T×H×W and shown per frame (GIF) and as the pixel-wise max over time (PNG).
Works on prepared eval clips; reading raw inputs is the tools' job and dataset splits the jobs'."""
from __future__ import annotations

import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def grad_cam(model, variables, clip: jax.Array) -> tuple[jax.Array, jax.Array]:
  """clip (T,H,W,C) → (logit, cam (T,H,W) in [0,1]); eval mode, gradients w.r.t. the layer4 map."""
  logits, fmap = model.apply(variables, clip[None], train=False, return_feature_map=True)

  def logit_of_map(m):
    return model.apply(variables, m, train=False, method=type(model).logits_from_feature_map)[0, 0]

  grads = jax.grad(logit_of_map)(fmap)
  weights = grads.mean(axis=(1, 2, 3))                         # (1, C): α_c
  cam = jax.nn.relu(jnp.einsum('bthwc,bc->bthw', fmap.astype(jnp.float32), weights))[0]
  cam = jax.image.resize(cam, clip.shape[:3], method='trilinear')
  cam = cam / jnp.maximum(cam.max(), 1e-12)
  return logits[0, 0], cam


def overlay(frame: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
  """Gray frame (H,W) in [0,1] + cam (H,W) → RGB uint8 with a jet colour map."""
  from matplotlib import colormaps
  heat = colormaps['jet'](np.clip(cam, 0, 1))[..., :3]
  gray = np.repeat(np.clip(frame, 0, 1)[..., None], 3, axis=-1)
  return (255 * ((1 - alpha) * gray + alpha * heat)).astype(np.uint8)


def write_saliency(clip: np.ndarray, cam: np.ndarray, out_prefix: str, scale: int = 3) -> dict:
  """Writes <prefix>_maxproj.png (max over time on frame 0) and <prefix>_frames.gif (per frame)."""
  from PIL import Image
  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  frames = clip[..., 0]
  size = (frames.shape[2] * scale, frames.shape[1] * scale)
  png = out_prefix + '_maxproj.png'
  Image.fromarray(overlay(frames[0], cam.max(axis=0))).resize(size, Image.NEAREST).save(png)
  gif = out_prefix + '_frames.gif'
  images = [Image.fromarray(overlay(f, c)).resize(size, Image.NEAREST) for f, c in zip(frames, cam)]
  images[0].save(gif, save_all=True, append_images=images[1:], duration=80, loop=0)
  return {'png': png, 'gif': gif}


def saliency_for_clips(model, variables, items: Sequence[tuple[str, str, np.ndarray]], out_dir: str,
                       max_videos: int = 3) -> list[dict]:
  """items: (study_id, video_id, eval clips (N,L,H,W,1)). Per study, maps for its highest-probability videos."""
  probs_of = jax.jit(lambda v, x: jax.nn.sigmoid(model.apply(v, x, train=False)[:, 0]))
  cams_of = jax.jit(lambda v, c: grad_cam(model, v, c))
  scored = [(float(np.mean(probs_of(variables, jnp.asarray(clips)))), study, vid, clips)
            for study, vid, clips in items]
  by_study: dict[str, list] = {}
  for item in sorted(scored, key=lambda t: -t[0]):
    by_study.setdefault(item[1], []).append(item)
  results = []
  for study, study_items in by_study.items():
    for prob, _, vid, clips in study_items[:max_videos]:
      _, cam = cams_of(variables, jnp.asarray(clips[0]))
      paths = write_saliency(clips[0], np.asarray(cam), os.path.join(out_dir, safe_name(vid)))
      results.append({'study_id': study, 'video_id': vid, 'prob': prob, **paths})
  return results


def safe_name(name: str) -> str:
  return ''.join(c if c.isalnum() or c in '-_.' else '_' for c in name)
