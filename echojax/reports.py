"""Evaluation reports on disk: prediction CSVs, summary JSON/Markdown, ROC/PR/confusion-matrix PNGs.

Also `format_auroc_table`, the Markdown table of study-level AUROC [CI] over many runs. Figures are drawn on
`matplotlib.figure.Figure` objects (Agg canvas, no pyplot state), so reports work headless and in threads.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Mapping, Optional, Sequence, Union

import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics as skm

from echojax.metrics import StudyTable, VideoTable, aggregate_videos

METRIC_TITLES = {
    'auroc': 'AUROC', 'average_precision': 'Average precision', 'accuracy': 'Accuracy',
    'balanced_accuracy': 'Balanced accuracy', 'mcc': 'MCC', 'precision': 'Precision (PPV)',
    'sensitivity': 'Sensitivity (recall)', 'specificity': 'Specificity', 'f1': 'F1',
}


def _prob_columns(probs: np.ndarray) -> tuple[list[str], np.ndarray]:
  if probs.ndim == 1:
    return ['prob'], probs[:, None]
  return [f'prob_{k}' for k in range(probs.shape[1])], probs


def _write_csv(path: str, header: Sequence[str], rows) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def _ci_text(entry: Optional[Mapping], digits: int = 3) -> str:
  if not entry or entry.get('value') is None:
    return 'n/a' + (f" ({entry['reason']})" if entry and entry.get('reason') else '')
  text = f"{entry['value']:.{digits}f}"
  if entry.get('ci'):
    lo, hi = entry['ci']
    text += f' [{lo:.{digits}f}, {hi:.{digits}f}]'
  return text


def _metric_title(name: str) -> str:
  metric, _, at = name.partition('@')
  return METRIC_TITLES.get(metric, metric) + (f' @ {at}' if at else '')


def _summary_markdown(summary: Mapping, title: str) -> str:
  pct = round(summary['ci_level'] * 100)
  boot = summary['bootstrap']
  lo_pct, hi_pct = boot['percentiles']
  chosen = summary['thresholds']['chosen']
  lines = [f'# {title}', '',
           f"{pct}% CIs: {boot['n_resamples']} bootstrap resamples of studies (seed {boot['seed']}), "
           f"{lo_pct:g}th–{hi_pct:g}th percentiles; {boot['n_degenerate']} one-class resamples skipped.",
           f"Thresholds: fixed {summary['thresholds']['fixed']:g}"
           + ''.join(f'; chosen ({level}) {t:.4f}' for level, t in chosen.items() if t is not None)
           + (f" by {summary['thresholds']['chosen_method']}" if summary['thresholds']['chosen_method']
              else '') + '.']
  for level in ('study', 'video'):
    part = summary[level]
    unit = 'studies' if level == 'study' else 'videos'
    lines += ['', f"## {level.capitalize()} level (n = {part['n']} {unit}, {part['n_pos']} positive)", '',
              f'| Metric | Value | {pct}% CI | n | n_pos | Note |', '|---|---|---|---|---|---|']
    for name, entry in part['metrics'].items():
      value = 'n/a' if entry['value'] is None else f"{entry['value']:.3f}"
      ci = '' if entry['ci'] is None else f"{entry['ci'][0]:.3f}–{entry['ci'][1]:.3f}"
      lines.append(f"| {_metric_title(name)} | {value} | {ci} | {entry['n']} | {entry['n_pos']} | "
                   f"{entry.get('reason', '')} |")
  return '\n'.join(lines) + '\n'


def _save(fig: Figure, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, format='png')
  return path


def _curve_figure(kind: str, study: StudyTable, entry: Mapping, title: str, pct: int, path: str) -> str:
  fig = Figure(figsize=(5, 5), dpi=110)
  ax = fig.subplots()
  both_classes = len(np.unique(study.labels)) == 2
  label = f"{'AUROC' if kind == 'roc' else 'AP'} {_ci_text(entry)}".replace('[', f'[{pct}% CI ')
  if kind == 'roc':
    ax.plot([0, 1], [0, 1], ls='--', color='grey', lw=1, label='chance')
    if both_classes:
      fpr, tpr, _ = skm.roc_curve(study.labels, study.probs)
      ax.plot(fpr, tpr, lw=2, label=label)
    ax.set(xlabel='1 − specificity (FPR)', ylabel='Sensitivity (TPR)')
  else:
    if both_classes:
      precision, recall, _ = skm.precision_recall_curve(study.labels, study.probs)
      ax.step(recall, precision, where='post', lw=2, label=label)
    prevalence = float(np.mean(study.labels == 1))
    ax.axhline(prevalence, ls='--', color='grey', lw=1, label=f'prevalence {prevalence:.3f}')
    ax.set(xlabel='Recall (sensitivity)', ylabel='Precision (PPV)')
  if not both_classes:
    ax.text(0.5, 0.5, 'undefined: only one class', ha='center', va='center', transform=ax.transAxes)
  ax.set(xlim=(0, 1), ylim=(0, 1.02), title=f"{title}\nstudy level, {'ROC' if kind == 'roc' else 'PR'}")
  ax.legend(loc='lower right' if kind == 'roc' else 'lower left', fontsize=8)
  return _save(fig, path)


def _confusion_figure(study: StudyTable, threshold: float, class_names: Sequence[str], title: str,
                      path: str) -> str:
  fig = Figure(figsize=(4.5, 4), dpi=110)
  ax = fig.subplots()
  skm.ConfusionMatrixDisplay.from_predictions(study.labels, (study.probs >= threshold).astype(int),
                                              labels=[0, 1], display_labels=list(class_names), ax=ax,
                                              colorbar=False)
  ax.set_title(f'{title}\nstudy level, threshold {threshold:.3f}')
  return _save(fig, path)


def write_report(out_dir: str, predictions: Union[VideoTable, tuple[VideoTable, StudyTable]],
                 summary: Mapping, title: str = 'Evaluation', *,
                 class_names: Sequence[str] = ('negative', 'positive')) -> dict[str, str]:
  """Writes a split's evaluation to out_dir and returns {artifact: path}.

  predictions: the (VideoTable, StudyTable) of `aggregate_predictions` (or a VideoTable alone);
  summary: `evaluate_split`'s dict. The confusion matrix uses the chosen study threshold, else 0.5.
  """
  video, study = (predictions, None) if isinstance(predictions, VideoTable) else predictions
  study = aggregate_videos(video) if study is None else study
  os.makedirs(out_dir, exist_ok=True)
  paths = {name: os.path.join(out_dir, name) for name in (
      'predictions.csv', 'study_predictions.csv', 'summary.json', 'summary.md', 'roc_curve.png',
      'pr_curve.png', 'confusion_matrix.png')}

  prob_header, video_probs = _prob_columns(video.probs)
  _write_csv(paths['predictions.csv'], ['study_id', 'video_id', 'label', *prob_header, 'num_clips'],
             ([s, v, int(l), *map(repr, map(float, p)), int(c)] for s, v, l, p, c in zip(
                 video.study_ids, video.video_ids, video.labels, video_probs, video.num_clips)))
  prob_header, study_probs = _prob_columns(study.probs)
  _write_csv(paths['study_predictions.csv'], ['study_id', 'label', *prob_header, 'num_videos'],
             ([s, int(l), *map(repr, map(float, p)), int(n)] for s, l, p, n in zip(
                 study.study_ids, study.labels, study_probs, study.num_videos)))
  with open(paths['summary.json'], 'w') as f:
    json.dump({'title': title, **summary}, f, indent=2, allow_nan=False)
  with open(paths['summary.md'], 'w') as f:
    f.write(_summary_markdown(summary, title))

  pct = round(summary['ci_level'] * 100)
  metrics = summary['study']['metrics']
  _curve_figure('roc', study, metrics.get('auroc'), title, pct, paths['roc_curve.png'])
  _curve_figure('pr', study, metrics.get('average_precision'), title, pct, paths['pr_curve.png'])
  chosen = summary['thresholds']['chosen'].get('study')
  _confusion_figure(study, summary['thresholds']['fixed'] if chosen is None else chosen, class_names, title,
                    paths['confusion_matrix.png'])
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
