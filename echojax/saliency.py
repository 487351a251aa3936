"""Grad-CAM (Selvaraju et al.) on the last residual stage (layer4) for the severe-AS logit, as the paper:
the map is upsampled to T×H×W and shown per frame (GIF) and as the pixel-wise max over time on the first
frame (PNG). CLI: `python -m echojax.saliency --checkpoint DIR --input VIDEO|DICOM|FOLDER [--out OUT]`."""
from __future__ import annotations

import argparse
import os

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


def saliency_for_videos(checkpoint: str, videos: list[tuple[str, str, np.ndarray]], out_dir: str,
                        max_videos: int = 3) -> list[dict]:
  """videos: (study_id, video_id, uint8 (T,H,W)). Per study, maps for its highest-probability videos."""
  from echojax import builders, clips as clip_lib
  cfg, model, variables = builders.load_finetuned(checkpoint)
  size, clip_len = cfg.data.image_size, cfg.data.eval_clip_len
  probs_of = jax.jit(lambda v, x: jax.nn.sigmoid(model.apply(v, x, train=False)[:, 0]))
  cams_of = jax.jit(lambda v, c: grad_cam(model, v, c))
  apply = lambda x: probs_of(variables, x)
  cam_fn = lambda c: cams_of(variables, c)
  scored = []
  for study, vid, video in videos:
    clips = clip_lib.eval_clips(video, clip_len, cfg.data.eval_num_clips, size)
    scored.append((float(np.mean(apply(jnp.asarray(clips)))), study, vid, clips))
  results = []
  by_study: dict[str, list] = {}
  for item in sorted(scored, key=lambda t: -t[0]):
    by_study.setdefault(item[1], []).append(item)
  for study, items in by_study.items():
    for prob, _, vid, clips in items[:max_videos]:
      logit, cam = cam_fn(jnp.asarray(clips[0]))
      paths = write_saliency(clips[0], np.asarray(cam), os.path.join(out_dir, _safe(vid)))
      results.append({'study_id': study, 'video_id': vid, 'prob': prob, **paths})
  return results


def saliency_for_split(checkpoint: str, split: str, out_dir: str, max_videos: int = 1) -> list[dict]:
  """Saliency for the highest-probability videos of a dataset split (the demo's image)."""
  from echojax import builders
  from echojax.data import pipeline
  cfg, _, _ = builders.load_finetuned(checkpoint)
  builder = builders.prepare_dataset(cfg.data, lambda *_: None)
  ds = builder.as_dataset(split=split).take(8)
  videos = [(ex['study_id'].decode(), ex['video_id'].decode(), ex['video'][..., 0])
            for ex in pipeline.as_numpy(ds)]
  results = saliency_for_videos(checkpoint, videos, out_dir, max_videos=1)
  return sorted(results, key=lambda r: -r['prob'])[:max_videos]


def _safe(name: str) -> str:
  return ''.join(c if c.isalnum() or c in '-_.' else '_' for c in name)


def main(argv=None):
  parser = argparse.ArgumentParser(description='Grad-CAM saliency of a fine-tuned echojax model.')
  parser.add_argument('--checkpoint', required=True, help='fine-tuning workdir')
  parser.add_argument('--input', required=True, help='video file, DICOM file, folder, or manifest CSV')
  parser.add_argument('--out', default='saliency_out')
  parser.add_argument('--max-videos', type=int, default=3, help='per study')
  parser.add_argument('--salt', default=None, help='salt for DICOM ids (default $ECHOJAX_DICOM_SALT)')
  args = parser.parse_args(argv)
  from echojax import predict
  videos, rejects = predict.load_inputs(args.input, os.path.join(args.out, 'converted'), args.salt)
  if not videos:
    raise SystemExit(f'no usable video in {args.input}; rejects: {rejects}')
  for r in saliency_for_videos(args.checkpoint, videos, args.out, args.max_videos):
    print(f"{r['study_id']} {r['video_id']} p={r['prob']:.3f} → {r['png']}, {r['gif']}")


if __name__ == '__main__':
  main()
