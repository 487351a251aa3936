"""Evaluation of a split: study-level bootstrap confidence intervals around scikit-learn point metrics.

STUDIES are resampled with replacement (video-level metrics take whole studies, so a study's videos stay
together); the interval is the percentile interval, 2.5th–97.5th percentile by default. The seed paper's
companion code took the 5th and 95th percentiles of 10,000 resamples and called that a "95 % CI": it is a
90 % interval, reproduced here by `ci_level=0.90`. Resampling is `scipy.stats.bootstrap`; each batch of
resamples is scored at once (weighted confusion counts, rank-based AUROC/AP), equal to scikit-learn with
`sample_weight` (tested). Resamples with one class are skipped for every metric and counted.
Also re-exports the aggregation/metric (`echojax.metrics`) and report (`echojax.reports`) API.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Mapping, Optional, Union

import numpy as np
from scipy import stats

from echojax.metrics import (THRESHOLD_FREE_METRICS, THRESHOLD_METHODS, THRESHOLD_METRICS, StudyTable,
                             VideoTable, aggregate_predictions, aggregate_videos, binary_metrics,
                             choose_threshold)
from echojax.reports import auroc_row, format_auroc_table, write_report

__all__ = [
    'THRESHOLD_FREE_METRICS', 'THRESHOLD_METHODS', 'THRESHOLD_METRICS', 'StudyTable', 'VideoTable',
    'aggregate_predictions', 'aggregate_videos', 'auroc_row', 'binary_metrics', 'bootstrap_metric_values',
    'choose_threshold', 'evaluate_split', 'format_auroc_table', 'resample_weights', 'write_report',
]
FIXED_THRESHOLD = 0.5
LEVELS = ('study', 'video')


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


def _level_thresholds(threshold, level: str) -> dict[str, float]:
  thresholds = {f'{FIXED_THRESHOLD:g}': FIXED_THRESHOLD}
  if isinstance(threshold, Mapping):
    threshold = threshold.get(level)
  if threshold is not None:
    thresholds['chosen'] = float(threshold)
  return thresholds


def _video_units(video_table: VideoTable, study_table: StudyTable) -> np.ndarray:
  position = {sid: i for i, sid in enumerate(study_table.study_ids)}
  missing = [str(v) for v, s in zip(video_table.video_ids, video_table.study_ids) if s not in position]
  if missing:
    raise ValueError(f'video(s) {missing[:5]} belong to studies absent from study_table')
  units = np.array([position[s] for s in video_table.study_ids], dtype=np.int64)
  without_videos = np.flatnonzero(np.bincount(units, minlength=len(study_table)) == 0)
  if without_videos.size:
    raise ValueError(f'study(ies) {study_table.study_ids[without_videos][:5].tolist()} have no video in '
                     'video_table')
  wrong_label = np.flatnonzero(study_table.labels[units] != video_table.labels)
  if wrong_label.size:
    v = wrong_label[0]
    raise ValueError(f'video {str(video_table.video_ids[v])!r} has label {video_table.labels[v]} but its '
                     f'study {str(video_table.study_ids[v])!r} has {study_table.labels[units[v]]}')
  return units


def _percentile_interval(values: np.ndarray, ci_level: float) -> list[float]:
  alpha = (1 - ci_level) / 2
  return [float(q) for q in np.quantile(values, [alpha, 1 - alpha])]  # 'linear', as scipy.stats.quantile


def evaluate_split(video_table: VideoTable, study_table: Optional[StudyTable] = None, *,
                   threshold: Union[None, float, Mapping[str, float]] = None,
                   threshold_method: Optional[str] = None, n_resamples: int = 1000, ci_level: float = 0.95,
                   seed: int = 0, batch: int = 250) -> dict:
  """Point metrics at study and video level with study-bootstrap percentile CIs.

  Args:
    video_table, study_table: from `aggregate_predictions` (study_table is derived when None).
    threshold: the threshold chosen on validation (`choose_threshold`), one float for both levels or
      {'study': t, 'video': t}; metrics are reported at 0.5 ('<metric>@0.5') and at it ('<metric>@chosen').
    threshold_method: how `threshold` was chosen, recorded in the summary.
    n_resamples, ci_level, seed: the bootstrap (ci_level=0.90 = the seed paper's 5th–95th percentiles).
    batch: resamples scored at once (memory ≈ batch × videos × 8 bytes × a few).
  Returns:
    A JSON-ready dict: summary[level]['metrics'][name] = {value, ci, ci<level%>, ci_level, n, n_pos,
    n_resamples_used[, threshold][, reason]}, plus summary[level]['n'/'n_pos'/'n_studies'], 'thresholds'
    and 'bootstrap'. Undefined values are None with a 'reason'.
  """
  if not 0 < ci_level < 1:
    raise ValueError(f'ci_level must be in (0, 1), got {ci_level}')
  if isinstance(threshold, Mapping) and set(threshold) - set(LEVELS):
    raise ValueError(f'threshold keys must be among {LEVELS}, got {sorted(threshold)}')
  study_table = aggregate_videos(video_table) if study_table is None else study_table
  if video_table.probs.ndim != 1 or study_table.probs.ndim != 1:
    raise ValueError(f'evaluate_split handles binary probabilities; got shape {video_table.probs.shape} '
                     '(multi-class evaluation is not supported)')
  if len(study_table) < 2:
    raise ValueError(f'the study bootstrap needs at least 2 studies, got {len(study_table)}')
  units = {'study': np.arange(len(study_table)), 'video': _video_units(video_table, study_table)}
  tables = {'study': study_table, 'video': video_table}
  thresholds = {level: _level_thresholds(threshold, level) for level in LEVELS}
  sorted_rows = {level: _sorted_rows(tables[level].labels, tables[level].probs, units[level])
                 for level in LEVELS}
  point = {}
  for level in LEVELS:
    values, reasons = {}, {}
    for i, (name, t) in enumerate(thresholds[level].items()):
      level_values, level_reasons = binary_metrics(tables[level].labels, tables[level].probs, t,
                                                   include_threshold_free=i == 0)
      values.update({_metric_key(m, name): v for m, v in level_values.items()})
      reasons.update({_metric_key(m, name): r for m, r in level_reasons.items()})
    point[level] = (values, reasons)
  names = {level: list(point[level][0]) for level in LEVELS}

  study_positive = (study_table.labels == 1).astype(float)
  split_has_both = 0 < study_positive.sum() < len(study_positive)

  def statistic(study_indices, axis=-1):
    del axis  # scipy resamples along the last axis, which is how study_indices arrive
    weights = resample_weights(study_indices, len(study_table))
    rows = []
    for level in LEVELS:
      resampled = _metrics_of_resamples(sorted_rows[level], weights, thresholds[level])
      rows.extend(resampled[name] for name in names[level])
    n_pos = weights @ study_positive
    rows.append(((n_pos > 0) & (n_pos < weights.sum(1))).astype(float))
    return np.stack(rows)

  with warnings.catch_warnings():
    warnings.simplefilter('ignore', stats.DegenerateDataWarning)  # NaN rows; intervals are ours below
    result = stats.bootstrap((np.arange(len(study_table)),), statistic, n_resamples=n_resamples,
                             vectorized=True, batch=batch, method='percentile', confidence_level=ci_level,
                             rng=np.random.default_rng(seed))
  distribution = result.bootstrap_distribution
  both_classes = distribution[-1] == 1
  # Within a two-class split a one-class resample is degenerate for every metric; in a one-class split
  # there is nothing else, and metrics that stay defined (accuracy, specificity, ...) use them all.
  usable = both_classes if split_has_both else np.ones_like(both_classes)
  ci_key = f'ci{round(ci_level * 100):d}'
  summary = {
      'ci_level': ci_level,
      'bootstrap': {'unit': 'study', 'method': 'percentile', 'n_resamples': n_resamples, 'seed': seed,
                    'percentiles': [round(50 * (1 - ci_level), 6), round(50 * (1 + ci_level), 6)],
                    'n_degenerate': int((~both_classes).sum()),
                    'degenerate': 'resamples with one class, skipped'},
      'thresholds': {'fixed': FIXED_THRESHOLD, 'chosen': {l: thresholds[l].get('chosen') for l in LEVELS},
                     'chosen_method': threshold_method},
  }
  row = 0
  for level in LEVELS:
    labels = tables[level].labels
    n, n_pos = int(len(labels)), int((labels == 1).sum())
    values, reasons = point[level]
    metrics = {}
    for name in names[level]:
      samples = distribution[row][usable]
      samples = samples[np.isfinite(samples)]
      row += 1
      entry = {'value': None if math.isnan(values[name]) else values[name], 'ci': None, ci_key: None,
               'ci_level': ci_level, 'n': n, 'n_pos': n_pos, 'n_resamples_used': int(samples.size)}
      if '@' in name:
        entry['threshold'] = thresholds[level][name.split('@')[1]]
      if name in reasons:
        entry['reason'] = reasons[name]
      elif samples.size < 2:
        entry['reason'] = 'undefined in (almost) every bootstrap resample'
      else:
        entry['ci'] = entry[ci_key] = _percentile_interval(samples, ci_level)
      metrics[name] = entry
    summary[level] = {'n': n, 'n_pos': n_pos, 'n_studies': len(study_table), 'metrics': metrics}
  return summary
