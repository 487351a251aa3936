"""Grad-CAM on dataset splits: the per-study gallery of each HTML report, the demo's image, and the valve-box
localisation score (energy in the known aortic-valve box, pointing game) against random maps on
synthetic_echo. Also the provenance and decision rows the reports and predict show."""
from __future__ import annotations

import datetime
import json
import math
import os
from importlib import metadata

import jax
import jax.numpy as jnp
import numpy as np

from echojax.evaluation import calibration, gradcam
from echojax.jobs import tasks

MAX_VIDEOS_PER_STUDY = 3
_PACKAGES = ('echojax', 'jax', 'flax', 'numpy', 'scikit-learn', 'scipy', 'tensorflow', 'tensorflow-datasets')


def versions() -> dict:
  out = {}
  for name in _PACKAGES:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      out[name] = 'not installed'
  return out


def provenance(workdir: str) -> dict:
  """Best step (the weights evaluated, when early stopping kept them), package versions and the time."""
  info = {}
  stop = os.path.join(workdir, 'early_stopping.json')
  if os.path.exists(stop):
    with open(stop) as f:
      info['best step (weights used)'] = json.load(f).get('best_step')
  info.update({f'version {k}': v for k, v in versions().items()})
  info['time'] = datetime.datetime.now().isoformat(timespec='seconds')
  return info


def output_kind(decisions: dict) -> str:
  """'probability' when a recalibration was fitted on validation, else 'score' (class-weighted BCE)."""
  return 'probability' if (decisions or {}).get('calibration') else 'score'


def decision_rows(decisions: dict, task: tasks.Task, val_split: str) -> dict:
  if task.kind != 'binary':
    return {}
  method = ((decisions or {}).get('calibration') or {}).get('method', 'none')
  kind = output_kind(decisions)
  return {'Recalibration': f'{method}, fitted on the {val_split} study probabilities' if method != 'none'
          else 'none (eval.calibration=none)',
          'Model output': ('calibrated probability' if kind == 'probability' else
                           'score: trained with class-weighted BCE, not a calibrated probability'),
          'Threshold method': (decisions or {}).get('threshold_method')}


def _study_order(studies, task: tasks.Task) -> np.ndarray:
  probs = studies.probs
  score = probs if probs.ndim == 1 else probs[:, -1]     # multiclass: the most severe class
  return np.argsort(-score, kind='stable')


def prediction_text(study_prob, task: tasks.Task, threshold, kind: str) -> str:
  """A caption's prediction: the value, the class, or the score/probability with its decision."""
  if task.kind == 'regression':
    return f'predicted {float(study_prob):.1f} {task.unit}'.rstrip()
  if task.kind == 'multiclass':
    k = int(np.argmax(study_prob))
    return f'predicted {task.class_names[k]} (p = {float(study_prob[k]):.2f})'
  t = (threshold or {}).get('study')
  decision = '' if t is None else f', threshold {t:.3f} → {"positive" if study_prob >= t else "negative"}'
  return f'{kind} {float(study_prob):.3f}{decision}'


def _true_text(label, task: tasks.Task) -> str:
  return f'{float(label):.1f}' if task.kind == 'regression' else task.class_names[int(label)]


def report_gallery(cfg, builder, model, variables, split: str, studies, task: tasks.Task, threshold,
                   out_dir: str, n_studies: int, decisions: dict | None = None) -> list[dict]:
  """Grad-CAM figures of `n_studies` studies of the split: the highest- and lowest-scored halves."""
  from echojax.data import pipeline, study_videos
  if n_studies <= 0 or len(studies) == 0:
    return []
  order = _study_order(studies, task)
  picked = list(order[:math.ceil(n_studies / 2)]) + list(order[::-1][:n_studies // 2])
  picked = list(dict.fromkeys(int(i) for i in picked))
  ids = [str(studies.study_ids[i]) for i in picked]
  by_study: dict[str, list] = {}
  for v in study_videos.read_study_videos(builder, split, ids):
    if len(by_study.setdefault(v['study_id'], [])) < MAX_VIDEOS_PER_STUDY:
      by_study[v['study_id']].append({**v, 'clips': pipeline.eval_clips_for_video(v['frames'], cfg.data),
                                      'box': v.get('valve_box')})
  kind = output_kind(decisions if decisions is not None else {'calibration': None})
  out = []
  for i in picked:
    sid = str(studies.study_ids[i])
    if sid not in by_study:
      continue
    prob = studies.probs[i]
    caption = (f'Study {sid} · {task.name}: true {_true_text(studies.labels[i], task)} · '
               f'{prediction_text(prob, task, threshold, kind)} · {len(by_study[sid])} video(s) shown')
    index = int(np.argmax(prob)) if task.kind == 'multiclass' else 0
    result = gradcam.study_saliency(model, variables, sid, by_study[sid], out_dir,
                                    clip_len=cfg.data.eval_clip_len, output_index=index, caption=caption)
    out.append({**result, 'caption': caption})
  return out


def video_prob(model, variables, clips) -> float:
  """Mean sigmoid over a video's eval clips (binary models), as the evaluation aggregates it."""
  fn = _prob_fn(model)
  return float(np.mean(np.asarray(fn(variables, jnp.asarray(clips)))))


_PROB_FNS = {}


def _prob_fn(model):
  cached = _PROB_FNS.get(id(model))
  if cached is None or cached[0] is not model:
    cached = (model, jax.jit(lambda v, x: jax.nn.sigmoid(model.apply(v, x, train=False)[:, 0])))
    _PROB_FNS[id(model)] = cached
  return cached[1]


def saliency_for_split(checkpoint: str, split: str, out_dir: str, max_videos: int = 1,
                       scan_videos: int = 16) -> list[dict]:
  """Grad-CAM figures of the highest-probability studies among the first `scan_videos` videos of a split
  (the demo's image); one figure per study, `max_videos` studies."""
  from echojax.data import pipeline, study_videos
  from echojax.jobs import model_init, startup
  cfg, model, variables = model_init.load_finetuned(checkpoint)
  builder = startup.prepare_dataset(cfg.data, lambda *_: None)
  state = tasks.read_state(checkpoint)
  by_study: dict[str, list] = {}
  for v in study_videos.read_study_videos(builder, split, limit=scan_videos):
    clips = pipeline.eval_clips_for_video(v['frames'], cfg.data)
    by_study.setdefault(v['study_id'], []).append({**v, 'clips': clips, 'box': v.get('valve_box'),
                                                    'prob': video_prob(model, variables, clips)})
  ranked = sorted(by_study.items(), key=lambda kv: -np.mean([v['prob'] for v in kv[1]]))[:max_videos]
  results = []
  threshold = (state.get('threshold') or {}).get('study')
  recal = calibration.Recalibrator.from_dict(state.get('calibration'))
  for sid, vids in ranked:
    prob = float(recal(np.mean([v['prob'] for v in vids])))   # as evaluate and predict compute it
    shown = sorted(vids, key=lambda v: -v['prob'])[:MAX_VIDEOS_PER_STUDY]
    caption = (f'Study {sid} · {cfg.task.name}: {output_kind(state)} {prob:.3f} over {len(vids)} video(s)'
               + (f' · threshold {threshold:.3f}' if threshold is not None else ''))
    r = gradcam.study_saliency(model, variables, sid, shown, out_dir, clip_len=cfg.data.eval_clip_len,
                               caption=caption)
    results.append({**r, 'prob': prob, 'caption': caption})
  return results


def valve_localisation(checkpoint: str, split: str = 'test', max_videos: int = 32, n_random: int = 20,
                       positives_only: bool = True, seed: int = 0) -> dict:
  """Energy-in-valve-box and pointing-game scores of the Grad-CAM maps on a synthetic_echo split, against
  random layer4 maps (same upsampling) and the box's area share (a uniform map). Videos of severe-AS studies
  by default (the cue the positive logit should use). Needs the split's `valve_box` feature."""
  from echojax.data import pipeline, study_videos
  from echojax.jobs import model_init, startup
  cfg, model, variables = model_init.load_finetuned(checkpoint)
  builder = startup.prepare_dataset(cfg.data, lambda *_: None)
  if 'valve_box' not in builder.info.features:
    raise ValueError(f'{builder.name} has no valve_box feature: the valve-box score needs synthetic_echo')
  ids = None
  if positives_only:
    meta = pipeline.read_video_metadata(builder, split)
    ids = sorted({m['study_id'] for m in meta if int(m.get('severe_as', 0)) == 1})
  cams_of = gradcam.jitted_cams(model, 0)
  rows = []
  for v in study_videos.read_study_videos(builder, split, ids, limit=max_videos):
    clips = pipeline.eval_clips_for_video(v['frames'], cfg.data)
    _, cams = cams_of(variables, jnp.asarray(clips))
    frames = v['frames']
    cam = gradcam.video_cam(np.asarray(cams), len(frames), cfg.data.eval_clip_len, frames.shape[-1])
    mask = gradcam.sector_mask(frames)
    model_scores = gradcam.box_scores(cam, v['valve_box'], mask)
    random_scores = gradcam.random_box_scores(np.shape(cams), v['valve_box'], mask, len(frames),
                                              cfg.data.eval_clip_len, n_random, seed + len(rows))
    rows.append((model_scores, random_scores))
  if not rows:
    raise ValueError(f'no video of {split} to score (positives_only={positives_only})')
  mean = lambda which, key: float(np.nanmean([r[which][key] for r in rows]))
  return {'split': split, 'n_videos': len(rows), 'positives_only': positives_only,
          'energy_in_box': mean(0, 'energy'), 'energy_in_box_random': mean(1, 'energy'),
          'pointing_game': mean(0, 'hit'), 'pointing_game_random': mean(1, 'hit'),
          'box_area_share': mean(0, 'area')}
