"""Clip → video → study aggregation of model outputs, binary point metrics, decision thresholds, and the same
binary metrics vectorised over bootstrap resamples (weighted counts, rank-based AUROC/AP).

Every point metric is scikit-learn's own. Undefined values (a split with one class, no predicted positives) are
NaN with a reason string rather than an exception or a silent 0. Study-level bootstrap CIs live in `bootstrap`.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Mapping, Sequence

import numpy as np
from scipy import special
from sklearn import metrics as skm

THRESHOLD_FREE_METRICS = ('auroc', 'average_precision')
THRESHOLD_METRICS = ('accuracy', 'balanced_accuracy', 'mcc', 'precision', 'npv', 'sensitivity',
                     'specificity', 'f1')
THRESHOLD_METHODS = ('max_f1', 'sensitivity', 'youden')


@dataclasses.dataclass(frozen=True)
class VideoTable:
  """One row per video; `probs` is the mean of its unmasked clips' sigmoids ((n,), or (n, K) softmaxes, or
  regression values with float labels)."""
  video_ids: np.ndarray
  study_ids: np.ndarray
  labels: np.ndarray
  probs: np.ndarray
  num_clips: np.ndarray

  def __len__(self) -> int:
    return len(self.video_ids)


@dataclasses.dataclass(frozen=True)
class StudyTable:
  """One row per study; `probs` is the unweighted mean over the study's video probabilities."""
  study_ids: np.ndarray
  labels: np.ndarray
  probs: np.ndarray
  num_videos: np.ndarray

  def __len__(self) -> int:
    return len(self.study_ids)


def _as_str_ids(values, name: str, n_rows: int) -> np.ndarray:
  # TFDS hands ids back as bytes; CSVs and JSON want text.
  ids = [v.decode('utf-8') if isinstance(v, bytes) else str(v) for v in np.asarray(values).reshape(-1)]
  if len(ids) != n_rows:
    raise ValueError(f'{name}: {len(ids)} ids for {n_rows} rows of clip outputs')
  return np.asarray(ids, dtype=str)


def _first_appearance_groups(ids: np.ndarray):
  """(group ids in first-appearance order, row → group index, first row of each group)."""
  uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
  order = np.argsort(first, kind='stable')
  rank = np.empty_like(order)
  rank[order] = np.arange(len(order))
  return uniq[order], rank[inverse.reshape(-1)], first[order]


def _check_constant_within(group, first, values, group_ids, what: str, value_name: str) -> None:
  disagree = values != values[first][group]
  if disagree.any():
    g = group[np.flatnonzero(disagree)[0]]
    seen = sorted({str(v) for v in values[group == g]})
    raise ValueError(f'{what} {str(group_ids[g])!r} has conflicting {value_name}: {", ".join(seen)}')


def _clip_probabilities(scores: np.ndarray, outputs: str) -> np.ndarray:
  if outputs == 'logits':
    return special.expit(scores) if scores.ndim == 2 else special.softmax(scores, axis=-1)
  if outputs in ('probs', 'values'):
    return scores
  raise ValueError(f"outputs must be 'logits', 'probs' or 'values', got {outputs!r}")


def aggregate_predictions(clip_outputs, video_ids: Sequence, study_ids: Sequence, labels: Sequence,
                          clip_mask=None, *, outputs: str = 'logits') -> tuple[VideoTable, StudyTable]:
  """Averages clip outputs to video and study probabilities (the paper's evaluation protocol).

  Args:
    clip_outputs: (V, N) binary logits (or probabilities with outputs='probs') for N clips of each row;
      (V,) means one clip per row; (V, N, K) is multi-class (softmax, then mean). Rows sharing a video id
      are pooled, so flat per-clip rows work too.
    video_ids, study_ids, labels: one per row (labels 0/1, or 0..K-1 when multi-class).
    clip_mask: optional (V, N) bool; False clips are excluded from the mean (e.g. batch padding).
    outputs: 'logits', 'probs', or 'values' (regression: (V, N) predictions, float labels, plain means).
  Returns:
    (VideoTable, StudyTable), rows in order of first appearance.
  Raises:
    ValueError naming the video/study for: conflicting labels or studies, a video without any unmasked
    clip, non-finite or out-of-range outputs, labels outside the classes.
  """
  scores = np.asarray(clip_outputs, dtype=np.float64)
  if scores.ndim == 1:
    scores = scores[:, None]
  if scores.ndim not in (2, 3) or scores.shape[0] == 0 or scores.shape[1] == 0:
    raise ValueError(f'clip_outputs must be (V, N) or (V, N, K) with V, N > 0, got shape {scores.shape}')
  n_rows = scores.shape[0]
  row_videos = _as_str_ids(video_ids, 'video_ids', n_rows)
  row_studies = _as_str_ids(study_ids, 'study_ids', n_rows)
  row_labels = np.asarray(labels).reshape(-1)
  if row_labels.shape[0] != n_rows:
    raise ValueError(f'labels: {row_labels.shape[0]} labels for {n_rows} rows of clip outputs')
  mask = np.ones(scores.shape[:2], bool) if clip_mask is None else np.asarray(clip_mask, dtype=bool)
  if mask.ndim == 1:
    mask = mask[:, None]
  if mask.shape != scores.shape[:2]:
    raise ValueError(f'clip_mask shape {mask.shape} != clip_outputs shape {scores.shape[:2]}')

  probs = _clip_probabilities(scores, outputs)
  regression = outputs == 'values'
  if regression and probs.ndim != 2:
    raise ValueError(f'regression outputs must be (V, N) values, got shape {probs.shape}')
  num_classes = 2 if probs.ndim == 2 else probs.shape[-1]
  clip_valid = np.isfinite(probs) & (regression | ((probs >= 0) & (probs <= 1)))
  if probs.ndim == 3:
    clip_valid = clip_valid.all(-1) & (np.abs(probs.sum(-1) - 1) < 1e-4)
  bad_rows = np.flatnonzero((mask & ~clip_valid).any(1))
  if bad_rows.size:
    raise ValueError(f'clip_outputs: non-finite or invalid {outputs} for video(s) '
                     f'{sorted(set(row_videos[bad_rows].tolist()))[:5]}')
  if regression:
    row_labels = row_labels.astype(np.float64)
    label_ok = np.isfinite(row_labels)
  else:
    label_ok = np.isin(row_labels, np.arange(num_classes))
  if not label_ok.all():
    row = np.flatnonzero(~label_ok)[0]
    raise ValueError(f'labels: video {str(row_videos[row])!r} has label {row_labels[row]}; expected '
                     + ('a finite target' if regression else f'0..{num_classes - 1}')
                     + ' (drop unknown labels such as -1 before evaluating)')
  if not regression:
    row_labels = row_labels.astype(np.int64)

  vids, video_of_row, first_row = _first_appearance_groups(row_videos)
  _check_constant_within(video_of_row, first_row, row_studies, vids, 'video', 'study ids')
  _check_constant_within(video_of_row, first_row, row_labels, vids, 'video', 'labels')
  num_clips = np.bincount(video_of_row, weights=mask.sum(1), minlength=len(vids)).astype(np.int64)
  if (num_clips == 0).any():
    raise ValueError(f'video(s) {vids[num_clips == 0][:5].tolist()} have no unmasked clip '
                     '(remove padding rows before aggregating)')
  masked = np.where(mask[..., None] if probs.ndim == 3 else mask, probs, 0.0).sum(1)
  sums = np.zeros((len(vids),) + masked.shape[1:])
  np.add.at(sums, video_of_row, masked)
  video_table = VideoTable(video_ids=vids, study_ids=row_studies[first_row], labels=row_labels[first_row],
                           probs=sums / (num_clips if sums.ndim == 1 else num_clips[:, None]),
                           num_clips=num_clips)
  return video_table, aggregate_videos(video_table)


def aggregate_videos(video_table: VideoTable) -> StudyTable:
  """Study probability = unweighted mean of its videos' probabilities; labels must agree within a study."""
  sids, study_of_video, first = _first_appearance_groups(video_table.study_ids)
  _check_constant_within(study_of_video, first, video_table.labels, sids, 'study', 'labels')
  num_videos = np.bincount(study_of_video, minlength=len(sids))
  sums = np.zeros((len(sids),) + video_table.probs.shape[1:])
  np.add.at(sums, study_of_video, video_table.probs)
  probs = sums / (num_videos if sums.ndim == 1 else num_videos[:, None])
  return StudyTable(study_ids=sids, labels=video_table.labels[first], probs=probs, num_videos=num_videos)


def _binary_arrays(labels, probs, name: str = 'probs'):
  labels = np.asarray(labels).reshape(-1)
  probs = np.asarray(probs, dtype=np.float64)
  if probs.ndim != 1 or probs.shape != labels.shape:
    raise ValueError(f'{name}: expected 1-D binary probabilities matching labels {labels.shape}, '
                     f'got {probs.shape} (multi-class evaluation is not supported)')
  if not np.isin(labels, (0, 1)).all():
    raise ValueError(f'labels must be 0/1, got values {sorted(set(labels.tolist()) - {0, 1})[:5]}')
  if not np.isfinite(probs).all():
    raise ValueError(f'{name}: {int((~np.isfinite(probs)).sum())} non-finite values')
  return labels.astype(np.int64), probs


def binary_metrics(labels, probs, threshold: float = 0.5, *, sample_weight=None,
                   include_threshold_free: bool = True) -> tuple[dict[str, float], dict[str, str]]:
  """scikit-learn metrics of `probs >= threshold` plus AUROC/AP.

  Returns (values, reasons): values[name] is a float, NaN when undefined; reasons[name] says why.
  MCC follows scikit-learn's convention (0 when a confusion-matrix margin is empty).
  """
  labels, probs = _binary_arrays(labels, probs)
  preds = (probs >= threshold).astype(np.int64)
  tn, fp, fn, tp = skm.confusion_matrix(labels, preds, labels=[0, 1], sample_weight=sample_weight).ravel()
  values, reasons = {}, {}
  if include_threshold_free:
    if tp + fn == 0 or tn + fp == 0:
      reason = f'only one class in this split (positives={tp + fn:g}, negatives={tn + fp:g})'
      values.update(auroc=math.nan, average_precision=math.nan)
      reasons.update(auroc=reason, average_precision=reason)
    else:
      values['auroc'] = skm.roc_auc_score(labels, probs, sample_weight=sample_weight)
      values['average_precision'] = skm.average_precision_score(labels, probs, sample_weight=sample_weight)
  nan = np.nan
  with warnings.catch_warnings():
    # One-class splits: sklearn warns that y_pred has a class absent from y_true; the value is still defined.
    warnings.simplefilter('ignore', UserWarning)
    values['accuracy'] = skm.accuracy_score(labels, preds, sample_weight=sample_weight)
    values['balanced_accuracy'] = skm.balanced_accuracy_score(labels, preds, sample_weight=sample_weight)
  values['mcc'] = skm.matthews_corrcoef(labels, preds, sample_weight=sample_weight)
  values['precision'] = skm.precision_score(labels, preds, sample_weight=sample_weight, zero_division=nan)
  # NPV is the precision of the negative class.
  values['npv'] = skm.precision_score(labels, preds, pos_label=0, sample_weight=sample_weight,
                                      zero_division=nan)
  values['sensitivity'] = skm.recall_score(labels, preds, sample_weight=sample_weight, zero_division=nan)
  values['specificity'] = tn / (tn + fp) if tn + fp > 0 else nan
  values['f1'] = skm.f1_score(labels, preds, sample_weight=sample_weight, zero_division=nan)
  if tp + fp == 0:
    reasons['precision'] = f'no predicted positives at threshold {threshold:g}'
  if tn + fn == 0:
    reasons['npv'] = f'no predicted negatives at threshold {threshold:g}'
  if tp + fn == 0:
    reasons['sensitivity'] = 'no positives in this split'
  if tn + fp == 0:
    reasons['specificity'] = 'no negatives in this split'
  if tp + fp + fn == 0:
    reasons['f1'] = f'no positives and no predicted positives at threshold {threshold:g}'
  return {k: float(v) for k, v in values.items()}, reasons


def choose_threshold(labels, probs, method: str = 'max_f1', target_sensitivity: float = 0.9) -> float:
  """Picks a decision threshold (predict positive when prob >= threshold) on validation predictions.

  'max_f1': the threshold maximising F1; 'sensitivity': the highest threshold whose sensitivity reaches
  `target_sensitivity` (so the most specific one that does); 'youden': maximises sensitivity + specificity.
  """
  labels, probs = _binary_arrays(labels, probs)
  if labels.min() == labels.max():
    raise ValueError(f'choose_threshold needs both classes; all {len(labels)} labels are {labels[0]}')
  if method == 'max_f1':
    precision, recall, thresholds = skm.precision_recall_curve(labels, probs)
    precision, recall = precision[:-1], recall[:-1]  # the last point (recall 0) has no threshold
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(thresholds[int(np.argmax(f1))])
  fpr, tpr, thresholds = skm.roc_curve(labels, probs, drop_intermediate=False)
  if method == 'sensitivity':
    if not 0 < target_sensitivity <= 1:
      raise ValueError(f'target_sensitivity must be in (0, 1], got {target_sensitivity}')
    return float(thresholds[int(np.argmax(tpr >= target_sensitivity))])
  if method == 'youden':
    return float(thresholds[1 + int(np.argmax((tpr - fpr)[1:]))])  # index 0 is the +inf threshold
  raise ValueError(f'method must be one of {THRESHOLD_METHODS}, got {method!r}')


# ------------------------------------------------------------ the same metrics over bootstrap resamples
@dataclasses.dataclass(frozen=True)
class _SortedRows:
  """One level's rows sorted by probability, with the study (resampling unit) each row belongs to."""
  units: np.ndarray
  positive: np.ndarray
  probs: np.ndarray
  tie_starts: np.ndarray


def _sorted_rows(labels, probs, units) -> _SortedRows:
  order = np.argsort(probs, kind='stable')
  probs = np.asarray(probs, dtype=np.float64)[order]
  tie_starts = np.flatnonzero(np.r_[True, probs[1:] != probs[:-1]])
  return _SortedRows(units=np.asarray(units)[order], positive=np.asarray(labels)[order] == 1, probs=probs,
                     tie_starts=tie_starts)


def resample_weights(study_indices: np.ndarray, n_studies: int) -> np.ndarray:
  """(B, n) resampled study indices → (B, n_studies) float counts of each study in each resample."""
  study_indices = np.atleast_2d(study_indices)
  n_resamples = study_indices.shape[0]
  flat = (study_indices + n_studies * np.arange(n_resamples)[:, None]).ravel()
  return np.bincount(flat, minlength=n_resamples * n_studies).reshape(n_resamples, n_studies).astype(float)


def _metric_key(metric: str, threshold_name: str) -> str:
  return metric if metric in THRESHOLD_FREE_METRICS else f'{metric}@{threshold_name}'


def _metrics_of_resamples(rows: _SortedRows, study_weights: np.ndarray,
                          thresholds: Mapping[str, float]) -> dict[str, np.ndarray]:
  weights = study_weights[:, rows.units]  # (B, rows): a row counts as often as its study was drawn
  pos_w = weights * rows.positive
  neg_w = weights - pos_w
  n_pos, n_neg = pos_w.sum(1), neg_w.sum(1)
  pos_tied = np.add.reduceat(pos_w, rows.tie_starts, axis=1)
  neg_tied = np.add.reduceat(neg_w, rows.tie_starts, axis=1)
  out = {}
  with np.errstate(divide='ignore', invalid='ignore'):
    # Mann–Whitney: each positive beats the negatives below it and ties half of those level with it.
    neg_below = np.cumsum(neg_tied, axis=1) - neg_tied
    out['auroc'] = (pos_tied * (neg_below + 0.5 * neg_tied)).sum(1) / (n_pos * n_neg)
    # AP = Σ_k (R_k − R_{k−1}) P_k over distinct thresholds, highest first (sklearn's definition).
    pos_desc, neg_desc = pos_tied[:, ::-1], neg_tied[:, ::-1]
    tp_at, fp_at = np.cumsum(pos_desc, axis=1), np.cumsum(neg_desc, axis=1)
    precision_at = np.nan_to_num(tp_at / (tp_at + fp_at))  # 0/0 only where the recall step is 0 too
    out['average_precision'] = (pos_desc * precision_at).sum(1) / n_pos
    for name, threshold in thresholds.items():
      predicted = rows.probs >= threshold
      tp, fp = pos_w @ predicted, neg_w @ predicted
      fn, tn = n_pos - tp, n_neg - fp
      total = n_pos + n_neg
      sensitivity, specificity = tp / n_pos, tn / n_neg
      mcc_denominator = (tp + fp) * n_pos * n_neg * (tn + fn)
      mcc = (tp * tn - fp * fn) / np.sqrt(mcc_denominator)
      values = {
          'accuracy': (tp + tn) / total,
          # sklearn averages the recalls of the classes present, so one-class resamples get that recall.
          'balanced_accuracy': np.where(np.isnan(sensitivity), specificity,
                                        np.where(np.isnan(specificity), sensitivity,
                                                 (sensitivity + specificity) / 2)),
          'mcc': np.where(mcc_denominator == 0, 0.0, mcc),  # sklearn's convention for an empty margin
          'precision': tp / (tp + fp),
          'npv': tn / (tn + fn),
          'sensitivity': sensitivity,
          'specificity': specificity,
          'f1': 2 * tp / (2 * tp + fp + fn),
      }
      out.update({_metric_key(metric, name): value for metric, value in values.items()})
  return out


def bootstrap_metric_values(labels, probs, study_weights, thresholds: Mapping[str, float],
                            units=None) -> dict[str, np.ndarray]:
  """Every metric for many resamples at once, NaN where undefined.

  Args:
    labels, probs: per row (study or video).
    study_weights: (B, n_studies) times each study is drawn (`resample_weights`).
    thresholds: name → threshold; thresholded metrics come back as f'{metric}@{name}'.
    units: study index of each row; None when rows are studies.
  """
  units = np.arange(len(labels)) if units is None else units
  return _metrics_of_resamples(_sorted_rows(labels, probs, units), np.atleast_2d(study_weights), thresholds)
