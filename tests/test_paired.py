"""Tests of the paired AUROC comparison: DeLong against an O(n²) reference written independently from the
1988 paper's structural components (generated data only, no clinical data set), AUROC = scikit-learn, the
paired bootstrap against a slow loop on the same resamples, identical predictions, the null calibration, the
seed pooling and the study alignment."""
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from echojax.evaluation import paired
from echojax.evaluation.bootstrap import study_bootstrap
from echojax.evaluation.metrics import StudyTable, bootstrap_metric_values


def _psi(cases, controls):
  """DeLong et al. 1988's kernel ψ(X, Y): 1 if X > Y, 1/2 if equal, 0 otherwise, (m, n)."""
  return (cases[:, None] > controls[None]) + 0.5 * (cases[:, None] == controls[None])


def _delong_1988(labels, scores):
  """DeLong, DeLong & Clarke-Pearson (1988), §2 written out: θ̂ = ΣΣψ/mn, V10(X_i) = Σ_j ψ/n,
  V01(Y_j) = Σ_i ψ/m, S10 and S01 with m − 1 and n − 1, S = S10/m + S01/n. O(k·m·n)."""
  cases, controls = scores[:, labels == 1], scores[:, labels == 0]
  m, n = cases.shape[1], controls.shape[1]
  psi = np.stack([_psi(c, d) for c, d in zip(cases, controls)])  # (k, m, n)
  theta = psi.sum((1, 2)) / (m * n)
  v10, v01 = psi.sum(2) / n, psi.sum(1) / m
  s10 = (v10 - theta[:, None]) @ (v10 - theta[:, None]).T / (m - 1)
  s01 = (v01 - theta[:, None]) @ (v01 - theta[:, None]).T / (n - 1)
  return theta, s10 / m + s01 / n


def _correlated_models(seed, n=120, prevalence=0.3, k=3, decimals=1):
  rng = np.random.default_rng(seed)
  labels = (rng.random(n) < prevalence).astype(int)
  labels[:2] = [0, 1]
  shared = rng.normal(size=n)  # what every model sees: the pairing the tests must respect
  scores = np.stack([labels * (0.4 + 0.3 * j) + shared + 0.7 * rng.normal(size=n) for j in range(k)])
  return labels, np.round(scores, decimals)  # rounding makes ties within and across classes


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_delong_equals_the_structural_components_of_the_1988_paper(seed):
  labels, scores = _correlated_models(seed)
  aurocs, covariance = paired.delong(labels, scores)
  theta, s = _delong_1988(labels, scores)
  np.testing.assert_allclose(aurocs, theta, rtol=1e-12)
  np.testing.assert_allclose(covariance, s, rtol=1e-10, atol=1e-15)
  for j in range(len(scores)):
    assert aurocs[j] == pytest.approx(skm.roc_auc_score(labels, scores[j]), abs=1e-12)
  summary, _ = paired.compare_aurocs(labels, scores[0], scores[1], n_resamples=10)
  assert summary['auroc_a'] == pytest.approx(skm.roc_auc_score(labels, scores[0]), abs=1e-12)
  assert summary['difference'] == pytest.approx(summary['delong']['difference'], abs=1e-12)


def test_identical_predictions_give_zero_difference_ci_zero_and_p_one():
  labels, scores = _correlated_models(3)
  for other in (scores[0], np.exp(scores[0])):  # the same scores, or the same ranking
    summary, distribution = paired.compare_aurocs(labels, scores[0], other, n_resamples=200)
    assert summary['difference'] == 0
    assert summary['bootstrap']['ci'] == [0.0, 0.0]
    np.testing.assert_array_equal(distribution, 0)
    assert summary['delong']['p_value'] == 1.0 and summary['delong']['z'] == 0.0
    assert summary['delong']['ci'] == [0.0, 0.0]


def _resample_weights(labels, n_resamples, seed, resampling):
  """The (B, n) study counts of each resample `paired_auroc_differences` draws: the same study_bootstrap
  call, with a statistic that hands the weights back."""
  strata = labels if resampling == 'stratified' else None
  return study_bootstrap(lambda w: w.T, len(labels), strata=strata, n_resamples=n_resamples, seed=seed).T


@pytest.mark.parametrize('resampling', ['stratified', 'simple'])
def test_paired_bootstrap_equals_a_slow_loop_on_the_same_resamples(resampling):
  labels, scores = _correlated_models(4, n=30, prevalence=0.1)  # 2 positives: one-class resamples
  fast = paired.paired_auroc_differences(labels, scores[0], scores[1], n_resamples=300, seed=5,
                                         resampling=resampling)
  slow = []
  for counts in _resample_weights(labels, 300, 5, resampling):
    idx = np.repeat(np.arange(len(labels)), counts.astype(int))
    y = labels[idx]
    slow.append(np.nan if len(set(y)) < 2 else
                skm.roc_auc_score(y, scores[0][idx]) - skm.roc_auc_score(y, scores[1][idx]))
  np.testing.assert_allclose(fast, slow, rtol=1e-10, atol=1e-12)
  positives_drawn = _resample_weights(labels, 300, 5, resampling) @ labels
  if resampling == 'stratified':  # every resample keeps the class counts, so none is one-class
    assert (positives_drawn == labels.sum()).all() and np.isfinite(slow).all()
  else:
    assert len(set(positives_drawn)) > 2 and np.isnan(slow).any()
  summary, distribution = paired.compare_aurocs(labels, scores[0], scores[1], n_resamples=300, seed=5,
                                                resampling=resampling)
  np.testing.assert_array_equal(distribution, fast)
  used = np.asarray(slow)[np.isfinite(slow)]
  assert summary['bootstrap']['ci'] == pytest.approx(list(np.quantile(used, [0.025, 0.975])))
  assert summary['bootstrap']['n_resamples_used'] == used.size


def test_pairing_narrows_the_interval_of_correlated_models():
  labels, scores = _correlated_models(6, n=200)
  summary, distribution = paired.compare_aurocs(labels, scores[1], scores[2], n_resamples=1000)
  # Unpaired: each model on its own resamples, which discards the case difficulty both share.
  def aurocs(probs, seed):
    return study_bootstrap(lambda w: bootstrap_metric_values(labels, probs, w, {})['auroc'][None],
                           len(labels), strata=labels, n_resamples=1000, seed=seed)[0]
  a, b = aurocs(scores[1], 11), aurocs(scores[2], 12)
  assert np.std(distribution) < 0.8 * np.std(a - b)
  # DeLong's standard error and the paired bootstrap's spread estimate the same sampling variability.
  assert summary['delong']['se'] == pytest.approx(np.std(distribution), rel=0.15)


def test_delong_p_values_are_calibrated_under_the_null():
  rng = np.random.default_rng(0)
  p = []
  for _ in range(300):
    labels = np.r_[np.ones(30, int), np.zeros(70, int)]
    shared = rng.normal(size=100) + 0.8 * labels
    a, b = shared + 0.6 * rng.normal(size=100), shared + 0.6 * rng.normal(size=100)  # equal AUROCs
    p.append(paired.delong_test(labels, a, b)['p_value'])
  assert 0.02 <= np.mean(np.asarray(p) < 0.05) <= 0.09
  assert stats.kstest(p, 'uniform').pvalue > 0.01


def test_delong_needs_two_of_each_class():
  with pytest.raises(ValueError, match='2 positives'):
    paired.delong([1, 0, 0], [0.2, 0.1, 0.3])
  summary, _ = paired.compare_aurocs(np.array([1, 0, 0, 0, 0]), np.arange(5.0), np.arange(5.0)[::-1],
                                     n_resamples=20)
  assert summary['delong']['p_value'] is None and '2 positives' in summary['delong']['reason']


def test_pool_seeds_is_the_mean_with_a_two_level_bootstrap_ci():
  rng = np.random.default_rng(0)
  k, n_boot = 5, 400
  differences = np.array([0.10, 0.02, 0.15, 0.07, 0.11])
  distributions = differences[:, None] + 0.03 * rng.normal(size=(k, n_boot))
  distributions[:, 7] = np.nan  # a one-class resample is one for every seed: dropped everywhere
  pooled = paired.pool_seeds(differences, distributions, seed=3)
  assert pooled['mean'] == pytest.approx(differences.mean())
  assert pooled['sd'] == pytest.approx(np.std(differences, ddof=1))
  assert pooled['n_seeds'] == 5 and pooled['wins'] == 5
  usable = np.delete(distributions, 7, axis=1)
  draws = np.random.default_rng(3).integers(0, k, (usable.shape[1], k))  # slow reference, same draws
  slow = [np.mean([usable[s, b] for s in draws[b]]) for b in range(usable.shape[1])]
  assert pooled['ci'] == pytest.approx(list(np.quantile(slow, [0.025, 0.975])))
  # Between-seed spread widens the interval beyond the test-set sampling of any one seed.
  assert pooled['ci'][1] - pooled['ci'][0] > np.diff(np.quantile(usable[0], [0.025, 0.975]))[0]
  # One seed: the pooled interval is that seed's paired bootstrap interval.
  single = paired.pool_seeds(differences[:1], distributions[:1])
  assert single['sd'] is None and single['ci'] == pytest.approx(
      list(np.quantile(usable[0], [0.025, 0.975])))


def _table(ids, labels, probs):
  return StudyTable(study_ids=np.array(ids), labels=np.array(labels), probs=np.array(probs, float),
                    num_videos=np.ones(len(ids), int))


def test_align_studies_orders_by_study_and_refuses_mismatches(tmp_path):
  a = _table(['s2', 's1', 's3'], [1, 0, 1], [0.9, 0.1, 0.6])
  b = _table(['s3', 's2', 's1'], [1, 1, 0], [0.5, 0.8, 0.3])
  ids, labels, (pa, pb) = paired.align_studies([a, b])
  assert ids.tolist() == ['s1', 's2', 's3'] and labels.tolist() == [0, 1, 1]
  assert pa.tolist() == [0.1, 0.9, 0.6] and pb.tolist() == [0.3, 0.8, 0.5]
  with pytest.raises(ValueError, match='other studies'):
    paired.align_studies([a, _table(['s1', 's2', 's4'], [0, 1, 1], [0.1, 0.2, 0.3])])
  with pytest.raises(ValueError, match='differently'):
    paired.align_studies([a, _table(['s1', 's2', 's3'], [1, 1, 1], [0.1, 0.2, 0.3])])
  path = tmp_path / 'study_predictions.csv'  # the layout reports.write_report writes
  path.write_text('study_id,label,prob,num_videos\ns2,1,0.9,2\ns1,0,0.1,1\n')
  table = paired.read_study_predictions(str(path))
  assert table.study_ids.tolist() == ['s2', 's1'] and table.probs.tolist() == [0.9, 0.1]
  assert table.num_videos.tolist() == [2, 1]


def test_compare_grid_pairs_runs_seed_by_seed_and_pools_them():
  labels, scores = _correlated_models(7, n=60, k=2)
  ids = np.array([f's{i:02d}' for i in range(len(labels))])
  rng = np.random.default_rng(0)
  tables = {}
  for frac, seeds in ((0.1, (0, 1, 2)), (1.0, (0,))):
    for init, base in (('x', scores[1]), ('y', scores[0])):
      for seed in seeds:
        if (frac, init, seed) == (0.1, 'y', 2):
          continue  # a run that did not finish: seed 2 has nothing to pair with
        order = rng.permutation(len(ids))  # each run lists its studies in its own order
        probs = base + 0.3 * np.random.default_rng(seed).normal(size=len(ids))
        tables[frac, init, seed] = _table(ids[order], labels[order], probs[order])
  per_seed, pooled = paired.compare_grid(tables, [('x', 'y')], n_resamples=200)
  assert [(r['frac'], r['seed']) for r in per_seed] == [(0.1, 0), (0.1, 1), (1.0, 0)]
  for r in per_seed:
    runs = [tables[r['frac'], init, r['seed']] for init in ('x', 'y')]
    _, y, (pa, pb) = paired.align_studies(runs)
    direct, _ = paired.compare_aurocs(y, pa, pb, n_resamples=200)
    assert r['difference'] == pytest.approx(direct['difference'])
    assert [r['ci_lo'], r['ci_hi']] == pytest.approx(direct['bootstrap']['ci'])
    assert r['delong_p'] == pytest.approx(direct['delong']['p_value'])
  assert [p['n_seeds'] for p in pooled] == [2, 1]
  assert pooled[0]['mean'] == pytest.approx(np.mean([r['difference'] for r in per_seed[:2]]))
  assert pooled[1]['sd'] is None and [pooled[1]['ci_lo'], pooled[1]['ci_hi']] == pytest.approx(
      [per_seed[2]['ci_lo'], per_seed[2]['ci_hi']])
  text = paired.format_paired_tables(per_seed, pooled)
  assert '| 10% | x − y | 2 |' in text and '| 100% | x − y | 0 |' in text
