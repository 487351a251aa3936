"""Stop notices: one SIGTERM stops every checkpoint manager of a job; a notice inside a long phase ends it;
a process stuck past the deadline still exits with the preemption code; fine-tuning (two managers) saves
on a notice that lands in validation and resumes exactly (step, optimiser, early-stopping state, best
weights); the CLI exits promptly after SIGTERM with code 75, one message line and a checkpoint."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from echojax.jobs import checkpointing, logging_lib, preemption
from echojax.jobs.errors import EXIT_PREEMPTED
from tests import trainer_fixtures as tf_

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tf_.build_ci_dataset(str(tmp_path_factory.mktemp('tfds')))


def test_one_notice_stops_every_checkpointer_of_a_job(tmp_path):
  previous = signal.getsignal(signal.SIGTERM)
  latest = checkpointing.Checkpointer(str(tmp_path), save_every=100)
  best = checkpointing.Checkpointer(str(tmp_path), keep=1, subdir='best', async_save=False)
  try:
    with preemption.listening():
      assert not preemption.should_stop(1)
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(0.1)
      assert preemption.should_stop(2) and preemption.requested()
      with pytest.raises(preemption.Preempted, match='preempted at step 2') as stop:
        latest.preempt(2, {'state': {'w': np.ones(3)}})
      assert stop.value.code == EXIT_PREEMPTED
    assert signal.getsignal(signal.SIGTERM) is previous and not preemption.requested()
    assert checkpointing.completed_steps(latest.directory) == [2]
  finally:
    latest.close()
    best.close()


def test_a_notice_ends_a_long_phase_between_items():
  seen = []
  with preemption.listening():
    with pytest.raises(preemption.Preempted, match='during val inference'):
      for i in logging_lib.progress(range(10), 'val inference', 10):
        seen.append(i)
        if i == 2:
          os.kill(os.getpid(), signal.SIGTERM)
          time.sleep(0.1)
  assert seen == [0, 1, 2]


def test_a_process_stuck_past_the_deadline_still_exits_with_the_code():
  code = ('import sys, time; from echojax.jobs import preemption; preemption.DEADLINE_S = 2; '
          'preemption.install(); print("ready", flush=True); time.sleep(60)')
  proc = subprocess.Popen([sys.executable, '-c', code], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.stdout.readline().strip() == 'ready'
  t0 = time.time()
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=30)
  assert proc.returncode == EXIT_PREEMPTED and time.time() - t0 < 10
  assert 'could not save within 2 s of the SIGTERM' in stderr


def _meta(workdir, step):
  with open(os.path.join(workdir, 'checkpoints', str(step), 'meta', 'metadata')) as f:
    return json.load(f)


def _leaves_named(tree, name):
  if isinstance(tree, dict):
    return [v for k, v in tree.items() if k == name] + [x for v in tree.values() for x in _leaves_named(v, name)]
  if isinstance(tree, (list, tuple)):
    return [x for v in tree for x in _leaves_named(v, name)]
  return []


def test_finetune_notice_in_validation_saves_and_resumes_exactly(data_dir, tmp_path, monkeypatch):
  from echojax.jobs import finetune, startup
  workdir = str(tmp_path / 'ft')
  cfg = tf_.finetune_config(data_dir)
  cfg.train.num_epochs, cfg.train.patience = 3, 3   # 6 steps, validation after steps 2, 4, 6
  cfg.eval.splits = ('val',)
  jit = startup.jit_train_step
  calls = []

  def jit_with_a_notice_at_step_4(step_fn, mesh):
    compiled = jit(step_fn, mesh)
    def step(*args):
      out = compiled(*args)
      calls.append(1)
      if len(calls) == 4:   # lands before the epoch-end validation of step 4
        os.kill(os.getpid(), signal.SIGTERM)
      return out
    return step

  monkeypatch.setattr(startup, 'jit_train_step', jit_with_a_notice_at_step_4)
  with pytest.raises(preemption.Preempted, match='preempted at step 4'):
    finetune.train(cfg, workdir)
  assert checkpointing.completed_steps(os.path.join(workdir, 'checkpoints')) == [2, 4]
  es = _meta(workdir, 4)
  assert es['pending_validation'] == 4 and es['best_step'] == 2 and es['bad_epochs'] == 0
  assert [h['step'] for h in es['history']] == [2]
  _, state = checkpointing.restore_raw(workdir, step=4)
  assert int(np.asarray(state['step'])) == 4
  assert {int(np.asarray(c)) for c in _leaves_named(state['opt_state'], 'count')} == {4}
  _, saved_best = checkpointing.restore_raw(workdir, step=4, item='best')
  best_step, best_dir = checkpointing.restore_raw(workdir, subdir='best')
  assert best_step == 2
  for a, b in zip(jax.tree_util.tree_leaves(saved_best['params']), jax.tree_util.tree_leaves(best_dir['params'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  monkeypatch.setattr(startup, 'jit_train_step', jit)
  result = finetune.train(cfg, workdir)
  assert result['step'] == 6 and [h['step'] for h in result['best']['history']] == [2, 4, 6]
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in rows if 'val_loss' in r] == [2, 4, 6]           # each validation once
  assert [r['step'] for r in rows if 'train/loss' in r] == [1, 2, 3, 4, 5, 6]


def test_cli_exits_promptly_after_sigterm_with_code_75(data_dir, tmp_path):
  workdir = tmp_path / 'ssl'
  overrides = ['--config.data.builder_config=ci', f'--config.data.data_dir={data_dir}',
               '--config.data.image_size=32', '--config.model.width=4', '--config.model.stage_depths=1,1,1,1',
               '--config.model.conv_impl=xla', '--config.train.global_batch_size=8',
               '--config.train.num_steps=100000', '--config.train.log_every_steps=1',
               '--config.train.checkpoint_every_steps=100000', '--config.probe.every_steps=0']
  proc = subprocess.Popen([sys.executable, '-m', 'echojax.main', '--config=configs/ssl.py:demo',
                           f'--workdir={workdir}', *overrides], cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT, JAX_NUM_CPU_DEVICES='1', XLA_FLAGS=''))
  metrics = workdir / 'metrics.jsonl'
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.communicate()[1][-3000:]
  t0 = time.time()
  proc.send_signal(signal.SIGTERM)
  stdout, stderr = proc.communicate(timeout=60)
  elapsed = time.time() - t0
  assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
  assert elapsed < 10, elapsed
  message = [line for line in stderr.splitlines() if line.startswith('echojax: preempted at step')]
  assert len(message) == 1, stderr[-3000:]
  step = int(message[0].split('preempted at step ')[1].split(':')[0])
  assert checkpointing.completed_steps(str(workdir / 'checkpoints')) == [step]
  assert json.loads(metrics.read_text().splitlines()[-1])['step'] >= step - 1


def test_ctrl_c_once_saves_twice_aborts():
  with preemption.listening():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.6)             # the first Ctrl-C is a notice, even when handled late
    assert preemption.should_stop(1)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.6)
