"""Grad-CAM CLI on raw inputs: `python -m echojax.saliency --checkpoint DIR --input VIDEO|DICOM|FOLDER
[--out OUT] [--max-videos N]` writes one figure per study (its highest-scoring videos: raw frame of peak
saliency beside the sector-masked map, one scale per study, caption with the score and threshold); studies
are read one at a time (see evaluation/gradcam.py)."""
from __future__ import annotations

import argparse
import os
from collections import defaultdict

import numpy as np

from echojax.evaluation import calibration, gradcam
from echojax.jobs import evaluate as evaluate_job
from echojax.jobs import model_init, saliency_split, tasks
from echojax.jobs.logging_lib import progress
from echojax.tools import raw_inputs


def saliency_for_inputs(checkpoint: str, input_path: str, out_dir: str, salt: str | None = None,
                        max_videos: int = 3, max_frames: int = 100) -> tuple[list[dict], list]:
  """→ (one result per study {'study_id', 'png', 'prob', ...}, rejects). Binary tasks only."""
  from echojax.data import pipeline
  cfg, model, variables = model_init.load_finetuned(checkpoint)
  task = evaluate_job.task_of(cfg, workdir=checkpoint)
  if task.kind != 'binary':
    raise ValueError(f'the saliency CLI explains binary models; this one is {task.kind} (its evaluation '
                     'report has a Grad-CAM gallery)')
  state = tasks.read_state(checkpoint)
  recal = calibration.Recalibrator.from_dict(state.get('calibration'))
  threshold = (state.get('threshold') or {}).get('study')
  entries, rejects = raw_inputs.discover(input_path, os.path.join(out_dir, 'converted'), salt)
  by_study = defaultdict(list)
  for e in entries:
    by_study[e.study_id].append(e)
  results = []
  for sid, study_entries in progress(by_study.items(), 'saliency', len(by_study), unit='study',
                                    interruptible=False):
    videos, probs = [], []
    for e in study_entries:
      frames = raw_inputs.read_frames(e, max_frames)
      if isinstance(frames, str):
        rejects.append((e.name, frames))
        continue
      clips = pipeline.eval_clips_for_video(frames, cfg.data)
      probs.append(saliency_split.video_prob(model, variables, clips))
      videos.append({'video_id': e.video_id, 'frames': frames, 'clips': clips, 'prob': probs[-1]})
      videos = sorted(videos, key=lambda v: -v['prob'])[:max_videos]   # keep only what is shown
    if not videos:
      continue
    prob = float(recal(np.mean(probs)))   # the study's output, as predict computes it
    text = saliency_split.prediction_text(prob, task, {'study': threshold}, saliency_split.output_kind(state))
    caption = f'Study {sid} · {task.name}: {text} over {len(probs)} video(s); top {len(videos)} shown'
    r = gradcam.study_saliency(model, variables, sid, videos, out_dir, clip_len=cfg.data.eval_clip_len,
                               caption=caption)
    results.append({**r, 'prob': prob, 'caption': caption})
  return results, rejects


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m echojax.saliency',
                                   description='Grad-CAM saliency of a fine-tuned echojax model.')
  raw_inputs.add_input_arguments(parser, 'video file, DICOM file, folder, or manifest CSV')
  parser.add_argument('--out', default='saliency_out')
  parser.add_argument('--max-videos', type=int, default=3, help='per study')
  args = parser.parse_args(argv)
  args.salt = raw_inputs.salt_of(args)
  results, rejects = saliency_for_inputs(args.checkpoint, args.input, args.out, args.salt, args.max_videos)
  if not results:
    raise SystemExit(f'no usable video in the input; {len(rejects)} rejected')
  for r in results:
    print(f"{r['caption']} → {r['png']}")


if __name__ == '__main__':
  main()
