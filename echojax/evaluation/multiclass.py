"""Multi-class metrics of study (or video) class probabilities, e.g. AS grade none/mild/moderate/severe:
macro one-vs-rest AUROC, per-class AUROC, accuracy, balanced accuracy and quadratic-weighted Cohen's kappa of
the arg-max class, and the confusion matrix (scikit-learn); plus the same statistics vectorised over bootstrap
weight rows (B, n), equal to scikit-learn with sample_weight (tested)."""
from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from echojax.evaluation.metrics import _metrics_of_resamples, _sorted_rows

MULTICLASS_METRICS = ('macro_auroc', 'accuracy', 'balanced_accuracy', 'quadratic_kappa')


def _arrays(labels, probs):
  labels, probs = np.asarray(labels).reshape(-1), np.asarray(probs, np.float64)
  if probs.ndim != 2 or probs.shape[0] != labels.shape[0] or probs.shape[1] < 2:
    raise ValueError(f'multiclass: probabilities must be (n, K >= 2) matching {labels.shape[0]} labels, '
                     f'got {probs.shape}')
  if not np.isin(labels, np.arange(probs.shape[1])).all():
    raise ValueError(f'multiclass: labels must be 0..{probs.shape[1] - 1}, got '
                     f'{sorted(set(labels.tolist()) - set(range(probs.shape[1])))[:5]}')
  return labels.astype(np.int64), probs


def confusion(labels, probs) -> np.ndarray:
  """K×K confusion matrix (rows: true class, columns: arg-max prediction)."""
  labels, probs = _arrays(labels, probs)
  return skm.confusion_matrix(labels, probs.argmax(1), labels=np.arange(probs.shape[1]))


def multiclass_metrics(labels, probs, class_names=None, sample_weight=None):
  """(values, reasons): MULTICLASS_METRICS plus auroc_<class> for each class; NaN with a reason where
  undefined. The macro AUROC averages the classes that have both positives and negatives in the split."""
  labels, probs = _arrays(labels, probs)
  k = probs.shape[1]
  names = list(class_names or range(k))
  preds = probs.argmax(1)
  values, reasons = {}, {}
  present = [c for c in range(k) if 0 < (labels == c).sum() < len(labels)]
  for c in range(k):
    key = f'auroc_{names[c]}'
    if c in present:
      values[key] = skm.roc_auc_score(labels == c, probs[:, c], sample_weight=sample_weight)
    else:
      values[key] = np.nan
      reasons[key] = f'class {names[c]} has no {"studies" if (labels == c).sum() == 0 else "other-class studies"}'
  if len(present) == k:
    values['macro_auroc'] = skm.roc_auc_score(labels, probs, multi_class='ovr', average='macro',
                                              sample_weight=sample_weight, labels=np.arange(k))
  elif len(present) >= 1:
    values['macro_auroc'] = float(np.mean([values[f'auroc_{names[c]}'] for c in present]))
    reasons['macro_auroc'] = ('over the classes present only (' + ', '.join(str(names[c]) for c in present)
                              + ')')
  else:
    values['macro_auroc'] = np.nan
    reasons['macro_auroc'] = 'only one class in this split'
  values['accuracy'] = skm.accuracy_score(labels, preds, sample_weight=sample_weight)
  values['balanced_accuracy'] = skm.balanced_accuracy_score(labels, preds, sample_weight=sample_weight)
  values['quadratic_kappa'] = skm.cohen_kappa_score(labels, preds, weights='quadratic', labels=np.arange(k),
                                                    sample_weight=sample_weight)
  return {key: float(v) for key, v in values.items()}, reasons


def multiclass_resamples(labels, probs, weights, class_names=None) -> dict[str, np.ndarray]:
  """The metrics of `multiclass_metrics` for each weight row (B, n) (units: rows are resampled as drawn)."""
  labels, probs = _arrays(labels, probs)
  k = probs.shape[1]
  names = list(class_names or range(k))
  w = np.atleast_2d(weights).astype(np.float64)
  units = np.arange(len(labels))
  out = {}
  for c in range(k):
    rows = _sorted_rows((labels == c).astype(int), probs[:, c], units)
    out[f'auroc_{names[c]}'] = _metrics_of_resamples(rows, w, {})['auroc']
  with np.errstate(invalid='ignore'):
    out['macro_auroc'] = np.nanmean(np.stack([out[f'auroc_{n}'] for n in names]), axis=0)
  onehot = np.eye(k)
  observed = np.einsum('bi,ik,il->bkl', w, onehot[labels], onehot[probs.argmax(1)])   # (B, K, K)
  total = observed.sum((1, 2))
  true_count, pred_count = observed.sum(2), observed.sum(1)
  expected = true_count[:, :, None] * pred_count[:, None, :] / total[:, None, None]
  quad = (np.arange(k)[:, None] - np.arange(k)[None, :]) ** 2 / (k - 1) ** 2
  with np.errstate(divide='ignore', invalid='ignore'):
    out['accuracy'] = np.trace(observed, axis1=1, axis2=2) / total
    recall = np.diagonal(observed, axis1=1, axis2=2) / true_count
    out['balanced_accuracy'] = np.nanmean(np.where(true_count > 0, recall, np.nan), axis=1)
    out['quadratic_kappa'] = 1 - (quad * observed).sum((1, 2)) / (quad * expected).sum((1, 2))
  return out
