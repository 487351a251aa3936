"""Paired comparison of two models' AUROCs on the same studies: DeLong's test for correlated AUROCs
(DeLong, DeLong & Clarke-Pearson 1988, with Sun & Xu 2014's midrank computation), a paired study-level
bootstrap of the AUROC difference (the same resampled studies for both models), and the pooling of
per-seed differences across seeds (a two-level bootstrap over seeds and test studies).
"""
from __future__ import annotations

import csv
import math
from typing import Mapping, Sequence

import numpy as np
from scipy import stats

from echojax.evaluation.bootstrap import BOOTSTRAP_KINDS, _percentile_interval, study_bootstrap
from echojax.evaluation.metrics import StudyTable, bootstrap_metric_values

__all__ = ['align_studies', 'compare_aurocs', 'compare_grid', 'delong', 'delong_test', 'format_paired_tables',
           'paired_auroc_differences', 'pool_seeds', 'read_study_predictions']


def _positive_mask(labels) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.isin(labels, (0, 1)).all():
    raise ValueError('labels must be a 1-D array of 0/1')
  return labels == 1


def delong(labels, scores) -> tuple[np.ndarray, np.ndarray]:
  """AUROCs (k,) of k score vectors on the same cases and DeLong's covariance matrix (k, k) of them.

  Sun & Xu's Theorem 1: with midranks T_z over all cases, T_x within positives, T_y within negatives, the
  structural components are V10 = (T_z − T_x)/n (per positive) and V01 = 1 − (T_z − T_y)/m (per
  negative); AUROC = mean V10 and Cov = S10/m + S01/n (sample covariances, m − 1 and n − 1 as in 1988).
  """
  positive = _positive_mask(labels)
  scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
  m, n = int(positive.sum()), int((~positive).sum())
  if m < 2 or n < 2:
    raise ValueError(f"DeLong's variance needs ≥ 2 positives and ≥ 2 negatives, got {m} and {n}")
  if scores.shape[1] != len(positive):
    raise ValueError(f'{scores.shape[1]} scores for {len(positive)} labels')
  t_z = stats.rankdata(scores, axis=1)  # midranks (ties share the mean rank), O(N log N)
  t_x = stats.rankdata(scores[:, positive], axis=1)
  t_y = stats.rankdata(scores[:, ~positive], axis=1)
  v10 = (t_z[:, positive] - t_x) / n
  v01 = 1.0 - (t_z[:, ~positive] - t_y) / m
  covariance = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
  return v10.mean(axis=1), covariance


def delong_test(labels, probs_a, probs_b, *, ci_level: float = 0.95) -> dict:
  """DeLong's two-sided test of AUROC(a) = AUROC(b) on paired predictions, and the normal-theory CI of
  the difference a − b. Identical rankings give z = 0 and p = 1."""
  aurocs, cov = delong(labels, np.stack([probs_a, probs_b]))
  difference = float(aurocs[0] - aurocs[1])
  variance = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
  se = math.sqrt(max(variance, 0.0))
  if se > 0:
    z = difference / se
  else:  # both rankings identical (or both perfect): the difference is exact
    z = 0.0 if difference == 0 else math.copysign(math.inf, difference)
  half = stats.norm.ppf(0.5 + ci_level / 2) * se
  return {'auroc_a': float(aurocs[0]), 'auroc_b': float(aurocs[1]), 'difference': difference,
          'se': se, 'z': z, 'p_value': float(2 * stats.norm.sf(abs(z))),
          'ci': [float(difference - half), float(difference + half)], 'ci_level': ci_level}


def _auroc(labels, probs, weights) -> np.ndarray:
  return bootstrap_metric_values(labels, probs, weights, {})['auroc']


def paired_auroc_differences(labels, probs_a, probs_b, *, n_resamples: int = 2000, seed: int = 0,
                             resampling: str = 'stratified') -> np.ndarray:
  """AUROC(a) − AUROC(b) on each of `n_resamples` study resamples (B,), NaN where a resample has one class.

  Both models are scored on the same resampled studies (the pairing). The resampling is the evaluation's
  own `bootstrap.study_bootstrap` — 'stratified' (each class resampled within itself, as pROC's default
  boot.stratified: no one-class resample) or 'simple' — and depends only on (labels, B, seed,
  resampling), so every model scored on the same studies in the same order gets the same resamples.
  """
  if resampling not in BOOTSTRAP_KINDS:
    raise ValueError(f'resampling must be one of {BOOTSTRAP_KINDS}, got {resampling!r}')
  labels = np.asarray(labels)
  return study_bootstrap(lambda w: (_auroc(labels, probs_a, w) - _auroc(labels, probs_b, w))[None],
                         len(labels), strata=labels if resampling == 'stratified' else None,
                         n_resamples=n_resamples, seed=seed)[0]


def compare_aurocs(labels, probs_a, probs_b, *, n_resamples: int = 2000, ci_level: float = 0.95,
                   seed: int = 0, resampling: str = 'stratified') -> tuple[dict, np.ndarray]:
  """Model a vs model b on the same studies: DeLong's test and the paired bootstrap percentile CI of the
  AUROC difference a − b. Returns (JSON-ready summary, the (B,) bootstrap differences for pooling)."""
  labels = np.asarray(labels)
  summary = {'n': int(len(labels)), 'n_pos': int((labels == 1).sum()), 'ci_level': ci_level}
  try:
    summary['delong'] = delong_test(labels, probs_a, probs_b, ci_level=ci_level)
  except ValueError as e:
    summary['delong'] = {'p_value': None, 'reason': str(e)}
  distribution = paired_auroc_differences(labels, probs_a, probs_b, n_resamples=n_resamples, seed=seed,
                                          resampling=resampling)
  used = distribution[np.isfinite(distribution)]
  whole = np.ones((1, len(labels)))  # the unresampled split
  a, b = (float(_auroc(labels, probs, whole)[0]) for probs in (probs_a, probs_b))
  defined = not math.isnan(a - b)
  summary.update(auroc_a=a if defined else None, auroc_b=b if defined else None,
                 difference=a - b if defined else None)
  summary['bootstrap'] = {
      'ci': _percentile_interval(used, ci_level) if used.size >= 2 and defined else None,
      'unit': 'study', 'paired': True, 'resampling': resampling, 'method': 'percentile',
      'n_resamples': n_resamples, 'n_resamples_used': int(used.size), 'seed': seed}
  return summary, distribution


def pool_seeds(differences: Sequence[float], distributions: np.ndarray, *, ci_level: float = 0.95,
               seed: int = 0) -> dict:
  """Pools per-seed AUROC differences (one init pair, one label fraction) across k seeds.

  The estimate is the mean of the per-seed differences (seeds are exchangeable replicates of the
  labelled subset, head init and data order). Its CI is a two-level bootstrap: each resample draws k
  seeds with replacement and one set of test studies, shared by both models and every drawn seed
  (`distributions` (k, B): each seed's paired differences on the same resample indices), and averages
  the drawn seeds' differences. It carries the between-subset spread and the test-set sampling together;
  the seeds share one test set, so treating their DeLong variances as independent (fixed-effect
  inverse-variance pooling) would understate the latter and ignore the former.
  """
  differences = np.asarray(differences, dtype=np.float64)
  distributions = np.atleast_2d(np.asarray(distributions, dtype=np.float64))
  k = len(differences)
  if distributions.shape[0] != k:
    raise ValueError(f'{k} differences but {distributions.shape[0]} bootstrap distributions')
  usable = distributions[:, np.isfinite(distributions).all(axis=0)]  # a one-class resample is one for all
  draws = np.random.default_rng(seed).integers(0, k, (usable.shape[1], k))
  pooled = usable[draws, np.arange(usable.shape[1])[:, None]].mean(axis=1)
  return {'n_seeds': k, 'mean': float(differences.mean()),
          'sd': float(differences.std(ddof=1)) if k > 1 else None,
          'ci': _percentile_interval(pooled, ci_level) if pooled.size >= 2 else None, 'ci_level': ci_level,
          'wins': int((differences > 0).sum()),
          'method': 'mean of per-seed differences; two-level (seeds × test studies) percentile bootstrap'}


def compare_grid(tables: Mapping[tuple, StudyTable], pairs: Sequence[tuple[str, str]], *,
                 n_resamples: int = 2000, ci_level: float = 0.95, seed: int = 0,
                 resampling: str = 'stratified') -> tuple[list[dict], list[dict]]:
  """Every pair of inits at every label fraction of a grid of runs on one test split.

  Args:
    tables: (frac, init, seed) → that run's test StudyTable; runs of a pair are compared seed by seed.
    pairs: (init_a, init_b), reported as a − b.
    n_resamples, ci_level, resampling: the paired bootstrap; its `seed` is the same for every run, so all
      runs are scored on the same resampled studies (what `pool_seeds` needs).
  Returns:
    (per-seed rows, pooled rows): flat CSV-ready dicts, None where undefined.
  """
  per_seed, pooled = [], []
  for frac in sorted({key[0] for key in tables}):
    for a, b in pairs:
      seeds = sorted(s for f, init, s in tables if f == frac and init == a and (frac, b, s) in tables)
      if not seeds:
        continue
      # One alignment for every run of the cell: pooling needs the same studies (so the same resamples).
      _, labels, probs = align_studies([tables[frac, init, s] for s in seeds for init in (a, b)])
      differences, distributions, p_values = [], [], []
      for s, pa, pb in zip(seeds, probs[::2], probs[1::2]):
        summary, distribution = compare_aurocs(labels, pa, pb, n_resamples=n_resamples, ci_level=ci_level,
                                               seed=seed, resampling=resampling)
        boot_ci = summary['bootstrap']['ci'] or (None, None)
        delong_ci = summary['delong'].get('ci') or (None, None)
        per_seed.append({'frac': frac, 'init_a': a, 'init_b': b, 'seed': s, 'n_studies': summary['n'],
                         'n_pos': summary['n_pos'], 'auroc_a': summary['auroc_a'],
                         'auroc_b': summary['auroc_b'], 'difference': summary['difference'],
                         'ci_lo': boot_ci[0], 'ci_hi': boot_ci[1], 'delong_z': summary['delong'].get('z'),
                         'delong_p': summary['delong']['p_value'], 'delong_ci_lo': delong_ci[0],
                         'delong_ci_hi': delong_ci[1], 'ci_level': ci_level, 'n_resamples': n_resamples,
                         'resampling': resampling, 'note': summary['delong'].get('reason', '')})
        if summary['difference'] is not None:
          differences.append(summary['difference'])
          distributions.append(distribution)
          p_values.append(summary['delong']['p_value'])
      if differences:
        pool = pool_seeds(differences, np.stack(distributions), ci_level=ci_level, seed=seed)
        lo, hi = pool['ci'] or (None, None)
        pooled.append({'frac': frac, 'init_a': a, 'init_b': b, 'n_seeds': pool['n_seeds'],
                       'mean': pool['mean'], 'sd': pool['sd'], 'ci_lo': lo, 'ci_hi': hi, 'wins': pool['wins'],
                       'delong_p': ';'.join('n/a' if p is None else f'{p:.3g}' for p in p_values),
                       'ci_level': ci_level, 'method': pool['method']})
  return per_seed, pooled


def _signed(value, digits: int = 3) -> str:
  return 'n/a' if value is None else f'{value:+.{digits}f}'


def _interval(lo, hi) -> str:
  return '' if lo is None else f' [{lo:+.3f}, {hi:+.3f}]'


def format_paired_tables(per_seed: Sequence[Mapping], pooled: Sequence[Mapping]) -> str:
  """Markdown: the pooled table (one row per fraction × pair) and the per-seed table under it."""
  pct = round(100 * (pooled[0]['ci_level'] if pooled else 0.95))
  lines = [f'| Fraction | a − b | seeds | mean ± sd | pooled Δ [{pct}% CI] | a > b | DeLong p per seed |',
           '|---|---|---|---|---|---|---|']
  for r in pooled:
    spread = '' if r['sd'] is None else f" ± {r['sd']:.3f}"
    lines.append(f"| {100 * r['frac']:g}% | {r['init_a']} − {r['init_b']} | {r['n_seeds']} | "
                 f"{_signed(r['mean'])}{spread} | {_signed(r['mean'])}{_interval(r['ci_lo'], r['ci_hi'])} | "
                 f"{r['wins']}/{r['n_seeds']} | {r['delong_p'].replace(';', ', ')} |")
  lines += ['', f'| Fraction | a − b | seed | AUROC a | AUROC b | Δ [{pct}% paired CI] | DeLong z | '
            'DeLong p |', '|---|---|---|---|---|---|---|---|']
  for r in per_seed:
    z = 'n/a' if r['delong_z'] is None else f"{r['delong_z']:.2f}"
    p = 'n/a' if r['delong_p'] is None else f"{r['delong_p']:.3g}"
    auc = ['n/a' if v is None else f'{v:.3f}' for v in (r['auroc_a'], r['auroc_b'])]
    lines.append(f"| {100 * r['frac']:g}% | {r['init_a']} − {r['init_b']} | {r['seed']} | {auc[0]} | "
                 f"{auc[1]} | {_signed(r['difference'])}{_interval(r['ci_lo'], r['ci_hi'])} | {z} | {p} |")
  return '\n'.join(lines) + '\n'


def read_study_predictions(path: str) -> StudyTable:
  """A report's study_predictions.csv (binary 'prob' column) back as a StudyTable."""
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  if rows and 'prob' not in rows[0]:
    raise ValueError(f'{path}: no binary prob column (has {sorted(rows[0])})')
  return StudyTable(study_ids=np.array([r['study_id'] for r in rows], dtype=str),
                    labels=np.array([int(r['label']) for r in rows]),
                    probs=np.array([float(r['prob']) for r in rows]),
                    num_videos=np.array([int(r['num_videos']) for r in rows]))


def align_studies(tables: Sequence[StudyTable]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
  """(study ids sorted, labels, each table's probs in that order); the tables must hold the same studies
  with the same labels — a paired comparison is only defined on one set of studies."""
  ids = np.sort(tables[0].study_ids)
  labels, probs = None, []
  for i, table in enumerate(tables):
    order = np.argsort(table.study_ids)
    if len(table) != len(ids) or not np.array_equal(table.study_ids[order], ids):
      raise ValueError(f'table {i} holds other studies than table 0; paired comparison needs the same ones')
    if labels is None:
      labels = table.labels[order]
    elif not np.array_equal(table.labels[order], labels):
      raise ValueError(f'table {i} labels the same studies differently from table 0')
    probs.append(table.probs[order])
  return ids, labels, probs
