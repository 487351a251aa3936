"""Calibration metrics, recalibrators and the decision curve against scikit-learn / scipy references."""
import json

import numpy as np
import pytest
from scipy import optimize, special
from sklearn import calibration as skcal
from sklearn import isotonic, metrics as skm

from echojax.evaluation import bootstrap as ev
from echojax.evaluation import calibration, decision_curve


def _miscalibrated(seed=0, n=400, slope=2.0, shift=-0.5):
  """Labels drawn from σ(z); predictions σ((z − shift)/slope): over-confident-inverse and shifted."""
  rng = np.random.default_rng(seed)
  z = rng.normal(0, 1.5, n)
  labels = (rng.random(n) < special.expit(z)).astype(int)
  return labels, special.expit((z - shift) / slope)


def _scipy_logistic(x, y, w, fit_slope):
  def nll(theta):
    eta = theta[0] + (theta[1] if fit_slope else 1.0) * x
    return -np.sum(w * (y * eta - np.logaddexp(0, eta)))
  res = optimize.minimize(nll, [0.0, 1.0] if fit_slope else [0.0], method='BFGS', options={'gtol': 1e-10})
  return res.x


def test_brier_ece_and_reliability_curve_equal_scikit_learn():
  labels, probs = _miscalibrated()
  probs[:20] = np.round(probs[:20], 1)   # values on the bin edges go where sklearn puts them
  values, reasons = calibration.calibration_metrics(labels, probs)
  assert reasons == {}
  assert values['brier'] == pytest.approx(skm.brier_score_loss(labels, probs), rel=1e-12)
  observed, predicted = skcal.calibration_curve(labels, probs, n_bins=10, strategy='uniform')
  mean_pred, frac_pos, counts = calibration.reliability_curve(labels, probs)
  np.testing.assert_allclose(mean_pred, predicted)
  np.testing.assert_allclose(frac_pos, observed)
  assert counts.sum() == len(labels)
  # ECE = Σ_bins (n_bin / n)·|observed − predicted| over sklearn's bins.
  assert values['ece'] == pytest.approx(np.sum(counts / len(labels) * np.abs(observed - predicted)), rel=1e-10)


def test_calibration_slope_and_intercept_equal_scipy_maximum_likelihood():
  labels, probs = _miscalibrated(slope=2.0)
  values, _ = calibration.calibration_metrics(labels, probs)
  x = special.logit(probs)
  w = np.ones(len(labels))
  a, b = _scipy_logistic(x, labels, w, fit_slope=True)
  (a1,) = _scipy_logistic(x, labels, w, fit_slope=False)
  assert values['calibration_slope'] == pytest.approx(b, rel=1e-5)
  assert values['calibration_intercept'] == pytest.approx(a1, abs=1e-5)
  assert 1.5 < values['calibration_slope'] < 2.6   # the predictions were made twice too flat
  # Perfectly calibrated (labels drawn from the predictions): slope ≈ 1, intercept ≈ 0.
  rng = np.random.default_rng(5)
  p = rng.uniform(0.02, 0.98, 5000)
  good, _ = calibration.calibration_metrics((rng.random(5000) < p).astype(int), p)
  assert good['calibration_slope'] == pytest.approx(1.0, abs=0.12)
  assert good['calibration_intercept'] == pytest.approx(0.0, abs=0.1)
  assert good['ece'] < 0.03


def test_vectorised_resamples_equal_weighted_point_metrics():
  labels, probs = _miscalibrated(seed=1, n=150)
  rng = np.random.default_rng(2)
  weights = ev.resample_weights(rng.integers(0, 150, (5, 150)), 150)
  resampled = calibration.calibration_resamples(labels, probs, weights)
  x = special.logit(probs)
  for b, w in enumerate(weights):
    assert resampled['brier'][b] == pytest.approx(skm.brier_score_loss(labels, probs, sample_weight=w))
    observed, predicted = skcal.calibration_curve(np.repeat(labels, w.astype(int)),
                                                  np.repeat(probs, w.astype(int)), n_bins=10)
    counts = np.bincount(calibration.ece_bins(np.repeat(probs, w.astype(int))), minlength=10)
    counts = counts[counts > 0]
    assert resampled['ece'][b] == pytest.approx(np.sum(counts / w.sum() * np.abs(observed - predicted)))
    a, slope = _scipy_logistic(x, labels, w, True)
    assert resampled['calibration_slope'][b] == pytest.approx(slope, rel=1e-5)
    (a1,) = _scipy_logistic(x, labels, w, False)
    assert resampled['calibration_intercept'][b] == pytest.approx(a1, abs=1e-5)


def test_separated_classes_give_undefined_slope_with_reason():
  values, reasons = calibration.calibration_metrics([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9])
  assert np.isnan(values['calibration_slope']) and 'separated' in reasons['calibration_slope']
  values, reasons = calibration.calibration_metrics([0, 0, 0], [0.1, 0.2, 0.3])
  assert 'one class' in reasons['calibration_intercept'] and values['brier'] == pytest.approx(14 / 300)


def test_platt_recalibration_is_the_logistic_fit_and_improves_held_out_calibration():
  labels, probs = _miscalibrated(seed=3, n=600)
  platt = calibration.Recalibrator.fit('platt', labels[:300], probs[:300])
  a, b = _scipy_logistic(special.logit(probs[:300]), labels[:300], np.ones(300), True)
  assert platt.params['intercept'] == pytest.approx(a, abs=1e-5)
  assert platt.params['slope'] == pytest.approx(b, rel=1e-5)
  before, _ = calibration.calibration_metrics(labels[300:], probs[300:])
  after, _ = calibration.calibration_metrics(labels[300:], platt(probs[300:]))
  assert after['ece'] < before['ece'] and after['brier'] < before['brier']
  assert after['calibration_slope'] == pytest.approx(1.0, abs=0.35)
  # Monotone: the ranking (AUROC) is unchanged.
  assert skm.roc_auc_score(labels, platt(probs)) == pytest.approx(skm.roc_auc_score(labels, probs))


def test_isotonic_recalibration_equals_scikit_learn_and_round_trips_through_json():
  labels, probs = _miscalibrated(seed=4, n=300)
  iso = calibration.Recalibrator.fit('isotonic', labels, probs)
  reference = isotonic.IsotonicRegression(y_min=0, y_max=1, out_of_bounds='clip').fit(probs, labels)
  grid = np.linspace(0, 1, 101)
  np.testing.assert_allclose(iso(grid), reference.predict(grid), atol=1e-12)
  restored = calibration.Recalibrator.from_dict(json.loads(json.dumps(iso.to_dict())))
  np.testing.assert_allclose(restored(grid), iso(grid))
  assert restored.calibrated and not calibration.Recalibrator.from_dict(None).calibrated
  with pytest.raises(ValueError, match='both classes'):
    calibration.Recalibrator.fit('platt', [1, 1], [0.2, 0.3])
  with pytest.raises(ValueError, match='one of'):
    calibration.Recalibrator('beta')


def test_net_benefit_matches_its_definition():
  labels, probs = _miscalibrated(seed=6, n=200)
  curve = decision_curve.decision_curve(labels, probs, [0.1, 0.3, 0.5])
  for t, nb in zip(curve['thresholds'], curve['model']):
    treat = probs >= t
    tp, fp = np.sum(treat & (labels == 1)), np.sum(treat & (labels == 0))
    assert nb == pytest.approx(tp / 200 - fp / 200 * t / (1 - t))
  prevalence = labels.mean()
  np.testing.assert_allclose(curve['treat_all'], prevalence - (1 - prevalence) * np.array([1 / 9, 3 / 7, 1]))
  # A model that flags everyone has the treat-all benefit.
  everyone = decision_curve.net_benefit(labels, np.ones(200), [0.2])
  assert everyone[0] == pytest.approx(decision_curve.treat_all_benefit(labels, [0.2])[0])
  with pytest.raises(ValueError, match=r'\(0, 1\)'):
    decision_curve.decision_curve(labels, probs, [0.0, 0.5])


def test_binary_summary_has_calibration_with_cis_and_npv():
  labels, probs = _miscalibrated(seed=7, n=120)
  ids = [f's{i}' for i in range(120)]
  videos, studies = ev.aggregate_predictions(probs, ids, ids, labels, outputs='probs')
  summary = ev.evaluate_split(videos, studies, threshold=0.4, n_resamples=200)
  metrics = summary['study']['metrics']
  for name in calibration.CALIBRATION_METRICS + ('npv@chosen',):
    lo, hi = metrics[name]['ci95']
    assert lo <= metrics[name]['value'] <= hi, name
  tn, fp, fn, tp = skm.confusion_matrix(labels, probs >= 0.4).ravel()
  assert metrics['npv@chosen']['value'] == pytest.approx(tn / (tn + fn))
  assert 'note' not in metrics['auroc']   # dozens of events on each side
