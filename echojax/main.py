"""Entry point: `python -m echojax.main --config=configs/<job>.py[:VARIANT] [--workdir=DIR] [--config.x=y]`.

Dispatches on `config.mode` (ssl | finetune | evaluate | demo). The workdir defaults to
`runs/<mode>-<variant>-<timestamp>`; rerunning with the same workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import datetime
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/ssl.py', 'Config file (file.py[:variant]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (default runs/<mode>-<variant>-<time>).')


def default_workdir(cfg) -> str:
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  return os.path.join('runs', f'{cfg.mode}-{cfg.get("variant", "default")}-{stamp}')


def run(cfg, workdir: str):
  """Runs one job; returns the job's result dict (used by tests and scripts)."""
  mode = cfg.mode
  if mode == 'ssl':
    from echojax import ssl_trainer
    return ssl_trainer.train(cfg, workdir)
  if mode == 'finetune':
    from echojax import finetune_trainer
    return finetune_trainer.train(cfg, workdir)
  if mode == 'evaluate':
    from echojax import evaluate_job
    return evaluate_job.run(cfg, workdir)
  if mode == 'demo':
    from echojax import demo
    return demo.run(cfg, workdir)
  raise ValueError(f'unknown config.mode {mode!r} (ssl | finetune | evaluate | demo)')


def quiet_library_logs():
  """Keeps stdout readable: TF/TFDS/Orbax INFO chatter off; warnings and errors still shown."""
  import logging as pylogging
  from absl import logging
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  logging.set_verbosity(logging.WARNING)
  noisy = ('FeatureConnector.dtype', 'is an ordered dataset', 'Unable to initialize backend')
  pylogging.getLogger('absl').addFilter(lambda r: not any(n in r.getMessage() for n in noisy))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  quiet_library_logs()
  cfg = _CONFIG.value
  workdir = _WORKDIR.value or default_workdir(cfg)
  print(f'echojax {cfg.mode} ({cfg.get("variant", "")}) → workdir {workdir}', flush=True)
  run(cfg, workdir)


if __name__ == '__main__':
  sys.path.insert(0, os.getcwd())  # so `configs` and `data_builders` import from the repo root
  app.run(main)
