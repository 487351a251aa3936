"""scripts/label_efficiency.py's run queue: the order runs are trained in, claims between worker processes
(a live holder is respected, a dead one's claim is taken over), fine-tunes waiting for their encoder, and
one-class subsets recorded as skipped. The whole grid end to end: the smoke preset in
tests/test_jobs_demo_evaluate_and_tools.py (with two workers)."""
import os
import subprocess
import sys
import types

import pytest

from scripts import label_efficiency as le


def test_finetune_order_puts_the_extremes_then_the_extra_seeds_then_the_middle_fractions():
  p = dict(fractions=(0.01, 0.02, 0.1, 1.0), seeds=(0,), fraction_seeds={0.01: (0, 1, 2), 0.02: (0, 1, 2)})
  inits = [('random', ''), ('echoclr', 'enc')]
  order = [(f, name, s) for f, (name, _), s in le._finetune_order(p, inits)]
  assert order[:6] == [(0.01, 'random', 0), (0.01, 'echoclr', 0), (1.0, 'random', 0), (1.0, 'echoclr', 0),
                       (0.02, 'random', 0), (0.02, 'echoclr', 0)]
  assert order[6:14] == [(f, n, s) for s in (1, 2) for f in (0.01, 0.02) for n in ('random', 'echoclr')]
  assert order[14:] == [(0.1, 'random', 0), (0.1, 'echoclr', 0)]
  assert len(set(order)) == len(order) == 2 * (3 + 3 + 1 + 1)
  assert le._ssl_order(('echoclr', 'mi_simclr', 'simclr')) == ['mi_simclr', 'simclr', 'echoclr']


def test_claims_respect_a_live_holder_and_take_over_a_dead_one(tmp_path):
  out = str(tmp_path)
  assert le._claim(out, 'run-a') and le._claim(out, 'run-a')   # our own claim stays ours
  holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    with open(os.path.join(out, 'claims', 'run-b'), 'w') as f:
      f.write(str(holder.pid))
    assert not le._claim(out, 'run-b')
  finally:
    holder.kill()
    holder.wait()
  assert le._claim(out, 'run-b')                               # its holder died: taken over
  assert open(os.path.join(out, 'claims', 'run-b')).read() == str(os.getpid())
  le._release(out, 'run-b')
  assert not os.path.exists(os.path.join(out, 'claims', 'run-b'))


class _Fakes:
  """Stand-in trainers that only write the files the queue looks for, recording the order of runs."""
  def __init__(self, out, one_class=()):
    self.calls, self.one_class = [], one_class
    self.ssl_trainer = types.SimpleNamespace(train=lambda cfg, wd: self.calls.append(os.path.basename(wd)))
    self.export = types.SimpleNamespace(export_encoder=self._export)
    self.finetune_trainer = types.SimpleNamespace(train=self._finetune)

  def _export(self, wd, enc):
    os.makedirs(enc, exist_ok=True)
    open(os.path.join(enc, 'encoder_spec.json'), 'w').write('{}')

  def _finetune(self, cfg, wd):
    self.calls.append(os.path.basename(wd))
    if (cfg.init, cfg.frac) in self.one_class:
      raise LabelFractionErrorForTest('the subset drew one class')
    os.makedirs(os.path.join(wd, 'eval', 'test'), exist_ok=True)
    open(os.path.join(wd, 'eval', 'test', 'summary.json'), 'w').write('{}')


class LabelFractionErrorForTest(ValueError):
  pass


def _grid(out):
  p = dict(le.PRESETS['smoke'], methods=('echoclr',), fractions=(0.5, 1.0), fraction_seeds={0.5: (0, 1)})
  args = types.SimpleNamespace(data_dir='', manual_dir='', no_probe=True)
  encoders = {'echoclr': os.path.join(out, 'ssl-echoclr', 'encoder')}
  inits = [('random', ''), ('echoclr', encoders['echoclr'])]
  jobs = [('ssl', 'echoclr')] + [('ft', item) for item in le._finetune_order(p, inits)]
  return p, args, encoders, jobs


def test_work_runs_every_job_once_and_a_rerun_trains_nothing(tmp_path):
  out = str(tmp_path)
  p, args, encoders, jobs = _grid(out)
  fakes = _Fakes(out, one_class={('random', 0.5)})
  run = lambda: le._work(jobs, out, p, args, encoders, fakes.ssl_trainer, fakes.export,
                         fakes.finetune_trainer, LabelFractionErrorForTest)
  run()
  assert fakes.calls[0] == 'ssl-echoclr' and len(fakes.calls) == len(jobs) == 7
  assert sorted(fakes.calls[1:]) == sorted(os.path.basename(le._ft_dir(out, item)) for _, item in jobs[1:])
  skipped = open(os.path.join(out, 'ft-random-frac0.5-seed0', le.SKIPPED)).read()
  assert 'random 50% seed 0' in skipped and 'one class' in skipped
  assert os.listdir(os.path.join(out, 'claims')) == []
  fakes.calls.clear()
  run()
  assert fakes.calls == []


def test_a_finetune_waits_for_an_encoder_another_worker_is_pretraining(tmp_path, monkeypatch):
  out = str(tmp_path)
  p, args, encoders, jobs = _grid(out)
  fakes = _Fakes(out)
  holder = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  os.makedirs(os.path.join(out, 'claims'))
  with open(os.path.join(out, 'claims', 'ssl-echoclr'), 'w') as f:
    f.write(str(holder.pid))
  sleeps = []

  def fake_sleep(seconds):   # the other worker finishes its pretraining while we wait
    sleeps.append(seconds)
    fakes._export(None, encoders['echoclr'])
    holder.kill()
    holder.wait()
  monkeypatch.setattr(le.time, 'sleep', fake_sleep)
  try:
    le._work(jobs, out, p, args, encoders, fakes.ssl_trainer, fakes.export, fakes.finetune_trainer,
             LabelFractionErrorForTest)
  finally:
    holder.kill()
  assert sleeps and 'ssl-echoclr' not in fakes.calls   # never retrained what the other worker made
  random_runs = [c for c in fakes.calls if c.startswith('ft-random')]
  assert fakes.calls[:len(random_runs)] == random_runs == ['ft-random-frac0.5-seed0', 'ft-random-frac1-seed0',
                                                           'ft-random-frac0.5-seed1']


def test_work_stops_with_a_clear_error_when_a_run_leaves_no_result(tmp_path):
  out = str(tmp_path)
  p, args, encoders, jobs = _grid(out)
  fakes = _Fakes(out)
  fakes.export = types.SimpleNamespace(export_encoder=lambda wd, enc: None)   # pretraining "succeeds", no export
  with pytest.raises(RuntimeError, match='ssl-echoclr finished without writing its result'):
    le._work(jobs, out, p, args, encoders, fakes.ssl_trainer, fakes.export, fakes.finetune_trainer,
             LabelFractionErrorForTest)


def test_only_selects_the_named_inits_jobs_and_rejects_unknown_names():
  p = dict(fractions=(0.01, 1.0), seeds=(0,), fraction_seeds={0.01: (0, 1)})
  inits = [('random', ''), ('simclr', 'e/simclr'), ('echoclr', 'e/echoclr')]
  jobs = [('ssl', m) for m in le._ssl_order(('echoclr', 'simclr'))] + [
      ('ft', item) for item in le._finetune_order(p, inits)]
  names = [n for n, _ in inits]
  assert le._select_jobs(jobs, '', names) == jobs
  picked = le._select_jobs(jobs, 'random, simclr', names)
  assert ('ssl', 'simclr') in picked and ('ssl', 'echoclr') not in picked
  assert {item[1][0] for kind, item in picked if kind == 'ft'} == {'random', 'simclr'}
  assert len([j for j in picked if j[0] == 'ft']) == 6
  with pytest.raises(SystemExit, match='kinetics'):
    le._select_jobs(jobs, 'kinetics', names)
