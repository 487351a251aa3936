"""Evaluation of a split: study-level bootstrap confidence intervals around scikit-learn point metrics, for
the three task kinds (binary: discrimination, calibration and thresholded metrics; multiclass; regression).

STUDIES are resampled with replacement (video-level metrics take whole studies, so a study's videos stay
together); the interval is the percentile interval, 2.5th–97.5th percentile by default. The seed paper's
companion code took the 5th and 95th percentiles of 10,000 resamples and called that a "95 % CI": it is a
90 % interval, reproduced here by `ci_level=0.90`. Resampling is `scipy.stats.bootstrap`; by default it is
STRATIFIED by the study label (each class's studies are resampled within the class, so every resample keeps
the split's class counts); `bootstrap='simple'` resamples all studies together and skips (counts) resamples
with one class, as before. Each batch of resamples is scored at once (weighted counts, rank-based AUROC/AP,
vectorised Newton fits), equal to scikit-learn / scipy with `sample_weight` (tested). Every metric whose CI
rests on fewer than 10 events (positive or negative studies, predicted positives/negatives) gets a note.
Also re-exports the aggregation/metric (`metrics`) and report (`reports`) API.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Mapping, Optional, Sequence, Union

import numpy as np
from scipy import stats

from echojax.evaluation import calibration, multiclass, regression
from echojax.evaluation.metrics import (THRESHOLD_FREE_METRICS, THRESHOLD_METHODS, THRESHOLD_METRICS,
                                        StudyTable, VideoTable, _metric_key, _metrics_of_resamples,
                                        _sorted_rows, aggregate_predictions, aggregate_videos, binary_metrics,
                                        bootstrap_metric_values, choose_threshold, resample_weights)
from echojax.evaluation.reports import auroc_row, format_auroc_table, write_report

__all__ = [
    'BOOTSTRAP_KINDS', 'TASK_KINDS', 'THRESHOLD_FREE_METRICS', 'THRESHOLD_METHODS', 'THRESHOLD_METRICS',
    'StudyTable', 'VideoTable', 'aggregate_predictions', 'aggregate_videos', 'auroc_row', 'binary_metrics',
    'bootstrap_metric_values', 'choose_threshold', 'evaluate_multiclass', 'evaluate_regression',
    'evaluate_split', 'evaluate_task', 'format_auroc_table', 'resample_weights', 'study_bootstrap',
    'write_report',
]
FIXED_THRESHOLD = 0.5
LEVELS = ('study', 'video')
BOOTSTRAP_KINDS = ('stratified', 'simple')
TASK_KINDS = ('binary', 'multiclass', 'regression')
MIN_EVENTS = 10     # below this many events a CI gets a note (wide, unstable)


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


def study_bootstrap(statistic: Callable[[np.ndarray], np.ndarray], n_studies: int, *,
                    strata: Optional[np.ndarray] = None, n_resamples: int = 1000, ci_level: float = 0.95,
                    seed: int = 0, batch: int = 250) -> np.ndarray:
  """Bootstrap distribution (M, n_resamples) of `statistic(weights (B, n_studies)) -> (M, B)`.

  strata: one label per study; each stratum's studies are resampled within it (scipy's independent
  resampling of several samples), so every resample keeps the strata sizes. None: all studies together.
  """
  if not 0 < ci_level < 1:
    raise ValueError(f'ci_level must be in (0, 1), got {ci_level}')
  if strata is None:
    groups = [np.arange(n_studies)]
  else:
    strata = np.asarray(strata)
    groups = [np.flatnonzero(strata == g) for g in np.unique(strata)]
  # A stratum of one study is that study in every resample (scipy needs two or more per sample).
  fixed = np.concatenate([g for g in groups if len(g) == 1] + [np.zeros(0, np.int64)])
  groups = [g for g in groups if len(g) > 1]
  if not groups:
    return np.repeat(np.atleast_2d(statistic(resample_weights(fixed[None], n_studies))), n_resamples, axis=1)

  def scipy_statistic(*resampled, axis=-1):
    del axis  # scipy resamples along the last axis, which is how the indices arrive
    resampled = [np.atleast_2d(r) for r in resampled]
    constant = np.broadcast_to(fixed, (resampled[0].shape[0], len(fixed)))
    return statistic(resample_weights(np.concatenate(resampled + [constant], axis=-1), n_studies))

  with warnings.catch_warnings():
    warnings.simplefilter('ignore', stats.DegenerateDataWarning)  # NaN rows; intervals are ours below
    warnings.simplefilter('ignore', RuntimeWarning)
    result = stats.bootstrap(tuple(groups), scipy_statistic, n_resamples=n_resamples, vectorized=True,
                             paired=False, batch=batch, method='percentile', confidence_level=ci_level,
                             rng=np.random.default_rng(seed))
  return np.atleast_2d(result.bootstrap_distribution)


def _bootstrap_info(n_resamples, ci_level, seed, kind, n_degenerate) -> dict:
  info = {'unit': 'study', 'method': 'percentile', 'resampling': kind, 'n_resamples': n_resamples,
          'seed': seed, 'percentiles': [round(50 * (1 - ci_level), 6), round(50 * (1 + ci_level), 6)],
          'n_degenerate': int(n_degenerate)}
  info['degenerate'] = ('resamples with one class, skipped' if kind == 'simple'
                        else 'none: class counts are kept in every resample')
  return info


def _entry(value, samples, reason, ci_level, **fields) -> dict:
  """One metric's JSON entry: value, percentile CI over the usable finite samples, reason or note."""
  ci_key = f'ci{round(ci_level * 100):d}'
  undefined = value is None or not math.isfinite(value)
  samples = samples[np.isfinite(samples)]
  entry = {'value': None if undefined else float(value), 'ci': None, ci_key: None, 'ci_level': ci_level,
           **fields, 'n_resamples_used': int(samples.size)}
  if undefined:
    entry['reason'] = reason or 'undefined'
    return entry
  if reason:
    entry['note'] = reason
  if samples.size < 2:
    entry['reason'] = 'undefined in (almost) every bootstrap resample'
  else:
    entry['ci'] = entry[ci_key] = _percentile_interval(samples, ci_level)
  return entry


def _add_note(entry: dict, note: Optional[str]) -> None:
  if note:
    entry['note'] = f"{entry['note']}; {note}" if entry.get('note') else note


def _few_events_note(count: int, what: str) -> Optional[str]:
  if count >= MIN_EVENTS:
    return None
  if count == 1:  # 'positive studies' → 'positive study', 'predicted negatives' → 'predicted negative'
    what = what.replace('studies', 'study') if 'studies' in what else what.rstrip('s')
  return f'CI rests on {count} {what} (< {MIN_EVENTS}): unstable'


def _check_kind(bootstrap: str, ci_level: float, n_studies: int) -> None:
  if bootstrap not in BOOTSTRAP_KINDS:
    raise ValueError(f'bootstrap must be one of {BOOTSTRAP_KINDS}, got {bootstrap!r}')
  if not 0 < ci_level < 1:
    raise ValueError(f'ci_level must be in (0, 1), got {ci_level}')
  if n_studies < 2:
    raise ValueError(f'the study bootstrap needs at least 2 studies, got {n_studies}')


def _binary_events(name: str, table, threshold, n_pos_studies: int, n_neg_studies: int) -> Optional[str]:
  metric = name.split('@')[0]
  if metric == 'sensitivity':
    return _few_events_note(n_pos_studies, 'positive studies')
  if metric == 'specificity':
    return _few_events_note(n_neg_studies, 'negative studies')
  if metric in ('precision', 'npv') and threshold is not None:
    predicted = int((table.probs >= threshold).sum() if metric == 'precision' else (table.probs < threshold).sum())
    return _few_events_note(predicted, 'predicted ' + ('positives' if metric == 'precision' else 'negatives'))
  fewest = min(n_pos_studies, n_neg_studies)
  return _few_events_note(fewest, ('positive' if n_pos_studies <= n_neg_studies else 'negative') + ' studies')


def evaluate_split(video_table: VideoTable, study_table: Optional[StudyTable] = None, *,
                   threshold: Union[None, float, Mapping[str, float]] = None,
                   threshold_method: Optional[str] = None, n_resamples: int = 1000, ci_level: float = 0.95,
                   seed: int = 0, batch: int = 250, bootstrap: str = 'stratified') -> dict:
  """Binary point metrics (discrimination, calibration, thresholded) at study and video level with
  study-bootstrap percentile CIs.

  Args:
    video_table, study_table: from `aggregate_predictions` (study_table is derived when None).
    threshold: the threshold chosen on validation (`choose_threshold`), one float for both levels or
      {'study': t, 'video': t}; metrics are reported at 0.5 ('<metric>@0.5') and at it ('<metric>@chosen').
    threshold_method: how `threshold` was chosen, recorded in the summary.
    n_resamples, ci_level, seed: the bootstrap (ci_level=0.90 = the seed paper's 5th–95th percentiles).
    batch: resamples scored at once (memory ≈ batch × videos × 8 bytes × a few).
    bootstrap: 'stratified' (class-preserving, default) or 'simple' (one-class resamples skipped).
  Returns:
    A JSON-ready dict: summary[level]['metrics'][name] = {value, ci, ci<level%>, ci_level, n, n_pos,
    n_resamples_used[, threshold][, reason][, note]}, plus summary[level]['n'/'n_pos'/'n_studies'], 'task',
    'thresholds' and 'bootstrap'. Undefined values are None with a 'reason'.
  """
  if isinstance(threshold, Mapping) and set(threshold) - set(LEVELS):
    raise ValueError(f'threshold keys must be among {LEVELS}, got {sorted(threshold)}')
  study_table = aggregate_videos(video_table) if study_table is None else study_table
  if video_table.probs.ndim != 1 or study_table.probs.ndim != 1:
    raise ValueError(f'evaluate_split handles binary probabilities; got shape {video_table.probs.shape} '
                     '(use evaluate_multiclass for class probabilities)')
  _check_kind(bootstrap, ci_level, len(study_table))
  units = {'study': np.arange(len(study_table)), 'video': _video_units(video_table, study_table)}
  tables = {'study': study_table, 'video': video_table}
  thresholds = {level: _level_thresholds(threshold, level) for level in LEVELS}
  sorted_rows = {level: _sorted_rows(tables[level].labels, tables[level].probs, units[level])
                 for level in LEVELS}
  point = {}
  for level in LEVELS:
    table = tables[level]
    values, reasons = calibration.calibration_metrics(table.labels, table.probs)
    for i, (name, t) in enumerate(thresholds[level].items()):
      level_values, level_reasons = binary_metrics(table.labels, table.probs, t, include_threshold_free=i == 0)
      values.update({_metric_key(m, name): v for m, v in level_values.items()})
      reasons.update({_metric_key(m, name): r for m, r in level_reasons.items()})
    order = [m for m in THRESHOLD_FREE_METRICS] + list(calibration.CALIBRATION_METRICS)
    point[level] = ({k: values[k] for k in order + [k for k in values if k not in order]}, reasons)
  names = {level: list(point[level][0]) for level in LEVELS}

  study_positive = (study_table.labels == 1).astype(float)
  n_pos_studies = int(study_positive.sum())
  split_has_both = 0 < n_pos_studies < len(study_positive)

  def statistic(weights):
    rows = []
    for level in LEVELS:
      resampled = _metrics_of_resamples(sorted_rows[level], weights, thresholds[level])
      resampled.update(calibration.calibration_resamples(tables[level].labels, tables[level].probs,
                                                          weights[:, units[level]]))
      rows.extend(resampled[name] for name in names[level])
    n_pos = weights @ study_positive
    rows.append(((n_pos > 0) & (n_pos < weights.sum(1))).astype(float))
    return np.stack(rows)

  strata = study_table.labels if bootstrap == 'stratified' else None
  distribution = study_bootstrap(statistic, len(study_table), strata=strata, n_resamples=n_resamples,
                                 ci_level=ci_level, seed=seed, batch=batch)
  both_classes = distribution[-1] == 1
  # Within a two-class split a one-class resample is degenerate for every metric; in a one-class split
  # there is nothing else, and metrics that stay defined (accuracy, specificity, ...) use them all.
  usable = both_classes if split_has_both else np.ones_like(both_classes)
  summary = {
      'task': 'binary', 'ci_level': ci_level,
      'bootstrap': _bootstrap_info(n_resamples, ci_level, seed, bootstrap, (~both_classes).sum()),
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
      fields = {'n': n, 'n_pos': n_pos}
      t = thresholds[level][name.split('@')[1]] if '@' in name else None
      if t is not None:
        fields['threshold'] = t
      metrics[name] = _entry(values[name], distribution[row][usable], reasons.get(name), ci_level, **fields)
      if metrics[name]['value'] is not None:
        _add_note(metrics[name], _binary_events(name, tables[level], t, n_pos_studies,
                                                len(study_table) - n_pos_studies))
      row += 1
    summary[level] = {'n': n, 'n_pos': n_pos, 'n_studies': len(study_table), 'metrics': metrics}
  return summary


def _generic_summary(task: str, tables: Mapping, point: Mapping, resample_fn: Callable, units: Mapping, *,
                     strata, n_resamples, ci_level, seed, batch, bootstrap, events_note) -> dict:
  """Summary of a multiclass / regression split: point values and the bootstrap of `resample_fn`."""
  names = {level: list(point[level][0]) for level in LEVELS}

  def statistic(weights):
    rows = []
    for level in LEVELS:
      resampled = resample_fn(tables[level], weights[:, units[level]])
      rows.extend(resampled[name] for name in names[level])
    return np.stack(rows)

  n_studies = len(tables['study'])
  distribution = study_bootstrap(statistic, n_studies, strata=strata if bootstrap == 'stratified' else None,
                                 n_resamples=n_resamples, ci_level=ci_level, seed=seed, batch=batch)
  summary = {'task': task, 'ci_level': ci_level,
             'bootstrap': _bootstrap_info(n_resamples, ci_level, seed, bootstrap, 0)}
  summary['bootstrap']['degenerate'] = 'none (undefined resample values are left out per metric)'
  row = 0
  for level in LEVELS:
    values, reasons = point[level]
    n = len(tables[level].labels)
    metrics = {}
    for name in names[level]:
      metrics[name] = _entry(values[name], distribution[row], reasons.get(name), ci_level, n=n)
      if metrics[name]['value'] is not None:
        _add_note(metrics[name], events_note(name))
      row += 1
    summary[level] = {'n': n, 'n_studies': n_studies, 'metrics': metrics}
  return summary


def evaluate_multiclass(video_table: VideoTable, study_table: Optional[StudyTable] = None, *,
                        class_names: Optional[Sequence[str]] = None, n_resamples: int = 1000,
                        ci_level: float = 0.95, seed: int = 0, batch: int = 250,
                        bootstrap: str = 'stratified') -> dict:
  """Multi-class metrics (macro OvR AUROC, per-class AUROC, accuracy, balanced accuracy, quadratic kappa)
  at both levels with study-bootstrap CIs (stratified by class by default) and confusion matrices."""
  study_table = aggregate_videos(video_table) if study_table is None else study_table
  if study_table.probs.ndim != 2:
    raise ValueError(f'evaluate_multiclass needs (n, K) class probabilities, got {study_table.probs.shape}')
  _check_kind(bootstrap, ci_level, len(study_table))
  k = study_table.probs.shape[1]
  class_names = [str(c) for c in (class_names or range(k))]
  tables = {'study': study_table, 'video': video_table}
  units = {'study': np.arange(len(study_table)), 'video': _video_units(video_table, study_table)}
  point = {level: multiclass.multiclass_metrics(t.labels, t.probs, class_names) for level, t in tables.items()}
  counts = np.bincount(study_table.labels, minlength=k)

  def events_note(name):
    if name.startswith('auroc_'):
      c = class_names.index(name[len('auroc_'):])
      return _few_events_note(int(min(counts[c], len(study_table) - counts[c])), f'{class_names[c]} studies')
    present = counts[counts > 0]
    return _few_events_note(int(present.min()), 'studies in the smallest class')

  summary = _generic_summary(
      'multiclass', tables, point,
      lambda table, w: multiclass.multiclass_resamples(table.labels, table.probs, w, class_names), units,
      strata=study_table.labels, n_resamples=n_resamples, ci_level=ci_level, seed=seed, batch=batch,
      bootstrap=bootstrap, events_note=events_note)
  summary['class_names'] = class_names
  for level, table in tables.items():
    summary[level]['class_counts'] = np.bincount(table.labels, minlength=k).tolist()
    summary[level]['confusion_matrix'] = multiclass.confusion(table.labels, table.probs).tolist()
  return summary


def evaluate_regression(video_table: VideoTable, study_table: Optional[StudyTable] = None, *,
                        n_resamples: int = 1000, ci_level: float = 0.95, seed: int = 0, batch: int = 250,
                        bootstrap: str = 'simple') -> dict:
  """MAE, RMSE, R², Bland–Altman bias and limits of agreement at both levels with study-bootstrap CIs
  (a continuous target has no classes to stratify by: 'stratified' falls back to 'simple')."""
  study_table = aggregate_videos(video_table) if study_table is None else study_table
  _check_kind(bootstrap, ci_level, len(study_table))
  tables = {'study': study_table, 'video': video_table}
  units = {'study': np.arange(len(study_table)), 'video': _video_units(video_table, study_table)}
  point = {level: regression.regression_metrics(t.labels, t.probs) for level, t in tables.items()}
  summary = _generic_summary(
      'regression', tables, point, lambda table, w: regression.regression_resamples(table.labels, table.probs, w),
      units, strata=None, n_resamples=n_resamples, ci_level=ci_level, seed=seed, batch=batch,
      bootstrap='simple', events_note=lambda name: _few_events_note(len(study_table), 'studies'))
  return summary


def evaluate_task(kind: str, video_table: VideoTable, study_table: Optional[StudyTable] = None, *,
                  threshold=None, threshold_method=None, class_names=None, **bootstrap_kwargs) -> dict:
  """`evaluate_split` / `evaluate_multiclass` / `evaluate_regression` by task kind."""
  if kind == 'binary':
    return evaluate_split(video_table, study_table, threshold=threshold, threshold_method=threshold_method,
                          **bootstrap_kwargs)
  if kind == 'multiclass':
    return evaluate_multiclass(video_table, study_table, class_names=class_names, **bootstrap_kwargs)
  if kind == 'regression':
    bootstrap_kwargs.pop('bootstrap', None)
    return evaluate_regression(video_table, study_table, **bootstrap_kwargs)
  raise ValueError(f'task kind must be one of {TASK_KINDS}, got {kind!r}')
