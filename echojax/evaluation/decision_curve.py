"""Decision-curve analysis (Vickers & Elkin 2006): the net benefit of acting on `prob >= t` over threshold
probabilities t, against treating everyone and no one. Net benefit = TP/n − FP/n · t/(1 − t)."""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def net_benefit(labels, probs, thresholds) -> np.ndarray:
  """Net benefit of the model at each threshold probability (confusion counts from scikit-learn)."""
  labels, probs = np.asarray(labels).astype(int), np.asarray(probs, np.float64)
  out = []
  for t in np.asarray(thresholds, np.float64):
    tn, fp, fn, tp = skm.confusion_matrix(labels, (probs >= t).astype(int), labels=[0, 1]).ravel()
    out.append(tp / len(labels) - fp / len(labels) * t / (1 - t))
  return np.asarray(out)


def treat_all_benefit(labels, thresholds) -> np.ndarray:
  prevalence = float(np.mean(np.asarray(labels) == 1))
  t = np.asarray(thresholds, np.float64)
  return prevalence - (1 - prevalence) * t / (1 - t)


def decision_curve(labels, probs, thresholds=None) -> dict:
  """{'thresholds', 'model', 'treat_all', 'treat_none'} over 1 %..99 % (or the given thresholds)."""
  thresholds = np.linspace(0.01, 0.99, 99) if thresholds is None else np.asarray(thresholds, np.float64)
  if (thresholds <= 0).any() or (thresholds >= 1).any():
    raise ValueError('decision-curve thresholds must lie in (0, 1)')
  return {'thresholds': thresholds, 'model': net_benefit(labels, probs, thresholds),
          'treat_all': treat_all_benefit(labels, thresholds), 'treat_none': np.zeros_like(thresholds)}
