"""Study-level prediction on raw inputs: `python -m echojax.predict --checkpoint DIR --input PATH [--out OUT]
[--salt S] [--key-map FILE] [--batch-size B] [--saliency]`. PATH: one DICOM or video file, a folder mixing
DICOM files (converted and de-identified first) and AVI/MP4 videos (subfolders = studies, else
`<study>_<n>.avi` names), or a manifest CSV (study_id, fpath). Videos are read, clipped and inferred a batch
at a time (memory bounded by the batch, not the input); study outputs are aggregated and recalibrated
exactly as `evaluate` does, and the decision uses the threshold chosen on validation."""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import types
from collections import defaultdict

import numpy as np

from echojax.core import steps
from echojax.evaluation import calibration, metrics
from echojax.jobs import evaluate as evaluate_job
from echojax.jobs import model_init, saliency_split, tasks
from echojax.jobs.logging_lib import progress
from echojax.tools import raw_inputs


class _BatchedInference:
  """Collects videos' eval clips and runs the eval step on fixed-size batches (one compilation; the last
  batch is padded); keeps only each video's clip outputs."""

  def __init__(self, model, variables, kind: str, batch_size: int):
    import jax
    eval_step = steps.make_eval_step(model, task=kind)
    self._fn = jax.jit(lambda v, x: eval_step(types.SimpleNamespace(**v), {'video': x})['logits'])
    self._variables, self._batch_size = variables, batch_size
    self._pending, self.rows = [], []

  def add(self, study_id: str, video_id: str, clips: np.ndarray) -> None:
    self._pending.append((study_id, video_id, clips))
    if len(self._pending) == self._batch_size:
      self.flush()

  def flush(self) -> None:
    if not self._pending:
      return
    clips = np.stack([c for _, _, c in self._pending])
    padded = np.concatenate([clips, np.zeros((self._batch_size - len(clips),) + clips.shape[1:], clips.dtype)])
    outputs = np.asarray(self._fn(self._variables, padded))[:len(clips)]
    self.rows.extend((s, v, o) for (s, v, _), o in zip(self._pending, outputs))
    self._pending = []


def _write_csv(path, rows, header=None):
  with open(path, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=header or list(rows[0]))
    w.writeheader()
    w.writerows(rows)


def _study_rows(task, state, studies) -> list[dict]:
  """study_id, n_videos, prob (+ decision, threshold, output) or the class probabilities / the value."""
  if task.kind == 'regression':
    return [{'study_id': s, 'n_videos': int(n), 'pred': float(p)}
            for s, n, p in zip(studies.study_ids, studies.num_videos, studies.probs)]
  if task.kind == 'multiclass':
    return [{'study_id': s, 'n_videos': int(n), 'prediction': task.class_names[int(np.argmax(p))],
             **{f'prob_{c}': float(x) for c, x in zip(task.class_names, p)}}
            for s, n, p in zip(studies.study_ids, studies.num_videos, studies.probs)]
  threshold = (state.get('threshold') or {}).get('study')
  kind = saliency_split.output_kind(state)
  return [{'study_id': s, 'n_videos': int(n), 'prob': float(p),
           'decision': '' if threshold is None else int(p >= threshold),
           'threshold': '' if threshold is None else threshold, 'output': kind}
          for s, n, p in zip(studies.study_ids, studies.num_videos, studies.probs)]


def join_key_map(study_rows: list[dict], key_map: str, out_path: str) -> str:
  """Writes the study predictions joined (on study_id) with a local key map: convert_dicom's --key-map
  file, or any CSV with a study_id column. Per-file columns are dropped; several values are joined by ';'."""
  with open(key_map, newline='') as f:
    rows = list(csv.DictReader(f))
  if not rows or 'study_id' not in rows[0]:
    raise ValueError(f'--key-map {key_map}: needs a study_id column')
  per_file = {'source_key', 'source_path', 'status', 'reason', 'video_id'}
  columns = [c for c in rows[0] if c != 'study_id' and c not in per_file]
  by_study = defaultdict(lambda: defaultdict(list))
  for r in rows:
    for c in columns:
      if r.get(c) and r[c] not in by_study[r['study_id']][c]:
        by_study[r['study_id']][c].append(r[c])
  joined = [{**row, **{c: ';'.join(by_study.get(row['study_id'], {}).get(c, [])) for c in columns}}
            for row in study_rows]
  _write_csv(out_path, joined, list(study_rows[0]) + columns)
  return out_path


def _identified_path(key_map: str, out_dir: str) -> str:
  path = os.path.splitext(os.path.abspath(key_map))[0] + '_predictions.csv'
  out = os.path.realpath(out_dir)
  if os.path.commonpath([os.path.realpath(path), out]) == out:
    raise ValueError('the key map holds PHI: keep it (and the identified predictions written next to it) '
                     'outside --out')
  return path


def predict(checkpoint: str, input_path: str, out_dir: str, salt: str | None = None, *,
            key_map: str | None = None, batch_size: int | None = None, max_frames: int = 100,
            saliency: bool = False) -> dict:
  """Predicts every study of `input_path`; writes study_predictions.csv, video_predictions.csv,
  rejected.csv and run_info.json to out_dir (and the key-map join beside the key map)."""
  from echojax.data import pipeline
  os.makedirs(out_dir, exist_ok=True)
  identified = _identified_path(key_map, out_dir) if key_map else None
  cfg, model, variables, (step, weights) = model_init.load_finetuned(checkpoint, with_step=True)
  state = tasks.read_state(checkpoint)
  task = evaluate_job.task_of(cfg, workdir=checkpoint)
  entries, rejects = raw_inputs.discover(input_path, out_dir, salt, key_map)
  runner = _BatchedInference(model, variables, task.kind, batch_size or cfg.eval.batch_size)
  for entry in progress(entries, 'predict', len(entries), unit='video', interruptible=False):
    # one decoded video alive at a time: read → clips → queue
    frames = raw_inputs.read_frames(entry, max_frames)
    if isinstance(frames, str):
      rejects.append((entry.name, frames))
      continue
    runner.add(entry.study_id, entry.video_id, pipeline.eval_clips_for_video(frames, cfg.data))
    del frames
  runner.flush()
  _write_csv(os.path.join(out_dir, 'rejected.csv'), [{'path': p, 'reason': r} for p, r in rejects],
             ['path', 'reason'])
  if not runner.rows:
    raise SystemExit(f'no usable video found in the input; {len(rejects)} rejected input(s) listed in '
                     f'{os.path.join(out_dir, "rejected.csv")}')
  study_ids, video_ids, outputs = zip(*runner.rows)
  outputs = task.outputs_to_values(np.stack(outputs))
  videos, studies = metrics.aggregate_predictions(outputs, video_ids, study_ids, np.zeros(len(outputs), int),
                                                  outputs=task.aggregation_outputs())
  if task.kind == 'binary':     # as evaluate: recal(video prob), recal(mean of the study's raw video probs)
    videos, studies = evaluate_job.recalibrated(
        videos, studies, calibration.Recalibrator.from_dict(state.get('calibration')))
  study_rows = _study_rows(task, state, studies)
  value = 'pred' if task.kind == 'regression' else 'prob'
  video_rows = [{'study_id': s, 'video_id': v, 'num_clips': int(n),
                 **({value: float(p)} if np.ndim(p) == 0 else
                    {f'prob_{c}': float(x) for c, x in zip(task.class_names, p)})}
                for s, v, p, n in zip(videos.study_ids, videos.video_ids, videos.probs, videos.num_clips)]
  _write_csv(os.path.join(out_dir, 'video_predictions.csv'), video_rows)
  _write_csv(os.path.join(out_dir, 'study_predictions.csv'), study_rows)
  run_info = {
      'checkpoint': os.path.abspath(checkpoint), 'weights': weights, 'step': step, 'task': tasks.state_of(task),
      'output': saliency_split.output_kind(state) if task.kind == 'binary' else task.kind,
      'calibration': state.get('calibration'), 'threshold': state.get('threshold'),
      'threshold_method': state.get('threshold_method'), 'decisions_split': state.get('decisions_split'),
      'n_studies': len(studies), 'n_videos': len(videos), 'n_rejected': len(rejects),
      'inputs': {k: sum(e.source == k for e in entries) for k in ('dicom', 'video', 'manifest')},
      'versions': saliency_split.versions(), 'time': datetime.datetime.now().isoformat(timespec='seconds')}
  with open(os.path.join(out_dir, 'run_info.json'), 'w') as f:
    json.dump(run_info, f, indent=1)
  if identified:
    join_key_map(study_rows, key_map, identified)
  result = {'videos': video_rows, 'studies': study_rows, 'rejects': rejects, 'run_info': run_info,
            'identified': identified}
  if saliency:
    result['saliency'] = _saliency(cfg, model, variables, task, state, entries, videos, studies,
                                   os.path.join(out_dir, 'saliency'), max_frames)
  return result


def _saliency(cfg, model, variables, task, state, entries, videos, studies, out_dir, max_frames) -> list:
  """Per study, the Grad-CAM figure of its (up to 3) highest-scoring videos, re-read one study at a time."""
  from echojax.data import pipeline
  from echojax.evaluation import gradcam
  by_video = {(e.study_id, e.video_id): e for e in entries}
  threshold = (state.get('threshold') or {}).get('study')
  out = []
  for sid, prob in zip(studies.study_ids, studies.probs):
    rows = sorted(((p if np.ndim(p) == 0 else p.max(), v) for s, v, p in
                   zip(videos.study_ids, videos.video_ids, videos.probs) if s == sid), reverse=True)
    shown = []
    for _, vid in rows[:saliency_split.MAX_VIDEOS_PER_STUDY]:
      frames = raw_inputs.read_frames(by_video[(sid, vid)], max_frames)
      shown.append({'video_id': vid, 'frames': frames, 'clips': pipeline.eval_clips_for_video(frames, cfg.data)})
    text = saliency_split.prediction_text(prob, task, {'study': threshold},
                                           saliency_split.output_kind(state))
    index = int(np.argmax(prob)) if task.kind == 'multiclass' else 0
    out.append(gradcam.study_saliency(model, variables, sid, shown, out_dir, clip_len=cfg.data.eval_clip_len,
                                      output_index=index, caption=f'Study {sid} · {task.name}: {text}'))
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m echojax.predict',
                                   description='Predict study-level outputs with a fine-tuned model.')
  raw_inputs.add_input_arguments(parser, 'DICOM/video file, a folder of them, or a manifest CSV')
  parser.add_argument('--out', default='predictions')
  parser.add_argument('--key-map', default=None,
                      help='local CSV mapping study_id to identifiers (convert_dicom --key-map; written by the '
                           'conversion here when absent). PHI: must lie outside --out; the identified '
                           'predictions are written beside it as <key-map>_predictions.csv')
  parser.add_argument('--batch-size', type=int, default=None, help='videos per inference batch')
  parser.add_argument('--max-frames', type=int, default=100, help='frames read per video')
  parser.add_argument('--saliency', action='store_true', help='also write a Grad-CAM figure per study')
  args = parser.parse_args(argv)
  args.salt = raw_inputs.salt_of(args)
  result = predict(args.checkpoint, args.input, args.out, args.salt, key_map=args.key_map,
                   batch_size=args.batch_size, max_frames=args.max_frames, saliency=args.saliency)
  info = result['run_info']
  for r in result['studies']:
    if 'prob' in r:
      decision = '' if r['decision'] == '' else f", decision {r['decision']} at threshold {r['threshold']:.3f}"
      print(f"{r['study_id']}: {info['task']['name']} {r['output']} {r['prob']:.3f}{decision} "
            f"over {r['n_videos']} video(s)")
    else:
      print(f"{r['study_id']}: " + ', '.join(f'{k}={v}' for k, v in r.items() if k != 'study_id'))
  if info['output'] == 'score':
    print('note: outputs are uncalibrated scores (class-weighted training); fine-tune with '
          '--config.eval.calibration=platt for probabilities')
  identified = f'; identified: {result["identified"]}' if result['identified'] else ''
  print(f'wrote {args.out}/study_predictions.csv, video_predictions.csv, run_info.json; '
        f'{len(result["rejects"])} rejected{identified}')


if __name__ == '__main__':
  main()
