"""Evaluation of a fine-tuned classifier on dataset splits: the multi-clip inference (shared with the
per-epoch validation), clip → video → study aggregation, threshold chosen on validation, bootstrap CIs and
the report files in DIR/eval/<split>/. Also the `configs/evaluate.py` job on any checkpoint."""
from __future__ import annotations

import functools
import os
import types

import jax
import numpy as np

from echojax.core import steps
from echojax.jobs.logging_lib import log
from echojax.evaluation.reports import auroc_row  # noqa: F401  (re-exported for scripts)


def predict_split(cfg, builder, model, variables, mesh, split: str) -> dict:
  """Per-clip logits (V, N) of every video of `split`, with labels and ids (all processes' rows)."""
  from echojax.core import inference
  from echojax.data import pipeline
  n_dev = mesh.size
  local_batch = max(cfg.eval.batch_size // n_dev, 1) * n_dev // jax.process_count()

  eval_step = steps.make_eval_step(model)
  # variables are an argument (not a closure) so XLA does not embed the weights as constants.
  logits_fn = jax.jit(lambda v, x: eval_step(types.SimpleNamespace(**v), {'video': x})['logits'])
  clip_logits = functools.partial(logits_fn, variables)  # (B, N, T, H, W, C) → (B, N)

  # The eval pipeline gives every process the same number of (padded) batches.
  ds = pipeline.make_dataset(builder, split, 'eval', batch_size=local_batch, cfg=cfg.data,
                             label_key=cfg.task.label_key)
  return inference.run_inference(clip_logits, pipeline.as_numpy(ds), mesh)


def labelled(pred: dict) -> dict:
  keep = np.asarray(pred['label']) >= 0
  return {'outputs': pred['outputs'][keep], 'label': np.asarray(pred['label'])[keep].astype(int),
          'study_id': np.asarray(pred['study_id'])[keep], 'video_id': np.asarray(pred['video_id'])[keep]}


def validation_metrics(pred: dict, pos_weight: float) -> dict:
  """Per-epoch validation: class-weighted BCE over all clips and study-level AUROC (NaN if one class)."""
  from sklearn.metrics import roc_auc_score
  from echojax.evaluation import bootstrap
  p = labelled(pred)
  x, y = p['outputs'].astype(np.float64), p['label'][:, None].astype(np.float64)
  log_sig, log_one_minus = -np.logaddexp(0, -x), -np.logaddexp(0, x)
  loss = float(np.mean(-(pos_weight * y * log_sig + (1 - y) * log_one_minus)))
  _, studies = bootstrap.aggregate_predictions(p['outputs'], p['video_id'], p['study_id'], p['label'])
  auroc = (float(roc_auc_score(studies.labels, studies.probs)) if len(set(studies.labels.tolist())) == 2
           else float('nan'))
  return {'val_loss': loss, 'val_auroc': auroc}


def evaluate_splits(cfg, builder, model, variables, mesh, workdir: str, splits=None,
                    out_root: str | None = None) -> dict:
  """Reports for each split; the threshold is chosen on the validation split (evaluated first)."""
  from echojax.evaluation import bootstrap
  splits = list(splits or cfg.eval.splits)
  val = cfg.data.val_split
  if val in splits:
    splits.remove(val)
    splits.insert(0, val)
  out_root = out_root or os.path.join(workdir, 'eval')
  threshold, summaries = None, {}
  for split in splits:
    if split not in builder.info.splits:
      log(f'split {split!r} not in {builder.name} (has {sorted(builder.info.splits)}); skipped')
      continue
    p = labelled(predict_split(cfg, builder, model, variables, mesh, split))
    videos, studies = bootstrap.aggregate_predictions(p['outputs'], p['video_id'], p['study_id'], p['label'])
    if split == val and threshold is None:
      try:
        threshold = {'study': bootstrap.choose_threshold(studies.labels, studies.probs,
                                                        cfg.eval.threshold_method,
                                                        cfg.eval.target_sensitivity),
                     'video': bootstrap.choose_threshold(videos.labels, videos.probs,
                                                        cfg.eval.threshold_method,
                                                        cfg.eval.target_sensitivity)}
      except ValueError as e:
        log(f'no threshold chosen on {split}: {e}')
    summary = bootstrap.evaluate_split(videos, studies, threshold=threshold,
                                      threshold_method=cfg.eval.threshold_method if threshold else None,
                                      n_resamples=cfg.eval.bootstrap_resamples, ci_level=cfg.eval.ci_level,
                                      seed=cfg.eval.bootstrap_seed)
    if jax.process_index() == 0:
      bootstrap.write_report(os.path.join(out_root, split), (videos, studies), summary,
                            title=f'{cfg.task.label_key} — {split} split')
    row = auroc_row(summary)
    auc = 'undefined' if row['auroc'] is None else f'{row["auroc"]:.3f} [{row["ci_lo"]:.3f}, {row["ci_hi"]:.3f}]'
    log(f'{split}: study-level AUROC {auc} over {row["n_studies"]} studies ({row["n_pos"]} positive) '
        f'→ {os.path.join(out_root, split)}')
    summaries[split] = summary
  return summaries


def run(cfg, workdir: str) -> dict:
  """`configs/evaluate.py`: evaluate a fine-tuning run's best (else latest) weights on cfg.splits."""
  from echojax.jobs import model_init, startup
  from echojax.core import parallel
  if not cfg.checkpoint:
    raise ValueError('set --config.checkpoint=DIR (a fine-tuning workdir)')
  if not os.path.isdir(cfg.checkpoint):
    raise FileNotFoundError(f'checkpoint directory not found: {cfg.checkpoint}')
  run_cfg, model, variables = model_init.load_finetuned(cfg.checkpoint)
  run_cfg = run_cfg.unlock() if hasattr(run_cfg, 'unlock') else run_cfg
  if cfg.data_dir:
    run_cfg.data.data_dir = cfg.data_dir
  run_cfg.eval.bootstrap_resamples = cfg.bootstrap_resamples
  run_cfg.eval.ci_level = cfg.ci_level
  run_cfg.data.auto_build = False
  mesh = parallel.make_mesh()
  builder = startup.prepare_dataset(run_cfg.data, log)
  splits = [s.strip() for s in cfg.splits.split(',') if s.strip()]
  return evaluate_splits(run_cfg, builder, model, variables, mesh, cfg.checkpoint, splits,
                         out_root=cfg.output or None)


def saliency_for_split(checkpoint: str, split: str, out_dir: str, max_videos: int = 1) -> list[dict]:
  """Grad-CAM of the highest-probability videos of a dataset split (the demo's image)."""
  from echojax.data import pipeline
  from echojax.evaluation import gradcam
  from echojax.jobs import model_init, startup
  cfg, model, variables = model_init.load_finetuned(checkpoint)
  builder = startup.prepare_dataset(cfg.data, lambda *_: None)
  ds = builder.as_dataset(split=split).take(8)
  items = [(ex['study_id'].decode(), ex['video_id'].decode(),
            pipeline.eval_clips_for_video(ex['video'][..., 0], cfg.data)) for ex in pipeline.as_numpy(ds)]
  results = gradcam.saliency_for_clips(model, variables, items, out_dir, max_videos=1)
  return sorted(results, key=lambda r: -r['prob'])[:max_videos]
