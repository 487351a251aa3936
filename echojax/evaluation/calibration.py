"""Calibration of binary study probabilities: Brier score, ECE, reliability curve, calibration slope and
intercept (logistic recalibration), and Platt / isotonic recalibrators fitted on validation and stored as JSON.

Every statistic also has a vectorised form over bootstrap resamples (weights (B, n), the number of times each
row is drawn), equal to the weighted point statistic; tests check both against scikit-learn / scipy.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

import numpy as np
from scipy import special
from sklearn import calibration as skcal
from sklearn import isotonic, metrics as skm

CALIBRATION_METRICS = ('brier', 'ece', 'calibration_intercept', 'calibration_slope')
RECALIBRATION_METHODS = ('none', 'platt', 'isotonic')
ECE_BINS = 10
_EPS = 1e-6            # probabilities are clipped to [eps, 1-eps] before the logit
_NEWTON_STEPS = 50


def _logit(probs) -> np.ndarray:
  return special.logit(np.clip(np.asarray(probs, np.float64), _EPS, 1 - _EPS))


def ece_bins(probs, n_bins: int = ECE_BINS) -> np.ndarray:
  """Equal-width bin of each probability, exactly as sklearn's calibration_curve(strategy='uniform')."""
  edges = np.linspace(0.0, 1.0, n_bins + 1)
  return np.searchsorted(edges[1:-1], np.asarray(probs, np.float64))


def reliability_curve(labels, probs, n_bins: int = ECE_BINS):
  """(mean predicted, observed fraction, count) of each non-empty equal-width bin (sklearn's bins)."""
  labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
  observed, predicted = skcal.calibration_curve(labels, probs, n_bins=n_bins, strategy='uniform')
  counts = np.bincount(ece_bins(probs, n_bins), minlength=n_bins)
  return predicted, observed, counts[counts > 0]


def _weighted_logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray, fit_slope: bool):
  """Weighted ML fit of logit P(y=1) = a + b·x (b fixed at 1 when not fit_slope), by Newton's method,
  for B weight rows at once: w (B, n) → (a (B,), b (B,)); NaN where it does not converge (separation)."""
  w = np.atleast_2d(w).astype(np.float64)
  a = np.zeros(len(w))
  b = np.ones(len(w))
  converged = np.zeros(len(w), bool)
  for _ in range(_NEWTON_STEPS):
    with np.errstate(over='ignore', invalid='ignore'):   # separated resamples diverge: NaN below
      mu = special.expit(a[:, None] + b[:, None] * x)
    resid = w * (y - mu)
    curv = w * mu * (1 - mu)
    if fit_slope:
      g = np.stack([resid.sum(1), (resid * x).sum(1)], -1)
      h00, h01, h11 = curv.sum(1), (curv * x).sum(1), (curv * x * x).sum(1)
      det = h00 * h11 - h01 ** 2
      with np.errstate(divide='ignore', invalid='ignore'):
        da = (h11 * g[:, 0] - h01 * g[:, 1]) / det
        db = (h00 * g[:, 1] - h01 * g[:, 0]) / det
    else:
      with np.errstate(divide='ignore', invalid='ignore'):
        da, db = resid.sum(1) / curv.sum(1), np.zeros(len(w))
    a, b = a + np.nan_to_num(da), b + np.nan_to_num(db)
    with np.errstate(invalid='ignore'):
      converged = (np.abs(da) < 1e-10) & (np.abs(db) < 1e-10)
    if converged.all():
      break
  bad = ~converged | (np.abs(a) > 1e3) | (np.abs(b) > 1e3)
  return np.where(bad, np.nan, a), np.where(bad, np.nan, b)


def calibration_resamples(labels, probs, weights) -> dict[str, np.ndarray]:
  """Brier, ECE, calibration intercept (slope fixed at 1) and slope for each weight row (B, n)."""
  y = (np.asarray(labels) == 1).astype(np.float64)
  p = np.asarray(probs, np.float64)
  w = np.atleast_2d(weights).astype(np.float64)
  total = w.sum(1)
  with np.errstate(divide='ignore', invalid='ignore'):
    brier = (w * (p - y) ** 2).sum(1) / total
    bins = np.eye(ECE_BINS)[ece_bins(p)]                          # (n, bins)
    ece = np.abs((w * (y - p)) @ bins).sum(1) / total
  x = _logit(p)
  intercept, _ = _weighted_logistic(x, y, w, fit_slope=False)
  _, slope = _weighted_logistic(x, y, w, fit_slope=True)
  return {'brier': brier, 'ece': ece, 'calibration_intercept': intercept, 'calibration_slope': slope}


def calibration_metrics(labels, probs, sample_weight=None) -> tuple[dict[str, float], dict[str, str]]:
  """Point values (and reasons where undefined) of CALIBRATION_METRICS; Brier is scikit-learn's."""
  labels = np.asarray(labels)
  w = np.ones(len(labels)) if sample_weight is None else np.asarray(sample_weight, np.float64)
  values = {k: float(v[0]) for k, v in calibration_resamples(labels, probs, w[None]).items()}
  values['brier'] = float(skm.brier_score_loss(labels, probs, sample_weight=sample_weight, pos_label=1))
  reasons = {}
  n_pos = int((w * (labels == 1)).sum())
  for name in ('calibration_intercept', 'calibration_slope'):
    if n_pos == 0 or n_pos == int(w.sum()):
      reasons[name] = 'only one class in this split'
    elif math.isnan(values[name]):
      reasons[name] = 'logistic fit did not converge (classes separated)'
  return values, reasons


class Recalibrator:
  """A monotone map of raw probabilities fitted on validation: 'platt' (logistic on the logit) or
  'isotonic' (sklearn, clipped to [0, 1] outside the fitted range); 'none' is the identity."""

  def __init__(self, method: str = 'none', params: Optional[Mapping] = None):
    if method not in RECALIBRATION_METHODS:
      raise ValueError(f'calibration method must be one of {RECALIBRATION_METHODS}, got {method!r}')
    self.method, self.params = method, dict(params or {})

  @classmethod
  def fit(cls, method: str, labels, probs) -> 'Recalibrator':
    labels = np.asarray(labels).astype(np.float64)
    if method != 'none' and len(set(labels.tolist())) < 2:
      raise ValueError(f'{method} recalibration needs both classes; all {len(labels)} labels are {labels[0]:g}')
    if method == 'platt':
      a, b = _weighted_logistic(_logit(probs), labels, np.ones((1, len(labels))), fit_slope=True)
      if math.isnan(a[0]):
        raise ValueError('Platt scaling did not converge: the validation classes are perfectly separated')
      return cls('platt', {'intercept': float(a[0]), 'slope': float(b[0])})
    if method == 'isotonic':
      iso = isotonic.IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds='clip').fit(probs, labels)
      return cls('isotonic', {'x': iso.X_thresholds_.tolist(), 'y': iso.y_thresholds_.tolist()})
    return cls(method)

  def __call__(self, probs) -> np.ndarray:
    probs = np.asarray(probs, np.float64)
    if self.method == 'platt':
      return special.expit(self.params['intercept'] + self.params['slope'] * _logit(probs))
    if self.method == 'isotonic':
      return np.interp(probs, self.params['x'], self.params['y'])  # IsotonicRegression.predict's rule
    return probs

  @property
  def calibrated(self) -> bool:
    return self.method != 'none'

  def to_dict(self) -> dict:
    return {'method': self.method, 'params': self.params}

  @classmethod
  def from_dict(cls, d: Optional[Mapping]) -> 'Recalibrator':
    return cls() if not d else cls(d['method'], d.get('params'))
