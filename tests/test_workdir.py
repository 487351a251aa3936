"""Workdir guards: a second run on a locked workdir fails at once naming the holder and writes nothing; a
stale lock (dead PID on this host) is taken over with a warning; a lock from another host is not guessed
at; a workdir of another mode, or with other model/data/objective settings, is refused before anything is
written (config.json byte-identical); allowed changes are recorded as config-<step>.json with the diff."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from configs import finetune as finetune_config, ssl as ssl_config
from echojax.jobs import workdir
from echojax.jobs.workdir import WorkdirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = ('import sys, time; from echojax.jobs import workdir; workdir.acquire(sys.argv[1], "ssl"); '
        'print("held", flush=True); time.sleep(120)')


@pytest.fixture
def held(tmp_path):
  """A workdir locked by another live process."""
  d = str(tmp_path / 'run')
  proc = subprocess.Popen([sys.executable, '-c', HOLD, d], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT))
  try:
    assert proc.stdout.readline().strip() == 'held'
    yield d, proc.pid
  finally:
    proc.kill()
    proc.wait()


def test_a_second_run_fails_at_once_naming_the_holder(held):
  d, pid = held
  t0 = time.time()
  with pytest.raises(WorkdirError, match=rf'in use by PID {pid} on host {socket.gethostname()}'):
    workdir.acquire(d)
  assert time.time() - t0 < 1


def test_a_second_trainer_writes_nothing(held):
  from echojax.jobs import ssl as ssl_trainer
  from tests import trainer_fixtures
  d, pid = held
  before = sorted(os.listdir(d))
  with pytest.raises(WorkdirError, match=f'PID {pid}'):
    ssl_trainer.train(trainer_fixtures.ssl_config('', steps=2), d)
  assert sorted(os.listdir(d)) == before == ['run.lock']


def test_a_dead_holder_on_this_host_is_taken_over_with_a_warning(tmp_path):
  d = str(tmp_path)
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  with open(os.path.join(d, workdir.LOCK_FILE), 'w') as f:
    json.dump({'host': socket.gethostname(), 'pid': dead.pid, 'started': 'earlier', 'mode': 'ssl'}, f)
  messages = []
  workdir.acquire(d, 'ssl', log=messages.append)
  try:
    assert len(messages) == 1 and 'taking over the stale lock' in messages[0] and str(dead.pid) in messages[0]
    assert json.load(open(os.path.join(d, workdir.LOCK_FILE)))['pid'] == os.getpid()
  finally:
    workdir.release(d)
  assert open(os.path.join(d, workdir.LOCK_FILE)).read() == ''   # released: emptied, not deleted
  workdir.acquire(d, log=messages.append)                       # and free again, without a warning
  workdir.release(d)
  assert len(messages) == 1


def test_a_lock_from_another_host_is_not_taken_over(tmp_path):
  d = str(tmp_path)
  with open(os.path.join(d, workdir.LOCK_FILE), 'w') as f:
    json.dump({'host': 'elsewhere', 'pid': 1, 'started': 'earlier'}, f)
  with pytest.raises(WorkdirError, match='host elsewhere.*cannot check'):
    workdir.acquire(d)


def _cfg(module, variant, **changes):
  cfg = module.get_config(variant)
  for key, value in changes.items():
    node = cfg
    *path, leaf = key.split('.')
    for p in path:
      node = node[p]
    node[leaf] = value
  return cfg


def test_a_workdir_of_another_mode_is_refused_before_writing(tmp_path):
  d = str(tmp_path)
  workdir.check_and_record_config(ssl_config.get_config('demo'), d)
  before = open(os.path.join(d, 'config.json'), 'rb').read()
  with pytest.raises(WorkdirError, match=r"holds a 'ssl' run .* 'finetune' job"):
    workdir.check_and_record_config(finetune_config.get_config('demo'), d)
  assert open(os.path.join(d, 'config.json'), 'rb').read() == before
  assert os.listdir(d) == ['config.json']


def test_changed_model_data_or_objective_is_refused_naming_the_keys(tmp_path):
  d = str(tmp_path)
  workdir.check_and_record_config(ssl_config.get_config('demo'), d)
  before = open(os.path.join(d, 'config.json'), 'rb').read()
  changed = _cfg(ssl_config, 'demo', **{'model.width': 16, 'data.clip_len': 3, 'ssl.temperature': 0.5})
  with pytest.raises(WorkdirError) as error:
    workdir.check_and_record_config(changed, d)
  message = str(error.value)
  assert '\n' not in message
  for key in ('model.width (8 → 16)', 'data.clip_len (4 → 3)', 'ssl.temperature (0.05 → 0.5)'):
    assert key in message
  assert open(os.path.join(d, 'config.json'), 'rb').read() == before and os.listdir(d) == ['config.json']


def test_allowed_changes_are_recorded_with_the_diff(tmp_path):
  d = str(tmp_path)
  base = ssl_config.get_config('demo')
  steps = base.train.num_steps
  workdir.check_and_record_config(base, d)
  os.makedirs(os.path.join(d, 'checkpoints', '100'))          # the run resumes from step 100
  longer = _cfg(ssl_config, 'demo', **{'train.num_steps': 2 * steps, 'train.log_every_steps': 5})
  messages = []
  workdir.check_and_record_config(longer, d, log=messages.append)
  assert json.load(open(os.path.join(d, 'config.json')))['train']['num_steps'] == steps
  assert json.load(open(os.path.join(d, 'config-100.json')))['train']['num_steps'] == 2 * steps
  assert len(messages) == 1 and f'train.num_steps {steps} → {2 * steps}' in messages[0]
  assert 'config-100.json' in messages[0]
  workdir.check_and_record_config(longer, d, log=messages.append)   # the same settings again: nothing new
  assert len(messages) == 1 and sorted(os.listdir(d)) == ['checkpoints', 'config-100.json', 'config.json']


def test_keys_added_by_a_newer_code_version_are_recorded_not_refused(tmp_path):
  d = str(tmp_path)
  workdir.check_and_record_config(ssl_config.get_config('demo'), d)
  saved = json.load(open(os.path.join(d, 'config.json')))
  del saved['model']['remat'], saved['model']['bn_mode']       # as if written before these keys existed
  with open(os.path.join(d, 'config.json'), 'w') as f:
    json.dump(saved, f)
  messages = []
  workdir.check_and_record_config(ssl_config.get_config('demo'), d, log=messages.append)
  assert 'model.bn_mode (absent) → "global"' in messages[0] and os.path.exists(os.path.join(d, 'config-0.json'))
