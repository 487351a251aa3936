"""Regression metrics of study (or video) predictions, e.g. ejection fraction: MAE, RMSE, R² (scikit-learn)
and the Bland–Altman bias with 95 % limits of agreement; plus the same statistics vectorised over bootstrap
weight rows (B, n), equal to the weighted point values (tested against scikit-learn's sample_weight)."""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

REGRESSION_METRICS = ('mae', 'rmse', 'r2', 'bias', 'loa_low', 'loa_high')


def _arrays(labels, preds):
  labels, preds = np.asarray(labels, np.float64).reshape(-1), np.asarray(preds, np.float64)
  if preds.shape != labels.shape:
    raise ValueError(f'regression: predictions {preds.shape} do not match labels {labels.shape}')
  if not (np.isfinite(labels).all() and np.isfinite(preds).all()):
    raise ValueError('regression: labels and predictions must be finite (drop missing targets first)')
  return labels, preds


def regression_metrics(labels, preds, sample_weight=None) -> tuple[dict[str, float], dict[str, str]]:
  """MAE, RMSE, R² (scikit-learn) and Bland–Altman bias = mean(pred − label), LoA = bias ± 1.96·sd."""
  labels, preds = _arrays(labels, preds)
  values = {
      'mae': skm.mean_absolute_error(labels, preds, sample_weight=sample_weight),
      'rmse': skm.root_mean_squared_error(labels, preds, sample_weight=sample_weight),
  }
  reasons = {}
  if len(labels) < 2 or np.ptp(labels) == 0:
    values['r2'] = np.nan
    reasons['r2'] = 'undefined: the targets do not vary'
  else:
    values['r2'] = skm.r2_score(labels, preds, sample_weight=sample_weight)
  w = np.ones_like(labels) if sample_weight is None else np.asarray(sample_weight, np.float64)
  diff = preds - labels
  bias = np.average(diff, weights=w)
  sd = np.sqrt(np.average((diff - bias) ** 2, weights=w) * w.sum() / max(w.sum() - 1, 1))
  values.update(bias=bias, loa_low=bias - 1.96 * sd, loa_high=bias + 1.96 * sd)
  return {k: float(v) for k, v in values.items()}, reasons


def regression_resamples(labels, preds, weights) -> dict[str, np.ndarray]:
  """REGRESSION_METRICS for each weight row (B, n); NaN where undefined."""
  y, p = _arrays(labels, preds)
  w = np.atleast_2d(weights).astype(np.float64)
  total = w.sum(1)
  diff = p - y
  with np.errstate(divide='ignore', invalid='ignore'):
    mse = (w * diff ** 2).sum(1) / total
    y_mean = (w @ y) / total
    ss_tot = (w * (y - y_mean[:, None]) ** 2).sum(1)
    bias = (w @ diff) / total
    sd = np.sqrt((w * (diff - bias[:, None]) ** 2).sum(1) / np.maximum(total - 1, 1))
    return {'mae': (w @ np.abs(diff)) / total, 'rmse': np.sqrt(mse),
            'r2': np.where(ss_tot > 0, 1 - mse * total / ss_tot, np.nan),
            'bias': bias, 'loa_low': bias - 1.96 * sd, 'loa_high': bias + 1.96 * sd}
