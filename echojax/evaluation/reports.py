"""Evaluation reports on disk: prediction CSVs, summary JSON/Markdown and the figures of `plots` for each
task kind (binary: ROC with operating points, PR, confusion matrix, reliability diagram, decision curve;
multiclass: confusion matrix; regression: scatter and Bland–Altman).

Also `format_auroc_table`, the Markdown table of study-level AUROC [CI] over many runs.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from echojax.evaluation import plots
from echojax.evaluation.metrics import StudyTable, VideoTable, aggregate_videos

METRIC_TITLES = {
    'auroc': 'AUROC', 'average_precision': 'Average precision', 'accuracy': 'Accuracy',
    'balanced_accuracy': 'Balanced accuracy', 'mcc': 'MCC', 'precision': 'Precision (PPV)',
    'npv': 'NPV', 'sensitivity': 'Sensitivity (recall)', 'specificity': 'Specificity', 'f1': 'F1',
    'brier': 'Brier score', 'ece': 'ECE (10 bins)', 'calibration_intercept': 'Calibration intercept',
    'calibration_slope': 'Calibration slope', 'macro_auroc': 'AUROC (macro, one-vs-rest)',
    'quadratic_kappa': 'Quadratic-weighted kappa', 'mae': 'MAE', 'rmse': 'RMSE', 'r2': 'R²',
    'bias': 'Bias (pred − true)', 'loa_low': 'Lower limit of agreement', 'loa_high': 'Upper limit of agreement',
}


def _prob_columns(probs: np.ndarray, class_names: Optional[Sequence[str]] = None,
                  task: str = 'binary') -> tuple[list[str], np.ndarray]:
  if probs.ndim == 1:
    return ['pred' if task == 'regression' else 'prob'], probs[:, None]
  names = class_names if class_names and len(class_names) == probs.shape[1] else range(probs.shape[1])
  return [f'prob_{k}' for k in names], probs


def _write_csv(path: str, header: Sequence[str], rows) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


_ci_text = plots.ci_text


def _metric_title(name: str) -> str:
  metric, _, at = name.partition('@')
  if metric.startswith('auroc_'):
    return f'AUROC, {metric[len("auroc_"):]} vs rest'
  return METRIC_TITLES.get(metric, metric) + (f' @ {at}' if at else '')


def _label(value, task: str) -> str:
  return repr(float(value)) if task == 'regression' else str(int(value))


def _summary_markdown(summary: Mapping, title: str) -> str:
  pct = round(summary['ci_level'] * 100)
  boot = summary['bootstrap']
  lo_pct, hi_pct = boot['percentiles']
  lines = [f'# {title}', '',
           f"{pct}% CIs: {boot['n_resamples']} {boot.get('resampling', 'simple')} bootstrap resamples of "
           f"studies (seed {boot['seed']}), {lo_pct:g}th–{hi_pct:g}th percentiles"
           + (f"; {boot['n_degenerate']} one-class resamples skipped." if boot['n_degenerate'] else '.')]
  if 'thresholds' in summary:
    chosen = summary['thresholds']['chosen']
    lines.append(f"Thresholds: fixed {summary['thresholds']['fixed']:g}"
                 + ''.join(f'; chosen ({level}) {t:.4f}' for level, t in chosen.items() if t is not None)
                 + (f" by {summary['thresholds']['chosen_method']}" if summary['thresholds']['chosen_method']
                    else '') + '.')
  if summary.get('calibration'):
    lines.append(f"Probabilities recalibrated: {summary['calibration']}.")
  for level in ('study', 'video'):
    part = summary[level]
    unit = 'studies' if level == 'study' else 'videos'
    positives = f", {part['n_pos']} positive" if 'n_pos' in part else ''
    lines += ['', f"## {level.capitalize()} level (n = {part['n']} {unit}{positives})", '',
              f'| Metric | Value | {pct}% CI | n | Note |', '|---|---|---|---|---|']
    for name, entry in part['metrics'].items():
      value = 'n/a' if entry['value'] is None else f"{entry['value']:.3f}"
      ci = '' if entry['ci'] is None else f"{entry['ci'][0]:.3f}–{entry['ci'][1]:.3f}"
      note = '; '.join(x for x in (entry.get('reason'), entry.get('note')) if x)
      lines.append(f"| {_metric_title(name)} | {value} | {ci} | {entry['n']} | {note} |")
  return '\n'.join(lines) + '\n'


def _binary_figures(out_dir, study, summary, title, class_names, pct) -> dict[str, str]:
  metrics = summary['study']['metrics']
  chosen = summary['thresholds']['chosen'].get('study')
  threshold = summary['thresholds']['fixed'] if chosen is None else chosen
  points = {'0.5': summary['thresholds']['fixed'], **({'chosen': chosen} if chosen is not None else {})}
  path = lambda name: os.path.join(out_dir, name)
  return {
      'roc_curve.png': plots.roc_figure(study.labels, study.probs, metrics.get('auroc'), title, pct,
                                        path('roc_curve.png'), points),
      'pr_curve.png': plots.pr_figure(study.labels, study.probs, metrics.get('average_precision'), title, pct,
                                      path('pr_curve.png')),
      'confusion_matrix.png': plots.confusion_figure(
          study.labels, (study.probs >= threshold).astype(int), class_names, title,
          f'study level, threshold {threshold:.3f}', path('confusion_matrix.png')),
      'reliability.png': plots.reliability_figure(study.labels, study.probs, metrics, title,
                                                  path('reliability.png')),
      'decision_curve.png': plots.decision_curve_figure(study.labels, study.probs, title,
                                                        path('decision_curve.png'), chosen),
  }


def write_report(out_dir: str, predictions: Union[VideoTable, tuple[VideoTable, StudyTable]],
                 summary: Mapping, title: str = 'Evaluation', *,
                 class_names: Sequence[str] = ('negative', 'positive'), unit: str = '') -> dict[str, str]:
  """Writes a split's evaluation to out_dir and returns {artifact: path}.

  predictions: the (VideoTable, StudyTable) of `aggregate_predictions` (or a VideoTable alone);
  summary: `evaluate_split` / `evaluate_multiclass` / `evaluate_regression`'s dict (its 'task' picks the
  figures). Binary: ROC (with operating points), PR, confusion matrix at the chosen study threshold (else
  0.5), reliability diagram, decision curve; multiclass: confusion matrix; regression: scatter, Bland–Altman.
  """
  video, study = (predictions, None) if isinstance(predictions, VideoTable) else predictions
  study = aggregate_videos(video) if study is None else study
  task = summary.get('task', 'binary')
  os.makedirs(out_dir, exist_ok=True)
  paths = {name: os.path.join(out_dir, name) for name in (
      'predictions.csv', 'study_predictions.csv', 'summary.json', 'summary.md')}
  names = summary.get('class_names') if task == 'multiclass' else None

  prob_header, video_probs = _prob_columns(video.probs, names, task)
  _write_csv(paths['predictions.csv'], ['study_id', 'video_id', 'label', *prob_header, 'num_clips'],
             ([s, v, _label(l, task), *map(repr, map(float, p)), int(c)] for s, v, l, p, c in zip(
                 video.study_ids, video.video_ids, video.labels, video_probs, video.num_clips)))
  prob_header, study_probs = _prob_columns(study.probs, names, task)
  _write_csv(paths['study_predictions.csv'], ['study_id', 'label', *prob_header, 'num_videos'],
             ([s, _label(l, task), *map(repr, map(float, p)), int(n)] for s, l, p, n in zip(
                 study.study_ids, study.labels, study_probs, study.num_videos)))
  with open(paths['summary.json'], 'w') as f:
    json.dump({'title': title, **summary}, f, indent=2, allow_nan=False)
  with open(paths['summary.md'], 'w') as f:
    f.write(_summary_markdown(summary, title))

  pct = round(summary['ci_level'] * 100)
  metrics = summary['study']['metrics']
  if task == 'binary':
    paths.update(_binary_figures(out_dir, study, summary, title, class_names, pct))
  elif task == 'multiclass':
    paths['confusion_matrix.png'] = plots.confusion_figure(
        study.labels, study.probs.argmax(1), names, title, 'study level, most probable class',
        os.path.join(out_dir, 'confusion_matrix.png'))
  else:
    paths['scatter.png'] = plots.scatter_figure(study.labels, study.probs, metrics, title, unit,
                                                os.path.join(out_dir, 'scatter.png'))
    paths['bland_altman.png'] = plots.bland_altman_figure(study.labels, study.probs, metrics, title, unit,
                                                          os.path.join(out_dir, 'bland_altman.png'))
  return paths


def auroc_row(summary: Mapping, *, metric: str = 'auroc', level: str = 'study') -> dict:
  """One run's `metric` as a flat row {metric, ci_lo, ci_hi, ci_level, n_studies, n_pos} (None: undefined)."""
  entry = summary[level]['metrics'][metric]
  lo, hi = entry['ci'] or (None, None)
  return {metric: entry['value'], 'ci_lo': lo, 'ci_hi': hi, 'ci_level': summary['ci_level'],
          'n_studies': summary[level]['n_studies'], 'n_pos': summary[level]['n_pos']}


def _percent_label(value) -> str:
  if isinstance(value, (float, int)) and not isinstance(value, bool) and 0 < value <= 1:
    return f'{100 * value:g}%'
  return str(value)


def format_auroc_table(rows: Sequence[Mapping], *, metric: str = 'auroc', level: str = 'study') -> str:
  """Markdown table of `metric` [CI] at `level` for several runs.

  Each row holds 'summary' (an `evaluate_split` dict), or the value under 'value' or `metric` (as from
  `auroc_row`) with 'ci' [lo, hi] or 'ci_lo'/'ci_hi'. Layout: rows with 'row' and 'column' — or 'frac' and
  'init' (label fraction × initialisation) — make a grid, missing cells '–', several runs in one cell
  (seeds) 'mean ± sd (k runs)'; otherwise one line per run, named by 'name'.
  """
  if not rows:
    raise ValueError('format_auroc_table: no rows')

  def entry_of(row: Mapping) -> dict:
    if 'summary' in row:
      return dict(row['summary'][level]['metrics'].get(metric) or {'value': None, 'reason': 'not computed'})
    value = row.get('value', row.get(metric))
    value = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
    ci = row.get('ci') or ([row['ci_lo'], row['ci_hi']] if row.get('ci_lo') is not None else None)
    return {'value': value, 'ci': ci, 'reason': row.get('reason')}

  def cell(runs: Sequence[Mapping]) -> str:
    if len(runs) == 1:
      return _ci_text(entry_of(runs[0]))
    values = [e['value'] for e in map(entry_of, runs) if e['value'] is not None]
    if not values:
      return f'n/a ({len(runs)} runs)'
    spread = np.std(values, ddof=1) if len(values) > 1 else 0.0
    return f'{np.mean(values):.3f} ± {spread:.3f} ({len(values)} runs)'

  levels = [r['summary']['ci_level'] if 'summary' in r else r.get('ci_level', 0.95) for r in rows]
  header = f'{METRIC_TITLES.get(metric, metric)} [{round(100 * levels[0])}% CI]'
  grid_keys = next((keys for keys in (('row', 'column'), ('frac', 'init'))
                    if all(k in r for r in rows for k in keys)), None)
  if grid_keys:
    cells: dict[tuple[str, str], list] = {}
    for r in rows:
      cells.setdefault((_percent_label(r[grid_keys[0]]), str(r[grid_keys[1]])), []).append(r)
    row_keys = list(dict.fromkeys(k[0] for k in cells))
    column_keys = list(dict.fromkeys(k[1] for k in cells))
    lines = [f"| {header} | {' | '.join(column_keys)} |", '|---' * (len(column_keys) + 1) + '|']
    for rk in row_keys:
      row_cells = [cell(cells[rk, ck]) if (rk, ck) in cells else '–' for ck in column_keys]
      lines.append(f"| {rk} | {' | '.join(row_cells)} |")
  else:
    missing = [i for i, r in enumerate(rows) if 'name' not in r]
    if missing:
      raise ValueError(f"format_auroc_table: row(s) {missing} have no 'name' (nor 'row'+'column' or "
                       "'frac'+'init')")
    lines = [f'| Run | n studies | {header} |', '|---|---|---|']
    for r in rows:
      n = r['summary'][level]['n_studies'] if 'summary' in r else r.get('n_studies', r.get('n', ''))
      lines.append(f"| {r['name']} | {n} | {cell([r])} |")
  return '\n'.join(lines) + '\n'
