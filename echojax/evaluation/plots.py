"""The report figures, drawn on `matplotlib.figure.Figure` objects (Agg canvas, no pyplot state): ROC with its
operating points, PR, confusion matrices, reliability diagram, decision curve, and for regression a
prediction scatter and a Bland–Altman plot. Each function saves one PNG and returns its path."""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
from matplotlib.figure import Figure
from sklearn import metrics as skm

from echojax.evaluation import calibration, decision_curve


def ci_text(entry: Optional[Mapping], digits: int = 3) -> str:
  if not entry or entry.get('value') is None:
    return 'n/a' + (f" ({entry['reason']})" if entry and entry.get('reason') else '')
  text = f"{entry['value']:.{digits}f}"
  if entry.get('ci'):
    lo, hi = entry['ci']
    text += f' [{lo:.{digits}f}, {hi:.{digits}f}]'
  return text


def _save(fig: Figure, path: str) -> str:
  fig.tight_layout()
  fig.savefig(path, format='png')
  return path


def _one_class_note(ax) -> None:
  ax.text(0.5, 0.5, 'undefined: only one class', ha='center', va='center', transform=ax.transAxes)


def roc_figure(labels, probs, entry: Mapping, title: str, pct: int, path: str,
               operating_points: Mapping[str, float] = ()) -> str:
  """ROC curve with the AUROC [CI] and a marker at each named threshold (sensitivity, 1 − specificity)."""
  fig = Figure(figsize=(5, 5), dpi=110)
  ax = fig.subplots()
  ax.plot([0, 1], [0, 1], ls='--', color='grey', lw=1, label='chance')
  if len(np.unique(labels)) == 2:
    fpr, tpr, _ = skm.roc_curve(labels, probs)
    ax.plot(fpr, tpr, lw=2, label=f"AUROC {ci_text(entry)}".replace('[', f'[{pct}% CI '))
    for (name, t), marker in zip(dict(operating_points).items(), 'os^D'):
      pred = np.asarray(probs) >= t
      sens = np.mean(pred[np.asarray(labels) == 1])
      fp_rate = np.mean(pred[np.asarray(labels) == 0])
      ax.plot([fp_rate], [sens], marker, ms=8, mfc='none', mew=2,
              label=f'{name} threshold {t:.3f}: sens {sens:.2f}, spec {1 - fp_rate:.2f}')
  else:
    _one_class_note(ax)
  ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel='1 − specificity (false-positive rate)',
         ylabel='Sensitivity (true-positive rate)', title=f'{title}\nROC curve, study level')
  ax.legend(loc='lower right', fontsize=7)
  return _save(fig, path)


def pr_figure(labels, probs, entry: Mapping, title: str, pct: int, path: str) -> str:
  fig = Figure(figsize=(5, 5), dpi=110)
  ax = fig.subplots()
  if len(np.unique(labels)) == 2:
    precision, recall, _ = skm.precision_recall_curve(labels, probs)
    ax.step(recall, precision, where='post', lw=2, label=f"AP {ci_text(entry)}".replace('[', f'[{pct}% CI '))
  else:
    _one_class_note(ax)
  prevalence = float(np.mean(np.asarray(labels) == 1))
  ax.axhline(prevalence, ls='--', color='grey', lw=1, label=f'prevalence {prevalence:.3f}')
  ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel='Recall (sensitivity)', ylabel='Precision (PPV)',
         title=f'{title}\nprecision–recall curve, study level')
  ax.legend(loc='lower left', fontsize=8)
  return _save(fig, path)


def confusion_figure(labels, preds, class_names: Sequence[str], title: str, subtitle: str, path: str) -> str:
  k = len(class_names)
  fig = Figure(figsize=(4.5 + 0.4 * max(k - 2, 0), 4 + 0.4 * max(k - 2, 0)), dpi=110)
  ax = fig.subplots()
  skm.ConfusionMatrixDisplay.from_predictions(labels, preds, labels=list(range(k)),
                                              display_labels=list(class_names), ax=ax, colorbar=False,
                                              cmap='Blues')
  ax.set_title(f'{title}\n{subtitle}')
  return _save(fig, path)


def reliability_figure(labels, probs, metrics: Mapping, title: str, path: str) -> str:
  """Reliability diagram (observed fraction vs mean predicted per bin, with bin counts) and the calibration
  metrics; a histogram of the predictions below."""
  fig = Figure(figsize=(5, 6), dpi=110)
  ax, hist = fig.subplots(2, 1, sharex=True, gridspec_kw={'height_ratios': [3, 1]})
  ax.plot([0, 1], [0, 1], ls='--', color='grey', lw=1, label='perfect calibration')
  if len(np.unique(labels)) >= 1 and len(labels):
    predicted, observed, counts = calibration.reliability_curve(labels, probs)
    ax.plot(predicted, observed, 'o-', lw=2, label='model (10 equal-width bins)')
    for x, y, n in zip(predicted, observed, counts):
      ax.annotate(str(n), (x, y), textcoords='offset points', xytext=(4, -10), fontsize=7)
  text = '\n'.join(f'{name}: {ci_text(metrics.get(key))}' for key, name in (
      ('brier', 'Brier'), ('ece', 'ECE'), ('calibration_intercept', 'intercept'),
      ('calibration_slope', 'slope')))
  ax.text(0.02, 0.98, text, transform=ax.transAxes, va='top', fontsize=7, family='monospace',
          bbox=dict(fc='white', ec='lightgrey'))
  ax.set(xlim=(0, 1), ylim=(0, 1.02), ylabel='Observed fraction positive',
         title=f'{title}\nreliability diagram, study level')
  ax.legend(loc='lower right', fontsize=7)
  hist.hist(np.asarray(probs), bins=np.linspace(0, 1, 21), color='tab:blue', alpha=0.7)
  hist.set(xlabel='Predicted probability', ylabel='studies')
  return _save(fig, path)


def decision_curve_figure(labels, probs, title: str, path: str, threshold: Optional[float] = None) -> str:
  curve = decision_curve.decision_curve(labels, probs)
  fig = Figure(figsize=(5.5, 4.5), dpi=110)
  ax = fig.subplots()
  ax.plot(curve['thresholds'], curve['model'], lw=2, label='model')
  ax.plot(curve['thresholds'], curve['treat_all'], lw=1, color='tab:orange', label='treat all')
  ax.plot(curve['thresholds'], curve['treat_none'], lw=1, color='black', label='treat none')
  if threshold is not None and 0 < threshold < 1:
    ax.axvline(threshold, ls=':', color='grey', label=f'chosen threshold {threshold:.3f}')
  prevalence = float(np.mean(np.asarray(labels) == 1))
  ax.set(xlim=(0, 1), ylim=(-0.05, max(prevalence, 0.05) * 1.15), xlabel='Threshold probability',
         ylabel='Net benefit', title=f'{title}\ndecision curve, study level')
  ax.legend(fontsize=7)
  return _save(fig, path)


def scatter_figure(labels, preds, metrics: Mapping, title: str, unit: str, path: str) -> str:
  fig = Figure(figsize=(5, 5), dpi=110)
  ax = fig.subplots()
  labels, preds = np.asarray(labels), np.asarray(preds)
  lo, hi = float(min(labels.min(), preds.min())), float(max(labels.max(), preds.max()))
  ax.plot([lo, hi], [lo, hi], ls='--', color='grey', lw=1, label='identity')
  ax.scatter(labels, preds, s=12, alpha=0.7)
  ax.set(xlabel=f'True {unit}', ylabel=f'Predicted {unit}', title=f'{title}\npredicted vs true, study level')
  ax.text(0.02, 0.98, '\n'.join(f'{k.upper()}: {ci_text(metrics.get(k), 2)}' for k in ('mae', 'rmse', 'r2')),
          transform=ax.transAxes, va='top', fontsize=7, family='monospace', bbox=dict(fc='white', ec='lightgrey'))
  ax.legend(loc='lower right', fontsize=7)
  return _save(fig, path)


def bland_altman_figure(labels, preds, metrics: Mapping, title: str, unit: str, path: str) -> str:
  """Difference (predicted − true) against the mean of the two, with the bias and 95 % limits of agreement."""
  fig = Figure(figsize=(5.5, 4.5), dpi=110)
  ax = fig.subplots()
  labels, preds = np.asarray(labels), np.asarray(preds)
  ax.scatter((labels + preds) / 2, preds - labels, s=12, alpha=0.7)
  for key, style, name in (('bias', '-', 'bias'), ('loa_low', '--', '−1.96 SD'), ('loa_high', '--', '+1.96 SD')):
    value = (metrics.get(key) or {}).get('value')
    if value is not None:
      ax.axhline(value, ls=style, color='tab:red', lw=1, label=f'{name} {ci_text(metrics[key], 2)}')
  ax.axhline(0, color='grey', lw=0.5)
  ax.set(xlabel=f'Mean of predicted and true {unit}', ylabel=f'Predicted − true {unit}',
         title=f'{title}\nBland–Altman, study level')
  ax.legend(fontsize=7)
  return _save(fig, path)
