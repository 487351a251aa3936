"""Evaluation of a fine-tuned network on dataset splits: the multi-clip inference (shared with the per-epoch
validation), clip → video → study aggregation by task kind, the decisions fitted on validation (binary:
optional Platt/isotonic recalibration, then the threshold; both stored in DIR/task_state.json for predict),
bootstrap CIs, the report files and report.html in DIR/eval/<split>/, and MODEL_CARD.md. Also the
`configs/evaluate.py` job on any checkpoint."""
from __future__ import annotations

import dataclasses
import functools
import os
import types

import jax
import numpy as np

from echojax.core import steps
from echojax.evaluation import calibration
from echojax.evaluation.reports import auroc_row  # noqa: F401  (re-exported for scripts)
from echojax.jobs import saliency_split, tasks
from echojax.jobs.logging_lib import log, progress


def predict_split(cfg, builder, model, variables, mesh, split: str, kind: str | None = None) -> dict:
  """Per-clip outputs ((V, N) logits, (V, N, K) for multiclass; kind defaults to cfg.task.kind) of every
  video of `split`, with labels and ids (all processes' rows)."""
  from echojax.core import inference
  from echojax.data import pipeline
  n_dev = mesh.size
  local_batch = max(cfg.eval.batch_size // n_dev, 1) * n_dev // jax.process_count()

  eval_step = steps.make_eval_step(model, task=kind or cfg.task.kind)
  # variables are an argument (not a closure) so XLA does not embed the weights as constants.
  logits_fn = jax.jit(lambda v, x: eval_step(types.SimpleNamespace(**v), {'video': x})['logits'])
  clip_logits = functools.partial(logits_fn, variables)  # (B, N, T, H, W, C) → (B, N[, K])

  # The eval pipeline gives every process the same number of (padded) batches.
  ds = pipeline.make_dataset(builder, split, 'eval', batch_size=local_batch, cfg=cfg.data,
                             label_key=cfg.task.label_key)
  total = -(-builder.info.splits[split].num_examples // (local_batch * jax.process_count()))
  return inference.run_inference(clip_logits, progress(pipeline.as_numpy(ds), f'{split} inference', total),
                                 mesh)


def task_of(cfg, builder=None, workdir: str | None = None) -> tasks.Task:
  """The run's Task from its `task` block (ClassLabel names from `builder`, standardisation from workdir)."""
  return tasks.make_task(kind=cfg.task.kind, label_key=cfg.task.label_key, name=cfg.task.name,
                         class_names=cfg.task.class_names, binarize_at=cfg.task.binarize_at, unit=cfg.task.unit,
                         builder=builder, workdir=workdir)


def labelled(pred: dict, task: tasks.Task | None = None) -> dict:
  """The rows with a known label, labels mapped by the task (binary 0/1 by default)."""
  task = task or tasks.Task(kind='binary', label_key='', name='')
  labels = task.labels(pred['label'])
  keep = task.valid(labels)
  return {'outputs': task.outputs_to_values(pred['outputs'][keep]), 'label': labels[keep],
          'study_id': np.asarray(pred['study_id'])[keep], 'video_id': np.asarray(pred['video_id'])[keep]}


def tables(p: dict, task: tasks.Task):
  """(VideoTable, StudyTable) of labelled predictions (logits → probabilities; regression: values)."""
  from echojax.evaluation import bootstrap
  return bootstrap.aggregate_predictions(p['outputs'], p['video_id'], p['study_id'], p['label'],
                                         outputs=task.aggregation_outputs())


def validation_metrics(pred: dict, pos_weight: float, task: tasks.Task | None = None) -> dict:
  """Per-epoch validation: the training loss over all clips (class-weighted BCE, CE, or MSE on the
  standardised target) and study-level AUROC (macro one-vs-rest for multiclass; NaN if one class) or MAE."""
  from scipy import special
  from sklearn.metrics import mean_absolute_error, roc_auc_score
  task = task or tasks.Task(kind='binary', label_key='', name='')
  p = labelled(pred, task)
  _, studies = tables(p, task)
  if task.kind == 'regression':
    z = (p['outputs'] - task.target_mean) / task.target_std
    y = (p['label'][:, None] - task.target_mean) / task.target_std
    return {'val_loss': float(np.mean((z - y) ** 2)),
            'val_mae': float(mean_absolute_error(studies.labels, studies.probs))}
  if task.kind == 'multiclass':
    logp = special.log_softmax(p['outputs'].astype(np.float64), axis=-1)
    loss = float(-np.mean(np.take_along_axis(logp, p['label'][:, None, None].repeat(logp.shape[1], 1), -1)))
    present = len(set(studies.labels.tolist())) == task.num_outputs
    auroc = (float(roc_auc_score(studies.labels, studies.probs, multi_class='ovr')) if present
             else float('nan'))
    return {'val_loss': loss, 'val_auroc': auroc}
  x, y = p['outputs'].astype(np.float64), p['label'][:, None].astype(np.float64)
  log_sig, log_one_minus = -np.logaddexp(0, -x), -np.logaddexp(0, x)
  loss = float(np.mean(-(pos_weight * y * log_sig + (1 - y) * log_one_minus)))
  auroc = (float(roc_auc_score(studies.labels, studies.probs)) if len(set(studies.labels.tolist())) == 2
           else float('nan'))
  return {'val_loss': loss, 'val_auroc': auroc}


def recalibrated(videos, studies, recal: calibration.Recalibrator):
  """Tables with recalibrated probabilities: a video's is recal(video prob); a study's is recal(mean of its
  videos' raw probs), the same rule `predict` applies."""
  return (dataclasses.replace(videos, probs=recal(videos.probs)),
          dataclasses.replace(studies, probs=recal(studies.probs)))


def fit_decisions(cfg, videos, studies, log_fn=log) -> dict:
  """On validation (binary): the recalibration (eval.calibration) and then the thresholds, on the
  recalibrated probabilities. Returns the task-state entries."""
  out = {'calibration': None, 'threshold': None, 'threshold_method': cfg.eval.threshold_method}
  try:
    recal = calibration.Recalibrator.fit(cfg.eval.calibration, studies.labels, studies.probs)
    out['calibration'] = recal.to_dict() if recal.calibrated else None
    videos, studies = recalibrated(videos, studies, recal)
  except ValueError as e:
    log_fn(f'no {cfg.eval.calibration} recalibration fitted on validation: {e}')
  from echojax.evaluation import bootstrap
  try:
    out['threshold'] = {level: bootstrap.choose_threshold(t.labels, t.probs, cfg.eval.threshold_method,
                                                          cfg.eval.target_sensitivity)
                        for level, t in (('study', studies), ('video', videos))}
  except ValueError as e:
    log_fn(f'no threshold chosen on validation: {e}')
  return out


def _data_summary(cfg, builder, split, pred, p, task, studies) -> dict:
  rows = {'Dataset': f'{builder.name}/{builder.builder_config.name}' if builder.builder_config else builder.name,
          'Split': split, 'Task': f'{task.name} ({task.kind}, label `{task.label_key}`)',
          'Studies': len(studies), 'Videos with a label': len(p['label']),
          'Videos without a label (left out)': len(pred['label']) - len(p['label']),
          'Clips per video': f'{cfg.data.eval_num_clips} × {cfg.data.eval_clip_len} frames, '
                             f'{cfg.data.image_size}² input'}
  if task.kind == 'binary':
    rows[f'Positive studies ({task.class_names[1]})'] = int(studies.labels.sum())
  elif task.kind == 'multiclass':
    counts = np.bincount(studies.labels, minlength=task.num_outputs)
    rows['Studies per class'] = ', '.join(f'{c}: {n}' for c, n in zip(task.class_names, counts))
  else:
    rows[f'Target {task.unit or task.label_key}'] = (f'mean {studies.labels.mean():.2f}, sd '
                                                     f'{studies.labels.std():.2f}, range '
                                                     f'{studies.labels.min():.1f}–{studies.labels.max():.1f}')
  return rows


def evaluate_splits(cfg, builder, model, variables, mesh, workdir: str, splits=None,
                    out_root: str | None = None) -> dict:
  """Reports for each split; decisions (recalibration, threshold) are fitted on the validation split
  (evaluated first), else taken from the run's task_state.json."""
  from echojax.evaluation import bootstrap, html_report, model_card
  task = task_of(cfg, builder, workdir)
  state = tasks.read_state(workdir)
  splits = list(splits or cfg.eval.splits)
  val = cfg.data.val_split
  if val in splits:
    splits.remove(val)
    splits.insert(0, val)
  out_root = out_root or os.path.join(workdir, 'eval')
  decisions = {k: state.get(k) for k in ('calibration', 'threshold', 'threshold_method')}
  summaries = {}
  for split in splits:
    if split not in builder.info.splits:
      log(f'split {split!r} not in {builder.name} (has {sorted(builder.info.splits)}); skipped')
      continue
    pred = predict_split(cfg, builder, model, variables, mesh, split, task.kind)
    p = labelled(pred, task)
    videos, studies = tables(p, task)
    if task.kind == 'binary':
      if split == val:
        decisions = fit_decisions(cfg, videos, studies)
        if jax.process_index() == 0:
          tasks.update_state(workdir, **decisions, decisions_split=val)
      recal = calibration.Recalibrator.from_dict(decisions.get('calibration'))
      videos, studies = recalibrated(videos, studies, recal)
    threshold = decisions.get('threshold') if task.kind == 'binary' else None
    summary = bootstrap.evaluate_task(
        task.kind, videos, studies, threshold=threshold, class_names=task.class_names,
        threshold_method=f"{decisions.get('threshold_method')} on {val}" if threshold else None,
        n_resamples=cfg.eval.bootstrap_resamples, ci_level=cfg.eval.ci_level, seed=cfg.eval.bootstrap_seed,
        bootstrap=cfg.eval.bootstrap)
    if task.kind == 'binary':
      method = (decisions.get('calibration') or {}).get('method')
      summary['calibration'] = f'{method}, fitted on {val}' if method else None
    out_dir = os.path.join(out_root, split)
    if jax.process_index() == 0:
      title = f'{task.name} — {split} split'
      figures = bootstrap.write_report(out_dir, (videos, studies), summary, title=title,
                                       class_names=task.class_names, unit=task.unit)
      if cfg.eval.html_report:
        gallery = saliency_split.report_gallery(cfg, builder, model, variables, split, studies, task,
                                                threshold, os.path.join(out_dir, 'saliency'),
                                                cfg.eval.report_saliency_studies, decisions)
        html_report.write_html_report(
            out_dir, summary, title, figures=figures, config=cfg.to_dict(), saliency=gallery,
            data_summary=_data_summary(cfg, builder, split, pred, p, task, studies),
            decision=saliency_split.decision_rows(decisions, task, val),
            provenance=saliency_split.provenance(workdir))
    log(f'{split}: {_headline(summary)} → {out_dir}')
    summaries[split] = summary
  if jax.process_index() == 0 and cfg.eval.html_report and summaries:
    card_dir = workdir if out_root == os.path.join(workdir, 'eval') else out_root
    model_card.write_model_card(card_dir, cfg.to_dict(), tasks.read_state(workdir) or tasks.state_of(task),
                                summaries)
  return summaries


def _headline(summary: dict) -> str:
  """One log line: study-level AUROC (macro for multiclass) or MAE with its CI."""
  name = {'binary': 'auroc', 'multiclass': 'macro_auroc', 'regression': 'mae'}[summary['task']]
  entry = summary['study']['metrics'][name]
  text = 'undefined' if entry['value'] is None else f"{entry['value']:.3f}"
  if entry.get('ci'):
    text += f" [{entry['ci'][0]:.3f}, {entry['ci'][1]:.3f}]"
  return f"study-level {name.upper().replace('_', ' ')} {text} over {summary['study']['n_studies']} studies"


def run(cfg, workdir: str) -> dict:
  """`configs/evaluate.py`: evaluate a fine-tuning run's best (else latest) weights on cfg.splits."""
  from echojax.core import parallel
  from echojax.jobs import model_init, startup
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
  variables = jax.device_put(variables, parallel.replicated(mesh))   # restored arrays may sit on one device
  builder = startup.prepare_dataset(run_cfg.data, log)
  splits = [s.strip() for s in cfg.splits.split(',') if s.strip()]
  return evaluate_splits(run_cfg, builder, model, variables, mesh, cfg.checkpoint, splits,
                         out_root=cfg.output or None)


saliency_for_split = saliency_split.saliency_for_split  # the demo's entry point
valve_localisation = saliency_split.valve_localisation
