"""Study-level prediction on raw inputs: `python -m echojax.predict --checkpoint DIR --input PATH [--out OUT]
[--saliency]`. PATH: a folder of DICOM files (converted and de-identified first), a folder of AVI/MP4
files (subfolders = studies, else `<study>_<n>.avi` names), or a manifest CSV (study_id, fpath)."""
from __future__ import annotations

import argparse
import csv
import os
from collections import defaultdict

import numpy as np

from echojax.jobs import model_init
from echojax.tools.raw_inputs import load_inputs


def predict(checkpoint: str, input_path: str, out_dir: str, salt: str | None = None) -> dict:
  import jax
  import jax.numpy as jnp
  from echojax.data import pipeline
  os.makedirs(out_dir, exist_ok=True)
  videos, rejects = load_inputs(input_path, out_dir, salt)
  with open(os.path.join(out_dir, 'rejected.csv'), 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['path', 'reason'])
    w.writerows(rejects)
  if not videos:
    raise SystemExit(f'no usable video found in {input_path}; {len(rejects)} rejected input(s) listed in '
                     f'{os.path.join(out_dir, "rejected.csv")}')
  cfg, model, variables = model_init.load_finetuned(checkpoint)
  probs_of = jax.jit(lambda v, x: jax.nn.sigmoid(model.apply(v, x, train=False)[:, 0]))
  video_rows, clips_of = [], {}
  for study, vid, frames in videos:
    clips = pipeline.eval_clips_for_video(frames, cfg.data)
    probs = np.asarray(probs_of(variables, jnp.asarray(clips)))
    video_rows.append({'study_id': study, 'video_id': vid, 'prob': float(probs.mean())})
  by_study = defaultdict(list)
  for r in video_rows:
    by_study[r['study_id']].append(r['prob'])
  study_rows = [{'study_id': s, 'n_videos': len(p), 'prob': float(np.mean(p))} for s, p in by_study.items()]
  _write_csv(os.path.join(out_dir, 'video_predictions.csv'), video_rows)
  _write_csv(os.path.join(out_dir, 'study_predictions.csv'), study_rows)
  return {'videos': video_rows, 'studies': study_rows, 'rejects': rejects, 'videos_raw': videos,
          'cfg': cfg, 'model': model, 'variables': variables}


def _write_csv(path, rows):
  with open(path, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m echojax.predict',
                                   description='Predict study-level probabilities with a fine-tuned model.')
  parser.add_argument('--checkpoint', required=True, help='fine-tuning workdir')
  parser.add_argument('--input', required=True, help='DICOM folder, video folder, or manifest CSV')
  parser.add_argument('--out', default='predictions')
  parser.add_argument('--saliency', action='store_true', help='also write Grad-CAM images per study')
  parser.add_argument('--salt', default=None, help='salt for DICOM ids (default $ECHOJAX_DICOM_SALT)')
  args = parser.parse_args(argv)
  result = predict(args.checkpoint, args.input, args.out, args.salt)
  for r in result['studies']:
    print(f"{r['study_id']}: p(severe AS)={r['prob']:.3f} over {r['n_videos']} video(s)")
  print(f'wrote {args.out}/study_predictions.csv, video_predictions.csv; {len(result["rejects"])} rejected')
  if args.saliency:
    from echojax.data import pipeline
    from echojax.evaluation import gradcam
    items = [(s, v, pipeline.eval_clips_for_video(f, result['cfg'].data)) for s, v, f in result['videos_raw']]
    gradcam.saliency_for_clips(result['model'], result['variables'], items, os.path.join(args.out, 'saliency'))


if __name__ == '__main__':
  main()
