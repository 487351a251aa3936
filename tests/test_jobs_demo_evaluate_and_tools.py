"""The user-facing jobs on a tiny fine-tuned model: `configs/evaluate.py` on a checkpoint (reports,
report.html, MODEL_CARD.md, decisions reused from the run), the `predict` and `saliency` command lines
(predict itself: tests/test_predict.py), the demo end to end in a shortened form (calibrated report and the
valve-box score), and the label-efficiency smoke preset."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from echojax.jobs import demo, evaluate as evaluate_job, finetune as finetune_trainer
from echojax.tools import predict, saliency
from echojax.data import video_io
from tests import trainer_fixtures as tf_


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tf_.build_ci_dataset(str(tmp_path_factory.mktemp('tfds')))


@pytest.fixture(scope='module')
def finetuned(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('ft'))
  cfg = tf_.finetune_config(data_dir)
  cfg.train.num_epochs = 1
  cfg.eval.splits = ('val',)
  cfg.eval.report_saliency_studies = 1
  finetune_trainer.train(cfg, workdir)
  return workdir


def test_evaluate_job_on_a_checkpoint(finetuned, tmp_path):
  from configs import evaluate
  cfg = evaluate.get_config()
  cfg.checkpoint, cfg.splits, cfg.output, cfg.bootstrap_resamples = finetuned, 'test', str(tmp_path), 100
  summaries = evaluate_job.run(cfg, str(tmp_path))
  assert set(summaries) == {'test'}
  summary = json.load(open(tmp_path / 'test' / 'summary.json'))
  assert summary['study']['n_studies'] == 6
  # Without the validation split, the threshold chosen during fine-tuning is reused, not dropped.
  with open(os.path.join(finetuned, 'task_state.json')) as f:
    state = json.load(f)
  assert summary['thresholds']['chosen']['study'] == pytest.approx(state['threshold']['study'])
  rows = list(csv.DictReader(open(tmp_path / 'test' / 'predictions.csv')))
  assert {'study_id', 'video_id', 'label'} <= set(rows[0]) and len(rows) >= 6
  page = open(tmp_path / 'test' / 'report.html', encoding='utf-8').read()
  assert 'Saliency (Grad-CAM) by study' in page and page.count('data:image/png;base64,') >= 6
  assert os.path.exists(tmp_path / 'MODEL_CARD.md')
  assert os.path.exists(os.path.join(finetuned, 'MODEL_CARD.md'))


def test_evaluate_job_missing_checkpoint_is_named(tmp_path):
  from configs import evaluate
  cfg = evaluate.get_config()
  cfg.checkpoint = str(tmp_path / 'missing_run')
  with pytest.raises(FileNotFoundError, match='missing_run'):
    evaluate_job.run(cfg, str(tmp_path))


def test_predict_and_saliency_command_lines(finetuned, tmp_path, capsys):
  rng = np.random.default_rng(0)
  folder = tmp_path / 'videos'
  folder.mkdir()
  for name in ('s1_0', 's1_1', 's2_0'):
    video_io.write_video(str(folder / f'{name}.avi'), rng.integers(0, 255, (20, 112, 112), np.uint8), 50)
  predict.main(['--checkpoint', finetuned, '--input', str(folder), '--out', str(tmp_path / 'p1')])
  printed = capsys.readouterr().out
  assert 's1: Severe aortic stenosis score' in printed and 'uncalibrated scores' in printed
  with open(tmp_path / 'manifest.csv', 'w') as f:
    f.write('study_id,fpath\ns1,videos/s1_0.avi\ns1,videos/s1_1.avi\ns2,videos/s2_0.avi\n')
  by_manifest = predict.predict(finetuned, str(tmp_path / 'manifest.csv'), str(tmp_path / 'p2'))
  by_folder = list(csv.DictReader(open(tmp_path / 'p1' / 'study_predictions.csv')))
  assert {r['study_id']: float(r['prob']) for r in by_folder} == pytest.approx(
      {r['study_id']: r['prob'] for r in by_manifest['studies']})

  saliency.main(['--checkpoint', finetuned, '--input', str(folder / 's1_0.avi'), '--out', str(tmp_path / 'sal')])
  assert 's1.png' in os.listdir(tmp_path / 'sal')
  assert 'threshold' in capsys.readouterr().out


def test_demo_end_to_end_shortened(data_dir, tmp_path):
  cfg = tf_.demo_config(data_dir)
  cfg.data.min_plax_prob = 0.5    # the fixture fine-tunes with the paper variant, which filters views (a no-op here)
  cfg.finetune.eval.calibration = 'platt'          # as configs/finetune.py:demo
  cfg.finetune.eval.report_saliency_studies = 1
  result = demo.run(cfg, str(tmp_path))
  assert [r['init'] for r in result['rows']] == ['ssl', 'random']
  table = open(tmp_path / 'demo_results.md').read()
  assert 'ssl' in table and 'random' in table and '[' in table
  assert os.path.exists(result['saliency'][0]['png'])
  assert os.path.exists(tmp_path / 'finetune-ssl' / 'eval' / 'test' / 'summary.json')
  assert os.path.exists(tmp_path / 'finetune-ssl' / 'eval' / 'test' / 'report.html')
  valve = result['valve_localisation']
  assert valve['n_videos'] >= 1 and 0 <= valve['energy_in_box'] <= 1 and 0 < valve['box_area_share'] < 1
  summary = json.load(open(tmp_path / 'finetune-ssl' / 'eval' / 'test' / 'summary.json'))
  assert 'brier' in summary['study']['metrics']
  # Platt is fitted on validation unless the tiny validation split is perfectly separated (then the run
  # logs why and reports uncalibrated scores; tests/test_calibration.py covers both paths).
  assert summary['calibration'] in ('platt, fitted on val', None)
  assert ('uncalibrated scores' in demo.clinical_lines(summary, 'ssl')) == (summary['calibration'] is None)
  pretraining = json.load(open(tmp_path / 'demo_results.json'))['pretraining']
  assert pretraining['steps'] == cfg.pretrain.train.num_steps and 'order_acc_last_quarter' in pretraining


def test_demo_pretraining_summary_reads_the_last_quarter(tmp_path):
  rows = [{'step': s, 'train/nt_xent': 5.0 - s / 100, 'train/order_acc': s / 1000, 'train/order_acc_rev': s / 500,
           'train/contrastive_encoder_share': min(max((s - 20) / 20, 0.0), 1.0)} for s in range(10, 101, 10)]
  path = tmp_path / 'metrics.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows) + json.dumps({'step': 100, 'probe/auroc': 0.7}))
  p = demo.pretraining_summary(str(path), clip_len=4)
  assert p['steps'] == 100 and p['last_quarter_from_step'] == 80
  assert p['nt_xent_at_full_weight_step'] == 40 and p['nt_xent_at_full_weight'] == pytest.approx(4.6)
  assert p['nt_xent_last_quarter'] == pytest.approx(5.0 - 0.9)               # steps 80, 90, 100
  assert p['first_quarter_to_step'] == 20 and p['nt_xent_first_quarter'] == pytest.approx(5.0 - 0.15)  # 10, 20
  assert 'mean 4.850 over steps ≤ 20' in demo.pretraining_line(p)
  assert p['order_acc_last_quarter'] == pytest.approx(0.09) and p['order_acc_rev_last_quarter'] == pytest.approx(0.18)
  assert p['order_chance'] == pytest.approx(1 / 24) and p['order_rev_chance'] == pytest.approx(1 / 12)
  assert 'chance 0.042 / 0.083' in demo.pretraining_line(p)
  assert demo.pretraining_summary(str(tmp_path / 'absent.jsonl')) is None


def test_label_efficiency_smoke_preset(data_dir, tmp_path):
  from scripts import label_efficiency
  out = str(tmp_path / 'le')
  label_efficiency.main(['--preset', 'smoke', '--out', out, '--data-dir', data_dir, '--no-probe'])
  with open(os.path.join(out, 'results.csv')) as f:
    rows = list(csv.DictReader(f))
  # 2 inits × (2 seeds at the smallest fraction + 1 at 100 %), each with a test AUROC and its CI.
  assert sorted((r['init'], float(r['frac']), int(r['seed'])) for r in rows) == sorted(
      (init, frac, seed) for init in ('random', 'echoclr') for frac, seeds in ((0.5, (0, 1)), (1.0, (0,)))
      for seed in seeds)
  for r in rows:
    assert r['auroc'] == '' or float(r['ci_lo']) <= float(r['auroc']) <= float(r['ci_hi'])
  table = open(os.path.join(out, 'results.md')).read()
  assert '| 50% |' in table and '(2 runs)' in table and 'echoclr' in table
  assert os.path.getsize(os.path.join(out, 'label_efficiency.png')) > 1000
  # Paired comparisons: echoclr − random on the same test studies, per seed and pooled over seeds.
  with open(os.path.join(out, 'paired.csv')) as f:
    per_seed = list(csv.DictReader(f))
  assert [(r['init_a'], r['init_b'], float(r['frac']), int(r['seed'])) for r in per_seed] == [
      ('echoclr', 'random', 0.5, 0), ('echoclr', 'random', 0.5, 1), ('echoclr', 'random', 1.0, 0)]
  for r in per_seed:
    aurocs = {a['init']: a['auroc'] for a in rows if (a['frac'], a['seed']) == (r['frac'], r['seed'])}
    if r['difference']:  # the difference of the two runs' own AUROCs, DeLong's p a probability
      assert float(r['difference']) == pytest.approx(float(aurocs['echoclr']) - float(aurocs['random']))
    assert r['delong_p'] == '' or 0 <= float(r['delong_p']) <= 1
  with open(os.path.join(out, 'paired_pooled.csv')) as f:
    pooled = list(csv.DictReader(f))
  assert [(float(r['frac']), int(r['n_seeds'])) for r in pooled] == [(0.5, 2), (1.0, 1)]
  assert '## Paired comparisons' in table and '| 50% | echoclr − random | 2 |' in table
  # Rerunning trains nothing: every run is reused (report-only would say "not run yet" otherwise).
  before = os.path.getmtime(os.path.join(out, 'ft-random-frac1-seed0', 'eval', 'test', 'summary.json'))
  label_efficiency.main(['--preset', 'smoke', '--out', out, '--data-dir', data_dir, '--report-only'])
  assert os.path.getmtime(os.path.join(out, 'ft-random-frac1-seed0', 'eval', 'test', 'summary.json')) == before
