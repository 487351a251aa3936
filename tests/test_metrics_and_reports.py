"""Tests of clip → video → study aggregation, point metrics, thresholds, evaluate_split and reports."""
import csv
import json
import math

import numpy as np
import pytest
from sklearn import metrics as skm

from echojax.evaluation import bootstrap as ev
from echojax.evaluation import calibration

LN3 = math.log(3.0)


def _random_split(seed=0, n_studies=60, prevalence=0.3, ties=True):
  rng = np.random.default_rng(seed)
  videos_per_study = rng.integers(1, 4, n_studies)
  study_of_video = np.repeat(np.arange(n_studies), videos_per_study)
  study_labels = (rng.random(n_studies) < prevalence).astype(int)
  study_labels[:2] = [0, 1]
  labels = study_labels[study_of_video]
  logits = rng.normal(size=(len(labels), 4)) + 1.2 * labels[:, None]
  if ties:  # rounding puts several studies on the same probability
    logits = np.round(logits, 1)
  video_ids = [f'v{i}' for i in range(len(labels))]
  return ev.aggregate_predictions(logits, video_ids, [f's{i}' for i in study_of_video], labels)


def test_aggregation_matches_hand_computed_example():
  # Study A: a1 = mean(σ(0), σ(ln 3)) = (0.5 + 0.75)/2 = 0.625; a2 = σ(−ln 3) = 0.25 (3rd clip masked,
  # its logit 5 would give 0.99); A = (0.625 + 0.25)/2 = 0.4375. Study B: b1 = σ(ln 9) = 0.9.
  logits = np.array([[0.0, LN3, 0.0], [-LN3, -LN3, 5.0], [math.log(9), math.log(9), math.log(9)]])
  mask = np.array([[True, True, False], [True, True, False], [True, True, True]])
  # a1's third clip (logit 0) is masked too, so it does not pull a1 towards 0.5.
  videos, studies = ev.aggregate_predictions(logits, [b'a1', b'a2', b'b1'], [b'A', b'A', b'B'], [0, 0, 1],
                                             clip_mask=mask)
  assert list(videos.video_ids) == ['a1', 'a2', 'b1']
  assert list(videos.study_ids) == ['A', 'A', 'B']
  np.testing.assert_allclose(videos.probs, [0.625, 0.25, 0.9])
  assert list(videos.num_clips) == [2, 2, 3]
  assert list(studies.study_ids) == ['A', 'B']
  np.testing.assert_allclose(studies.probs, [0.4375, 0.9])
  assert list(studies.labels) == [0, 1] and list(studies.num_videos) == [2, 1]

  # Same numbers from probabilities, and from flat per-clip rows (video ids repeated, order kept).
  _, from_probs = ev.aggregate_predictions([[0.5, 0.75], [0.25, 0.25], [0.9, 0.9]], ['a1', 'a2', 'b1'],
                                           ['A', 'A', 'B'], [0, 0, 1], outputs='probs')
  np.testing.assert_allclose(from_probs.probs, [0.4375, 0.9])
  flat_videos, flat_studies = ev.aggregate_predictions(
      [0.9, 0.5, 0.25, 0.75, 0.25], ['b1', 'a1', 'a2', 'a1', 'a2'], ['B', 'A', 'A', 'A', 'A'],
      [1, 0, 0, 0, 0], outputs='probs')
  assert list(flat_videos.video_ids) == ['b1', 'a1', 'a2']
  np.testing.assert_allclose(flat_videos.probs, [0.9, 0.625, 0.25])
  np.testing.assert_allclose(flat_studies.probs, [0.9, 0.4375])


def test_study_probability_is_unweighted_mean_of_videos():
  # A video with 1 clip counts as much as one with 3 (mean of video means, not of clips).
  _, studies = ev.aggregate_predictions([0.2, 0.6, 0.6, 0.6], ['x', 'y', 'y', 'y'], ['S'] * 4, [1] * 4,
                                        outputs='probs')
  np.testing.assert_allclose(studies.probs, [0.4])


def test_multiclass_aggregation_is_mean_of_softmaxes():
  logits = np.log(np.array([[[1, 1, 2], [2, 1, 1]], [[1, 2, 1], [1, 2, 1]]], float))  # softmax = ratios/4
  videos, studies = ev.aggregate_predictions(logits, ['v0', 'v1'], ['s', 's'], [2, 2])
  np.testing.assert_allclose(videos.probs, [[0.375, 0.25, 0.375], [0.25, 0.5, 0.25]])
  np.testing.assert_allclose(studies.probs, [[0.3125, 0.375, 0.3125]])
  with pytest.raises(ValueError, match='evaluate_multiclass'):
    ev.evaluate_split(videos, studies)


@pytest.mark.parametrize('kwargs, message', [
    (dict(labels=[0, 1, 1]), "study 'A' has conflicting labels: 0, 1"),
    (dict(labels=[0, 0, -1]), "video 'b1' has label -1"),
    (dict(clip_mask=[[False, False], [True, True], [True, True]]), r"\['a1'\] have no unmasked clip"),
    (dict(logits=[[0.0, np.nan], [0.0, 0.0], [0.0, 0.0]]), r"invalid logits for video\(s\) \['a1'\]"),
    (dict(study_ids=['A', 'A']), 'study_ids: 2 ids for 3 rows'),
    (dict(clip_mask=[[True], [True], [True]]), 'clip_mask shape'),
])
def test_aggregation_rejects_bad_inputs_with_named_culprit(kwargs, message):
  args = dict(logits=np.zeros((3, 2)), video_ids=['a1', 'a2', 'b1'], study_ids=['A', 'A', 'B'],
              labels=[0, 0, 1])
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    ev.aggregate_predictions(args.pop('logits'), **args)


def test_aggregation_rejects_video_in_two_studies_and_out_of_range_probs():
  with pytest.raises(ValueError, match="video 'v' has conflicting study ids: A, B"):
    ev.aggregate_predictions([0.1, 0.2], ['v', 'v'], ['A', 'B'], [0, 0], outputs='probs')
  with pytest.raises(ValueError, match='invalid probs'):
    ev.aggregate_predictions([0.1, 1.2], ['v', 'w'], ['A', 'B'], [0, 0], outputs='probs')


@pytest.mark.parametrize('threshold', [0.5, 0.37])
def test_every_metric_equals_scikit_learn(threshold):
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, 200)
  probs = np.round(np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0, 1), 2)  # ties on purpose
  values, reasons = ev.binary_metrics(labels, probs, threshold)
  preds = (probs >= threshold).astype(int)
  tn, fp, fn, tp = skm.confusion_matrix(labels, preds).ravel()
  expected = {
      'auroc': skm.roc_auc_score(labels, probs),
      'average_precision': skm.average_precision_score(labels, probs),
      'accuracy': skm.accuracy_score(labels, preds),
      'balanced_accuracy': skm.balanced_accuracy_score(labels, preds),
      'mcc': skm.matthews_corrcoef(labels, preds),
      'precision': skm.precision_score(labels, preds),
      'npv': skm.precision_score(labels, preds, pos_label=0),
      'sensitivity': skm.recall_score(labels, preds),
      'specificity': tn / (tn + fp),
      'f1': skm.f1_score(labels, preds),
  }
  assert set(values) == set(ev.THRESHOLD_FREE_METRICS + ev.THRESHOLD_METRICS) == set(expected)
  for name, value in expected.items():
    assert values[name] == pytest.approx(value, rel=1e-12), name
  assert reasons == {}


def test_one_class_split_has_undefined_auroc_with_reason_and_other_metrics():
  labels = np.zeros(10, int)
  probs = np.linspace(0.05, 0.95, 10)
  values, reasons = ev.binary_metrics(labels, probs)
  assert math.isnan(values['auroc']) and math.isnan(values['average_precision'])
  assert 'only one class' in reasons['auroc'] and 'only one class' in reasons['average_precision']
  assert values['accuracy'] == pytest.approx(0.5)
  assert values['specificity'] == pytest.approx(0.5)
  assert values['balanced_accuracy'] == pytest.approx(0.5)
  assert math.isnan(values['sensitivity']) and reasons['sensitivity'] == 'no positives in this split'
  assert values['f1'] == 0.0 and values['precision'] == 0.0

  videos, studies = ev.aggregate_predictions(probs, [f'v{i}' for i in range(10)],
                                             [f's{i}' for i in range(10)], labels, outputs='probs')
  summary = ev.evaluate_split(videos, studies, n_resamples=200)
  auroc = summary['study']['metrics']['auroc']
  assert auroc['value'] is None and auroc['ci95'] is None and 'only one class' in auroc['reason']
  accuracy = summary['study']['metrics']['accuracy@0.5']
  assert accuracy['value'] == pytest.approx(0.5) and accuracy['ci95'][0] <= 0.5 <= accuracy['ci95'][1]
  assert summary['bootstrap']['n_degenerate'] == 200  # every resample has one class
  json.dumps(summary, allow_nan=False)


def test_no_predicted_positives_gives_undefined_precision_with_reason():
  values, reasons = ev.binary_metrics([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], threshold=0.9)
  assert math.isnan(values['precision']) and 'no predicted positives' in reasons['precision']
  assert values['sensitivity'] == 0.0 and values['specificity'] == 1.0


def _f1_at(labels, probs, t):
  return skm.f1_score(labels, (probs >= t).astype(int), zero_division=0)


def test_max_f1_threshold_maximises_f1_on_the_validation_data():
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 2, 300)
  probs = np.round(1 / (1 + np.exp(-rng.normal(1.0 * labels - 0.5, 1.0))), 3)
  chosen = ev.choose_threshold(labels, probs, 'max_f1')
  best = max(_f1_at(labels, probs, t) for t in np.unique(probs))
  assert _f1_at(labels, probs, chosen) == pytest.approx(best)
  assert _f1_at(labels, probs, 0.5) < best  # 0.5 is not already optimal, so the choice matters here


@pytest.mark.parametrize('target', [0.8, 0.9, 0.95])
def test_sensitivity_threshold_reaches_target_and_is_the_most_specific_that_does(target):
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 2, 300)
  probs = rng.random(300) * 0.6 + 0.3 * labels
  chosen = ev.choose_threshold(labels, probs, 'sensitivity', target_sensitivity=target)
  assert skm.recall_score(labels, probs >= chosen) >= target
  next_higher = np.unique(probs)[np.unique(probs) > chosen].min()
  assert skm.recall_score(labels, probs >= next_higher) < target


def test_youden_threshold_maximises_sensitivity_plus_specificity():
  rng = np.random.default_rng(4)
  labels = rng.integers(0, 2, 200)
  probs = rng.random(200) * 0.7 + 0.3 * labels
  youden = lambda t: (skm.recall_score(labels, probs >= t) + skm.recall_score(1 - labels, probs < t))
  chosen = ev.choose_threshold(labels, probs, 'youden')
  assert youden(chosen) == pytest.approx(max(youden(t) for t in np.unique(probs)))


def test_choose_threshold_rejects_one_class_and_unknown_method():
  with pytest.raises(ValueError, match='needs both classes'):
    ev.choose_threshold([1, 1, 1], [0.2, 0.5, 0.9])
  with pytest.raises(ValueError, match='method must be one of'):
    ev.choose_threshold([0, 1], [0.2, 0.9], method='median')


def test_evaluate_split_reports_every_metric_at_both_levels_and_thresholds():
  videos, studies = _random_split()
  summary = ev.evaluate_split(videos, studies, threshold=0.42, threshold_method='max_f1 on val',
                              n_resamples=300)
  assert summary['thresholds'] == {'fixed': 0.5, 'chosen': {'study': 0.42, 'video': 0.42},
                                   'chosen_method': 'max_f1 on val'}
  expected_names = {'auroc', 'average_precision', *calibration.CALIBRATION_METRICS} | {
      f'{m}@{t}' for m in ev.THRESHOLD_METRICS for t in ('0.5', 'chosen')}
  for level, table in (('study', studies), ('video', videos)):
    part = summary[level]
    assert part['n'] == len(table) and part['n_pos'] == int(table.labels.sum())
    assert part['n_studies'] == len(studies)
    assert set(part['metrics']) == expected_names
    for name, entry in part['metrics'].items():
      threshold = entry.get('threshold', 0.5)
      point, _ = ev.binary_metrics(table.labels, table.probs, threshold)
      point.update(calibration.calibration_metrics(table.labels, table.probs)[0])
      assert entry['value'] == pytest.approx(point[name.split('@')[0]], rel=1e-12), (level, name)
      lo, hi = entry['ci95']
      assert lo <= entry['value'] <= hi, (level, name)
      assert (entry['n'], entry['n_pos']) == (part['n'], part['n_pos'])
      if name.startswith('calibration_'):  # a resample whose classes separate has no logistic fit
        assert 250 < entry['n_resamples_used'] <= 300, (level, name)
      else:
        assert entry['n_resamples_used'] == 300, (level, name)
    assert part['metrics']['f1@chosen']['threshold'] == 0.42
  # Per-level thresholds, and no chosen threshold at all.
  per_level = ev.evaluate_split(videos, threshold={'study': 0.4}, n_resamples=50)
  assert per_level['thresholds']['chosen'] == {'study': 0.4, 'video': None}
  assert 'f1@chosen' in per_level['study']['metrics'] and 'f1@chosen' not in per_level['video']['metrics']


def test_evaluate_split_rejects_tables_that_do_not_match():
  videos, studies = _random_split()
  _, other_studies = _random_split(seed=5, n_studies=10)
  with pytest.raises(ValueError, match='no video in video_table|absent from study_table'):
    ev.evaluate_split(videos, other_studies)
  flipped = ev.StudyTable(studies.study_ids, 1 - studies.labels, studies.probs, studies.num_videos)
  with pytest.raises(ValueError, match="video 'v0' has label"):
    ev.evaluate_split(videos, flipped)


def test_write_report_files_and_summary_json(tmp_path):
  videos, studies = _random_split()
  summary = ev.evaluate_split(videos, studies, threshold=0.45, threshold_method='max_f1', n_resamples=200)
  paths = ev.write_report(str(tmp_path / 'report'), (videos, studies), summary, title='Test split')
  for name in ('predictions.csv', 'study_predictions.csv', 'summary.json', 'summary.md', 'roc_curve.png',
               'pr_curve.png', 'confusion_matrix.png'):
    assert (tmp_path / 'report' / name).stat().st_size > 0, name
  for name in ('roc_curve.png', 'pr_curve.png', 'confusion_matrix.png'):
    assert (tmp_path / 'report' / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

  loaded = json.loads((tmp_path / 'report' / 'summary.json').read_text())
  assert loaded['title'] == 'Test split'
  auroc = loaded['study']['metrics']['auroc']
  assert auroc['value'] == pytest.approx(skm.roc_auc_score(studies.labels, studies.probs))
  assert len(auroc['ci95']) == 2 and auroc['n'] == len(studies)
  assert loaded['thresholds']['chosen']['study'] == 0.45

  with open(paths['predictions.csv']) as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ['study_id', 'video_id', 'label', 'prob', 'num_clips']
  assert len(rows) == len(videos) and rows[0]['video_id'] == 'v0'
  assert float(rows[3]['prob']) == pytest.approx(videos.probs[3], rel=1e-15)
  with open(paths['study_predictions.csv']) as f:
    study_rows = list(csv.DictReader(f))
  assert [r['study_id'] for r in study_rows] == list(studies.study_ids)
  np.testing.assert_allclose([float(r['prob']) for r in study_rows], studies.probs, rtol=1e-15)

  markdown = (tmp_path / 'report' / 'summary.md').read_text()
  assert markdown.startswith('# Test split')
  assert f"| AUROC | {auroc['value']:.3f} | {auroc['ci95'][0]:.3f}–{auroc['ci95'][1]:.3f} |" in markdown
  assert '## Video level' in markdown and 'F1 @ chosen' in markdown


def test_write_report_survives_one_class_split(tmp_path):
  videos, studies = ev.aggregate_predictions([0.2, 0.7, 0.4], ['a', 'b', 'c'], ['A', 'B', 'C'], [0, 0, 0],
                                             outputs='probs')
  summary = ev.evaluate_split(videos, studies, n_resamples=50)
  ev.write_report(str(tmp_path), videos, summary, title='one class')
  assert json.loads((tmp_path / 'summary.json').read_text())['study']['metrics']['auroc']['value'] is None
  assert 'only one class' in (tmp_path / 'summary.md').read_text()


def test_format_auroc_table_lists_runs_and_builds_grids():
  videos, studies = _random_split()
  summary = ev.evaluate_split(videos, studies, n_resamples=100)
  auroc = summary['study']['metrics']['auroc']
  table = ev.format_auroc_table([{'name': 'EchoCLR', 'summary': summary},
                                 {'name': 'Random', 'value': 0.5112, 'ci': [0.45, 0.57], 'n': 1063}])
  lines = table.strip().split('\n')
  assert lines[0] == '| Run | n studies | AUROC [95% CI] |'
  assert lines[2] == (f"| EchoCLR | {len(studies)} | {auroc['value']:.3f} "
                      f"[{auroc['ci95'][0]:.3f}, {auroc['ci95'][1]:.3f}] |")
  assert lines[3] == '| Random | 1063 | 0.511 [0.450, 0.570] |'

  grid = ev.format_auroc_table([
      {'row': '1%', 'column': 'Random', 'value': 0.511, 'ci': [0.45, 0.57]},
      {'row': '1%', 'column': 'EchoCLR', 'value': 0.818},
      {'row': '5%', 'column': 'EchoCLR', 'value': None, 'reason': 'not run'}])
  assert grid.strip().split('\n') == [
      '| AUROC [95% CI] | Random | EchoCLR |', '|---|---|---|',
      '| 1% | 0.511 [0.450, 0.570] | 0.818 |', '| 5% | – | n/a (not run) |']
  with pytest.raises(ValueError, match=r"row\(s\) \[0\] have no 'name'"):
    ev.format_auroc_table([{'value': 0.5}])


def test_auroc_rows_make_a_fraction_by_init_grid_with_seed_means():
  videos, studies = _random_split()
  summary = ev.evaluate_split(videos, studies, n_resamples=100)
  row = ev.auroc_row(summary)
  auroc = summary['study']['metrics']['auroc']
  assert row == {'auroc': auroc['value'], 'ci_lo': auroc['ci95'][0], 'ci_hi': auroc['ci95'][1],
                 'ci_level': 0.95, 'n_studies': len(studies), 'n_pos': int(studies.labels.sum())}
  rows = [{'init': 'random', 'frac': 0.01, 'seed': 0, **row},
          {'init': 'ssl', 'frac': 0.01, 'seed': 0, 'auroc': 0.80, 'ci_lo': 0.7, 'ci_hi': 0.9},
          {'init': 'ssl', 'frac': 0.01, 'seed': 1, 'auroc': 0.84, 'ci_lo': 0.7, 'ci_hi': 0.9},
          {'init': 'ssl', 'frac': 1.0, 'seed': 0, 'auroc': 0.93, 'ci_lo': 0.91, 'ci_hi': 0.95}]
  lines = ev.format_auroc_table(rows).strip().split('\n')
  assert lines[0] == '| AUROC [95% CI] | random | ssl |'
  assert lines[2] == (f"| 1% | {auroc['value']:.3f} [{auroc['ci95'][0]:.3f}, {auroc['ci95'][1]:.3f}] | "
                      f"0.820 ± 0.028 (2 runs) |")
  assert lines[3] == '| 100% | – | 0.930 [0.910, 0.950] |'
