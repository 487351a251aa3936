"""Grad-CAM CLI on raw inputs: `python -m echojax.saliency --checkpoint DIR --input VIDEO|DICOM|FOLDER
[--out OUT]` writes, per study, the maps of its highest-probability videos (see evaluation/gradcam.py)."""
from __future__ import annotations

import argparse
import os

from echojax.evaluation import gradcam
from echojax.jobs import model_init
from echojax.tools.raw_inputs import load_inputs


def saliency_for_videos(checkpoint: str, videos, out_dir: str, max_videos: int = 3) -> list[dict]:
  """videos: (study_id, video_id, uint8 (T,H,W)) → saliency files of each study's top videos."""
  from echojax.data import pipeline
  cfg, model, variables = model_init.load_finetuned(checkpoint)
  items = [(s, v, pipeline.eval_clips_for_video(f, cfg.data)) for s, v, f in videos]
  return gradcam.saliency_for_clips(model, variables, items, out_dir, max_videos)


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m echojax.saliency',
                                   description='Grad-CAM saliency of a fine-tuned echojax model.')
  parser.add_argument('--checkpoint', required=True, help='fine-tuning workdir')
  parser.add_argument('--input', required=True, help='video file, DICOM file, folder, or manifest CSV')
  parser.add_argument('--out', default='saliency_out')
  parser.add_argument('--max-videos', type=int, default=3, help='per study')
  parser.add_argument('--salt', default=None, help='salt for DICOM ids (default $ECHOJAX_DICOM_SALT)')
  args = parser.parse_args(argv)
  videos, rejects = load_inputs(args.input, os.path.join(args.out, 'converted'), args.salt)
  if not videos:
    raise SystemExit(f'no usable video in {args.input}; {len(rejects)} rejected')
  for r in saliency_for_videos(args.checkpoint, videos, args.out, args.max_videos):
    print(f"{r['study_id']} {r['video_id']} p={r['prob']:.3f} → {r['png']}, {r['gif']}")


if __name__ == '__main__':
  main()
