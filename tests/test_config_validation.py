"""Config mistakes are caught before any work, each as one line naming the key: a repeated tuple override
replaces (never concatenates), wrong types/shapes/values and contradicting keys are reported together, an
unknown dataset lists the project's builders only, a global batch the devices cannot split is refused
before the workdir is touched, and clip lengths are checked against the videos' frames. On the command
line a user error is one stderr line (the traceback with --verbose) and exit code 2."""
import os
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from configs import demo as demo_config, finetune as finetune_config, ssl as ssl_config
from echojax import main as echojax_main
from echojax.jobs import config_checks
from echojax.jobs.errors import EXIT_USER_ERROR, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(argv):
  argv = echojax_main.last_override_wins(['prog'] + argv)
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file('config', 'configs/ssl.py', flag_values=values, sys_argv=argv)
  values(argv)
  return holder.value


def test_a_repeated_tuple_override_replaces_it(monkeypatch):
  monkeypatch.chdir(ROOT)
  cfg = _parse(['--config=configs/ssl.py:demo', '--config.model.stage_depths=1,1,1,1',
                '--config.model.stage_depths=2,1,1,1', '--config.optim.lr', '0.5', '--config.optim.lr=0.25'])
  assert tuple(cfg.model.stage_depths) == (2, 1, 1, 1) and cfg.optim.lr == 0.25


def test_the_defaults_of_every_config_are_valid():
  for cfg in [ssl_config.get_config(v) for v in ssl_config.VARIANTS] + [
      finetune_config.get_config(v) for v in finetune_config.VARIANTS if v != 'linear_probe'] + [
      demo_config.get_config()]:
    config_checks.validate(cfg)


def _problems(cfg) -> str:
  with pytest.raises(ConfigError) as error:
    config_checks.validate(cfg)
  message = str(error.value)
  assert '\n' not in message
  return message


def test_wrong_types_and_shapes_name_the_key():
  cfg = ssl_config.get_config('demo')
  cfg.model.stage_depths = ('oops',)
  assert 'model.stage_depths: expected a tuple of int' in _problems(cfg)
  cfg = ssl_config.get_config('demo')
  cfg.model.stage_depths = (1, 1)
  assert 'model.stage_depths=(1, 1) must be 4 positive ints' in _problems(cfg)
  cfg = ssl_config.get_config('demo')
  cfg.optim.unlock()
  cfg.optim.lr = float('nan')
  assert 'optim.lr: expected float (finite)' in _problems(cfg)


def test_allowed_values_and_ranges_are_reported_together():
  cfg = ssl_config.get_config('demo')
  cfg.model.dtype = 'float33'
  cfg.optim.name = 'adamz'
  cfg.data.image_size = 200
  cfg.train.log_every_steps = 0
  message = _problems(cfg)
  for part in ("model.dtype='float33'", "optim.name='adamz' must be one of adam, adamw, lars, sgd",
               'data.image_size=200 must be in [16, 112]', 'train.log_every_steps=0 must be ≥ 1'):
    assert part in message, message


def test_cross_key_checks():
  cfg = ssl_config.get_config('demo')
  cfg.data.clip_len = 12        # frame order over 12! permutations
  assert 'data.clip_len=12 with frame_order' in _problems(cfg)
  cfg = finetune_config.get_config('demo')
  cfg.init = 'ssl'
  assert "init='ssl' needs init_path" in _problems(cfg)
  cfg = demo_config.get_config()
  cfg.finetune.frac = 0.0
  assert 'finetune.frac=0.0 must be in (0, 1]' in _problems(cfg)


def test_an_unknown_dataset_lists_the_project_builders_only():
  cfg = ssl_config.get_config('demo')
  cfg.data.name = 'echonet_dinamic'
  message = _problems(cfg)
  assert message.endswith('echo_studies, echonet_dynamic, echonet_lvh, synthetic_echo') and len(message) < 250


def test_a_batch_the_devices_cannot_split_is_refused_before_the_workdir(tmp_path):
  from echojax.jobs import ssl as ssl_trainer
  from tests import trainer_fixtures
  cfg = trainer_fixtures.ssl_config('', steps=2)
  cfg.train.global_batch_size = 12            # 8 simulated devices (conftest)
  with pytest.raises(ConfigError, match='train.global_batch_size: .*device count 8'):
    ssl_trainer.train(cfg, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_clip_lengths_against_the_videos_frames():
  cfg = ssl_config.get_config('demo')
  meta = [{'num_frames': 40}, {'num_frames': 12}]
  notes = []
  config_checks.check_clips_fit(cfg.data, meta, 'train', notes.append)
  assert notes == ['note: data.finetune_clip_len spans 16 frames; 1 of 2 train videos are shorter '
                   '(their clips are zero-padded)',
                   'note: data.eval_clip_len spans 16 frames; 1 of 2 train videos are shorter '
                   '(their clips are zero-padded)']
  cfg.data.clip_stride = 20     # (4 - 1) · 20 + 1 = 61 frames > the longest video
  with pytest.raises(ConfigError, match='data.clip_len span 61 frames, but the longest train video has 40'):
    config_checks.check_clips_fit(cfg.data, meta, 'train', notes.append)


def _cli(*args, tmp_path):
  return subprocess.run([sys.executable, '-m', 'echojax.main', '--config=configs/ssl.py:demo',
                         f'--workdir={tmp_path / "run"}', *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=120, env=dict(os.environ, PYTHONPATH=ROOT))


def test_the_cli_prints_one_line_and_exit_code_2(tmp_path):
  bad = _cli('--config.model.stage_depths=oops', tmp_path=tmp_path)
  assert bad.returncode == EXIT_USER_ERROR
  lines = [line for line in bad.stderr.splitlines() if line.startswith('echojax:')]
  assert lines == [lines[-1]] and 'model.stage_depths' in lines[0] and 'Traceback' not in bad.stderr
  typo = _cli('--config.model.widht=8', tmp_path=tmp_path)
  assert typo.returncode == EXIT_USER_ERROR and 'Did you mean "width"' in typo.stderr
  assert 'Traceback' not in typo.stderr
  verbose = _cli('--config.model.stage_depths=oops', '--verbose', tmp_path=tmp_path)
  assert verbose.returncode == EXIT_USER_ERROR and 'Traceback' in verbose.stderr
  assert not os.path.exists(tmp_path / 'run')
