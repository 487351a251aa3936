"""Study-level prediction on raw inputs: `python -m echojax.predict --checkpoint DIR --input PATH [--out OUT]
[--saliency]`. PATH: a folder of DICOM files (converted and de-identified first), a folder of AVI/MP4
files (subfolders = studies, else `<study>_<n>.avi` names), or a manifest CSV (study_id, fpath)."""
from __future__ import annotations

import argparse
import csv
import os
from collections import defaultdict

import numpy as np

VIDEO_EXTS = ('.avi', '.mp4', '.mov', '.mkv')


def _is_dicom(path: str) -> bool:
  try:
    with open(path, 'rb') as f:
      head = f.read(132)
    return len(head) == 132 and head[128:132] == b'DICM'
  except OSError:
    return False


def _study_of(path: str, root: str) -> str:
  rel = os.path.relpath(path, root)
  parts = rel.split(os.sep)
  if len(parts) > 1:
    return parts[0]
  stem = os.path.splitext(parts[0])[0]
  return stem.rsplit('_', 1)[0] if '_' in stem else stem


def _read_videos(entries, rejects):
  from echojax.data import video_io
  videos = []
  for study, vid, path in entries:
    try:
      frames, _ = video_io.read_video(path)
      videos.append((study, vid, frames))
    except video_io.VideoReadError as e:
      rejects.append((path, e.reason))
    except Exception as e:  # one bad file never stops a prediction run
      rejects.append((path, f'{type(e).__name__}: {e}'))
  return videos


def load_inputs(path: str, work_dir: str, salt: str | None = None):
  """→ (videos [(study_id, video_id, uint8 (T,H,W))], rejects [(path, reason)]). DICOM inputs are converted
  (masked, de-identified) first; their ids are salted hashes (salt: argument or $ECHOJAX_DICOM_SALT)."""
  rejects: list[tuple[str, str]] = []
  if not os.path.exists(path):
    raise FileNotFoundError(f'input not found: {path}')
  if os.path.isfile(path) and path.lower().endswith('.csv'):
    rows = list(csv.DictReader(open(path)))
    missing = {'study_id', 'fpath'} - set(rows[0] if rows else [])
    if missing:
      raise ValueError(f'{path}: missing column(s) {sorted(missing)}')
    base = os.path.dirname(os.path.abspath(path))
    entries = [(r['study_id'], r.get('video_id') or os.path.splitext(os.path.basename(r['fpath']))[0],
                r['fpath'] if os.path.isabs(r['fpath']) else os.path.join(base, r['fpath'])) for r in rows]
    return _read_videos(entries, rejects), rejects
  if os.path.isfile(path):
    files, root = [path], os.path.dirname(os.path.abspath(path))
  else:
    root = path
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
  dicoms = [f for f in files if _is_dicom(f) or f.lower().endswith('.dcm')]
  if dicoms:
    from echojax.data import convert_dicom
    salt = salt or os.environ.get('ECHOJAX_DICOM_SALT')
    if not salt:
      raise ValueError('DICOM input needs a salt for the de-identified ids: pass --salt or set '
                       'ECHOJAX_DICOM_SALT (keep it to map predictions back to studies)')
    out = os.path.join(work_dir, 'dicom_converted')
    convert_dicom.convert_dicom_folder(root, out, salt=salt, progress=False)
    entries = [(m['study_id'], m['video_id'], m['path']) for m in convert_dicom.read_manifest(out)]
    rejects += [(r['path'], r['reason']) for r in convert_dicom.read_rejects(out)]
    rejects += [(f, 'not a video or DICOM file') for f in files
                if f not in dicoms and not f.lower().endswith(VIDEO_EXTS)]
    return _read_videos(entries, rejects), rejects
  vids = [f for f in files if f.lower().endswith(VIDEO_EXTS)]
  rejects += [(f, 'not a video or DICOM file') for f in files if f not in vids]
  entries = [(_study_of(f, root), os.path.splitext(os.path.basename(f))[0], f) for f in vids]
  return _read_videos(entries, rejects), rejects


def predict(checkpoint: str, input_path: str, out_dir: str, salt: str | None = None) -> dict:
  import jax
  import jax.numpy as jnp
  from echojax import builders, clips as clip_lib
  os.makedirs(out_dir, exist_ok=True)
  videos, rejects = load_inputs(input_path, out_dir, salt)
  with open(os.path.join(out_dir, 'rejected.csv'), 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(['path', 'reason'])
    w.writerows(rejects)
  if not videos:
    raise SystemExit(f'no usable video found in {input_path}; {len(rejects)} rejected input(s) listed in '
                     f'{os.path.join(out_dir, "rejected.csv")}')
  cfg, model, variables = builders.load_finetuned(checkpoint)
  size, clip_len, n_clips = cfg.data.image_size, cfg.data.eval_clip_len, cfg.data.eval_num_clips
  probs_of = jax.jit(lambda v, x: jax.nn.sigmoid(model.apply(v, x, train=False)[:, 0]))
  prob_fn = lambda x: probs_of(variables, x)
  video_rows = []
  for study, vid, frames in videos:
    clips = clip_lib.eval_clips(frames, clip_len, n_clips, size)
    probs = np.asarray(prob_fn(jnp.asarray(clips)))
    video_rows.append({'study_id': study, 'video_id': vid, 'prob': float(probs.mean())})
  by_study = defaultdict(list)
  for r in video_rows:
    by_study[r['study_id']].append(r['prob'])
  study_rows = [{'study_id': s, 'n_videos': len(p), 'prob': float(np.mean(p))} for s, p in by_study.items()]
  _write_csv(os.path.join(out_dir, 'video_predictions.csv'), video_rows)
  _write_csv(os.path.join(out_dir, 'study_predictions.csv'), study_rows)
  return {'videos': video_rows, 'studies': study_rows, 'rejects': rejects, 'videos_raw': videos}


def _write_csv(path, rows):
  with open(path, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def main(argv=None):
  parser = argparse.ArgumentParser(description='Predict study-level probabilities with a fine-tuned model.')
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
    from echojax import saliency
    saliency.saliency_for_videos(args.checkpoint, result['videos_raw'], os.path.join(args.out, 'saliency'))


if __name__ == '__main__':
  main()
