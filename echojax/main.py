"""Entry point: `python -m echojax.main --config=configs/<job>.py[:VARIANT] [--workdir=DIR] [--config.x=y]`.

Dispatches on `config.mode` to the job module `echojax.jobs.<mode>` (ssl | finetune | evaluate | demo), each
with `run(cfg, workdir)`. `configs/...` resolves against the current directory first, then the installed
`configs` package. The workdir defaults to `runs/<mode>-<variant>-<timestamp>`; rerunning with the same
workdir resumes from its latest checkpoint.
"""
from __future__ import annotations

import datetime
import importlib
import os
import sys

from absl import app, flags
from ml_collections import config_flags

JOBS = ('ssl', 'finetune', 'evaluate', 'demo')


def resolve_config_path(value: str) -> str:
  """`configs/x.py[:variant]` → the file under the cwd if it exists, else the installed package's."""
  path, sep, variant = value.partition(':')
  if not os.path.exists(path) and path.replace(os.sep, '/').startswith('configs/'):
    import configs
    installed = os.path.join(os.path.dirname(configs.__file__), path.split('/', 1)[1])
    if os.path.exists(installed):
      path = installed
  return path + sep + variant


def _resolve_config_argv(argv: list[str]) -> list[str]:
  out = []
  for i, arg in enumerate(argv):
    if arg.startswith('--config=') and i > 0:
      arg = '--config=' + resolve_config_path(arg[len('--config='):])
    elif i > 0 and argv[i - 1] == '--config':
      arg = resolve_config_path(arg)
    out.append(arg)
  return out


_CONFIG = config_flags.DEFINE_config_file('config', resolve_config_path('configs/ssl.py'),
                                          'Config file (file.py[:variant]).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (default runs/<mode>-<variant>-<time>).')


def default_workdir(cfg) -> str:
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  return os.path.join('runs', f'{cfg.mode}-{cfg.get("variant", "default")}-{stamp}')


def run(cfg, workdir: str):
  """Runs one job; returns the job's result dict (used by tests and scripts)."""
  if cfg.mode not in JOBS:
    raise ValueError(f'unknown config.mode {cfg.mode!r} ({" | ".join(JOBS)})')
  return importlib.import_module(f'echojax.jobs.{cfg.mode}').run(cfg, workdir)


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


def cli():
  """Console script `echojax`."""
  app.run(main, argv=_resolve_config_argv(sys.argv))


if __name__ == '__main__':
  cli()
