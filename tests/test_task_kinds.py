"""The three task kinds: multi-class and regression metrics (point and over resamples) against scikit-learn,
their study-bootstrap summaries, task label mapping, and fine-tuning + evaluation of each kind from a config
on generated data (synthetic_echo/ci and a generated EchoNet-Dynamic folder)."""
import csv
import json
import os

import numpy as np
import pytest
from sklearn import metrics as skm

from echojax.evaluation import bootstrap as ev
from echojax.evaluation import multiclass, regression

GRADES = ('none', 'mild', 'moderate', 'severe')


def _multiclass_split(seed=0, n_studies=80, k=4):
  rng = np.random.default_rng(seed)
  per_study = rng.integers(1, 4, n_studies)
  study_of_video = np.repeat(np.arange(n_studies), per_study)
  study_labels = np.r_[np.arange(k), rng.integers(0, k, n_studies - k)]
  labels = study_labels[study_of_video]
  logits = rng.normal(size=(len(labels), 2, k)) + 1.5 * np.eye(k)[labels][:, None]
  return ev.aggregate_predictions(np.round(logits, 1), [f'v{i}' for i in range(len(labels))],
                                  [f's{i}' for i in study_of_video], labels)


def _regression_split(seed=0, n_studies=60):
  rng = np.random.default_rng(seed)
  per_study = rng.integers(1, 3, n_studies)
  study_of_video = np.repeat(np.arange(n_studies), per_study)
  ef = rng.uniform(20, 75, n_studies)[study_of_video]
  preds = ef[:, None] + rng.normal(2.0, 6.0, (len(ef), 3))
  return ev.aggregate_predictions(preds, [f'v{i}' for i in range(len(ef))], [f's{i}' for i in study_of_video],
                                  ef, outputs='values')


def test_multiclass_metrics_equal_scikit_learn_with_and_without_weights():
  _, studies = _multiclass_split()
  labels, probs = studies.labels, studies.probs
  rng = np.random.default_rng(1)
  weights = ev.resample_weights(rng.integers(0, len(labels), (4, len(labels))), len(labels))
  weights[0] = 1.0
  resampled = multiclass.multiclass_resamples(labels, probs, weights, GRADES)
  for b, w in enumerate(weights):
    values, reasons = multiclass.multiclass_metrics(labels, probs, GRADES, sample_weight=w)
    preds = probs.argmax(1)
    expected = {
        'macro_auroc': skm.roc_auc_score(labels, probs, multi_class='ovr', average='macro', sample_weight=w),
        'accuracy': skm.accuracy_score(labels, preds, sample_weight=w),
        'balanced_accuracy': skm.balanced_accuracy_score(labels, preds, sample_weight=w),
        'quadratic_kappa': skm.cohen_kappa_score(labels, preds, weights='quadratic', sample_weight=w),
        **{f'auroc_{g}': skm.roc_auc_score(labels == c, probs[:, c], sample_weight=w)
           for c, g in enumerate(GRADES)},
    }
    if b == 0:
      assert reasons == {} and set(values) == set(expected)
    for name, value in expected.items():
      assert values[name] == pytest.approx(value, rel=1e-12), name
      assert resampled[name][b] == pytest.approx(value, rel=1e-9), (b, name)
  np.testing.assert_array_equal(multiclass.confusion(labels, probs),
                                skm.confusion_matrix(labels, probs.argmax(1)))


def test_multiclass_with_an_absent_class_averages_the_present_ones_and_says_so():
  labels = np.array([0, 0, 1, 1, 3, 3])
  probs = np.array([[.7, .1, .1, .1], [.4, .3, .2, .1], [.2, .6, .1, .1], [.3, .3, .3, .1],
                    [.1, .1, .1, .7], [.2, .2, .1, .5]])
  values, reasons = multiclass.multiclass_metrics(labels, probs, GRADES)
  assert np.isnan(values['auroc_moderate']) and 'no studies' in reasons['auroc_moderate']
  present = [values[f'auroc_{g}'] for g in ('none', 'mild', 'severe')]
  assert values['macro_auroc'] == pytest.approx(np.mean(present))
  assert 'none, mild, severe' in reasons['macro_auroc']


def test_regression_metrics_equal_scikit_learn_and_bland_altman():
  _, studies = _regression_split()
  y, p = studies.labels, studies.probs
  rng = np.random.default_rng(2)
  weights = ev.resample_weights(rng.integers(0, len(y), (4, len(y))), len(y))
  weights[0] = 1.0
  resampled = regression.regression_resamples(y, p, weights)
  for b, w in enumerate(weights):
    values, _ = regression.regression_metrics(y, p, sample_weight=w)
    reps = np.repeat(np.arange(len(y)), w.astype(int))
    diff = p[reps] - y[reps]
    expected = {'mae': skm.mean_absolute_error(y, p, sample_weight=w),
                'rmse': np.sqrt(skm.mean_squared_error(y, p, sample_weight=w)),
                'r2': skm.r2_score(y, p, sample_weight=w), 'bias': diff.mean(),
                'loa_low': diff.mean() - 1.96 * diff.std(ddof=1), 'loa_high': diff.mean() + 1.96 * diff.std(ddof=1)}
    for name, value in expected.items():
      assert values[name] == pytest.approx(value, rel=1e-10), name
      assert resampled[name][b] == pytest.approx(value, rel=1e-9), (b, name)
  assert 1 < regression.regression_metrics(y, p)[0]['bias'] < 3   # the generated predictions are +2 biased


def test_multiclass_and_regression_summaries_have_cis_and_notes():
  videos, studies = _multiclass_split(n_studies=60)
  summary = ev.evaluate_task('multiclass', videos, studies, class_names=GRADES, n_resamples=200)
  assert summary['task'] == 'multiclass' and summary['class_names'] == list(GRADES)
  for level in ('study', 'video'):
    for name in multiclass.MULTICLASS_METRICS:
      entry = summary[level]['metrics'][name]
      assert entry['ci95'][0] <= entry['value'] <= entry['ci95'][1], (level, name)
      assert entry['n_resamples_used'] == 200
  assert np.sum(summary['study']['confusion_matrix']) == len(studies)
  assert summary['study']['class_counts'] == np.bincount(studies.labels, minlength=4).tolist()
  json.dumps(summary, allow_nan=False)

  videos, studies = _regression_split(n_studies=8)
  summary = ev.evaluate_task('regression', videos, studies, n_resamples=200, bootstrap='stratified')
  assert summary['bootstrap']['resampling'] == 'simple'  # nothing to stratify a continuous target by
  mae = summary['study']['metrics']['mae']
  assert mae['value'] == pytest.approx(skm.mean_absolute_error(studies.labels, studies.probs))
  assert mae['ci95'][0] <= mae['value'] <= mae['ci95'][1]
  assert 'CI rests on 8 studies' in mae['note']
  json.dumps(summary, allow_nan=False)


# ------------------------------------------------------------------ each task kind from its config variant
def _tiny_variant(variant, data_dir, **data):
  from configs import finetune as finetune_configs
  from tests import trainer_fixtures as tf_
  cfg = tf_._tiny(finetune_configs.get_config(variant), data_dir)
  cfg.data.update(builder_config='ci' if cfg.data.name == 'synthetic_echo' else '', **data)
  cfg.train.update(global_batch_size=8, num_epochs=1, steps_per_epoch=2, patience=1, log_every_steps=1)
  cfg.optim.lr = 1e-3
  cfg.eval.update(batch_size=8, bootstrap_resamples=50, report_saliency_studies=1)
  return cfg


def _noise_video(path, rng, level, frames=20, shape=(112, 112)):
  from echojax.data import video_io
  os.makedirs(os.path.dirname(path), exist_ok=True)
  video = np.clip(rng.normal(level, 25, (frames, *shape)), 0, 255).astype(np.uint8)
  video_io.write_video(str(path), video, 30.0)


def _split_of(i):
  return 'train' if i < 8 else ('val' if i < 11 else 'test')


def _write(path, header, rows):
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(header)
    w.writerows(rows)


def test_as_grade_multiclass_trains_and_evaluates(tmp_path):
  from tests import trainer_fixtures as tf_
  from echojax.jobs import finetune
  cfg = _tiny_variant('as_grade', tf_.build_ci_dataset(str(tmp_path / 'tfds')))
  result = finetune.train(cfg, str(tmp_path / 'run'))
  summary = result['reports']['test']
  assert summary['task'] == 'multiclass' and summary['class_names'] == list(GRADES)
  assert summary['study']['metrics']['quadratic_kappa']['value'] is not None
  state = json.load(open(tmp_path / 'run' / 'task_state.json'))
  assert state['num_outputs'] == 4 and 'threshold' not in state
  rows = list(csv.DictReader(open(tmp_path / 'run' / 'eval' / 'test' / 'study_predictions.csv')))
  assert list(rows[0])[2:6] == [f'prob_{g}' for g in GRADES]
  assert sum(float(rows[0][f'prob_{g}']) for g in GRADES) == pytest.approx(1.0)
  page = open(tmp_path / 'run' / 'eval' / 'test' / 'report.html', encoding='utf-8').read()
  assert 'Quadratic-weighted kappa' in page and 'confusion' in page.lower()


def test_ef_regression_on_a_generated_echonet_dynamic_folder(tmp_path):
  from echojax.jobs import finetune
  rng = np.random.default_rng(0)
  manual = tmp_path / 'echonet'
  rows = []
  for i in range(14):
    ef = float(rng.uniform(25, 70))
    rows.append([f'0XE{i:02d}', f'{ef:.1f}', '30', '80', '112', '112', '30', '20', _split_of(i).upper()])
    _noise_video(manual / 'Videos' / f'0XE{i:02d}.avi', rng, 60 + ef)
  _write(manual / 'FileList.csv', ['FileName', 'EF', 'ESV', 'EDV', 'FrameHeight', 'FrameWidth', 'FPS',
                                   'NumberOfFrames', 'Split'], rows)
  cfg = _tiny_variant('ef_regression', str(tmp_path / 'tfds'), manual_dir=str(manual))
  result = finetune.train(cfg, str(tmp_path / 'run'))
  summary = result['reports']['test']
  assert summary['task'] == 'regression' and summary['study']['n'] == 3
  mae = summary['study']['metrics']['mae']
  preds = list(csv.DictReader(open(tmp_path / 'run' / 'eval' / 'test' / 'study_predictions.csv')))
  expected = skm.mean_absolute_error([float(r['label']) for r in preds], [float(r['pred']) for r in preds])
  assert mae['value'] == pytest.approx(expected) and 'CI rests on 3 studies' in mae['note']
  state = json.load(open(tmp_path / 'run' / 'task_state.json'))
  train_efs = [float(r[1]) for r in rows[:8]]
  assert state['target_mean'] == pytest.approx(np.mean(train_efs), rel=1e-5)   # standardised on train
  for name in ('scatter.png', 'bland_altman.png', 'report.html'):
    assert os.path.getsize(tmp_path / 'run' / 'eval' / 'test' / name) > 1000, name


def test_lvh_binary_from_a_continuous_label_on_generated_echonet_lvh(tmp_path):
  from echojax.jobs import finetune
  rng = np.random.default_rng(1)
  manual = tmp_path / 'lvh'
  rows, ivsd = [], []
  for i in range(14):
    name = f'lvh{i:02d}'
    ivsd.append(1.3 if i % 2 else 0.8)          # LVH in every other video, in every split
    _noise_video(manual / 'Batch1' / f'{name}.avi', rng, 80 + 60 * (i % 2), shape=(120, 160))
    for calc, value in (('IVSd', ivsd[-1]), ('LVIDd', 4.5)):
      rows.append([len(rows), name, calc, value, 3, 1, 2, 3, 4, 20, 30, 160, 120, _split_of(i)])
  _write(manual / 'MeasurementsList.csv', ['', 'HashedFileName', 'Calc', 'CalcValue', 'Frame', 'X1', 'X2', 'Y1',
                                           'Y2', 'Frames', 'FPS', 'Width', 'Height', 'split'], rows)
  cfg = _tiny_variant('lvh', str(tmp_path / 'tfds'), manual_dir=str(manual))
  cfg.eval.html_report = False
  result = finetune.train(cfg, str(tmp_path / 'run'))
  summary = result['reports']['test']
  assert summary['task'] == 'binary' and summary['study']['n_pos'] == sum(np.array(ivsd[11:]) >= 1.1)
  assert result['pos_weight'] == pytest.approx(1.0)      # 4 of 8 training videos have LVH
  preds = list(csv.DictReader(open(tmp_path / 'run' / 'eval' / 'test' / 'study_predictions.csv')))
  assert sorted(int(r['label']) for r in preds) == sorted(int(v >= 1.1) for v in ivsd[11:])


def test_regression_step_loss_is_mse_over_finite_targets_and_task_labels():
  import jax.numpy as jnp
  from echojax.core import steps
  from echojax.jobs import tasks
  logits = jnp.array([[1.0], [2.0], [-1.0], [0.5]])
  labels = jnp.array([0.5, jnp.nan, -2.0, 0.5])     # NaN = unknown; negative standardised targets count
  batch = {'mask': jnp.array([1, 1, 1, 0])}
  valid = steps._valid_rows(batch, labels, 'regression')
  np.testing.assert_array_equal(np.asarray(valid), [1, 0, 1, 0])
  loss, mae = steps._supervised_loss(logits, labels, valid, 'regression', 1.0, 0.0)
  assert float(loss) == pytest.approx((0.5 ** 2 + 1.0 ** 2) / 2) and float(mae) == pytest.approx(0.75)
  # Labels as each task sees them: grade names / ClassLabel indices, a continuous value cut at binarize_at.
  grade = tasks.make_task(kind='multiclass', label_key='av_stenosis', class_names=GRADES)
  assert [grade.label(g) for g in ('none', 'severe', 'unknown')] == [0, 3, -1]
  grade = tasks.Task(**{**grade.__dict__, 'feature_names': GRADES + ('unknown',)})
  np.testing.assert_array_equal(grade.labels([3.0, 4.0, 1.0]), [3, -1, 1])
  lvh = tasks.make_task(kind='binary', label_key='ivsd', binarize_at=1.1)
  np.testing.assert_array_equal(lvh.labels([0.9, 1.1, np.nan]), [0, 1, -1])
  ef = tasks.with_standardisation(tasks.make_task(kind='regression', label_key='ef'), [40, 60, np.nan], True)
  assert (ef.target_mean, ef.target_std) == (50.0, 10.0)
  np.testing.assert_allclose(ef.train_targets([60.0, np.nan]), [1.0, np.nan])
  np.testing.assert_allclose(ef.outputs_to_values(np.array([[1.0, -1.0]])), [[60.0, 40.0]])
  with pytest.raises(ValueError, match='does not exist for a regression task'):
    tasks.check_early_stopping_metric(ef, 'val_auroc')
