"""Entry point: `python -m echojax.main --config=configs/<job>.py[:VARIANT] [--workdir=DIR] [--config.x=y]
[--verbose]`.

Dispatches on `config.mode` to the job module `echojax.jobs.<mode>` (ssl | finetune | evaluate | demo), each
with `run(cfg, workdir)`. `configs/...` resolves against the current directory first, then the installed
`configs` package. The workdir defaults to `runs/<mode>-<variant>-<timestamp>`; rerunning with the same
workdir resumes from its latest checkpoint. The config is validated before any work; user errors print
one line (the traceback with --verbose) and every way a job ends has its exit code (echojax.jobs.errors).
"""
from __future__ import annotations

import datetime
import importlib
import os
import sys
import traceback

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


def last_override_wins(argv: list[str]) -> list[str]:
  """Keeps only the last `--config.KEY` of each key: ml_collections appends repeated tuple overrides
  (`--config.model.stage_depths=1,1,1,1` twice would give 8 stages) while scalars already take the last."""
  spans = []   # (key, first index, one past the last index) of every --config.KEY[=VALUE | VALUE]
  i = 1
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--config.'):
      key, has_value, _ = arg.partition('=')
      end = i + 1 if has_value or i + 1 >= len(argv) else i + 2
      spans.append((key, i, end))
      i = end
    else:
      i += 1
  last = {key: start for key, start, _ in spans}
  drop = {j for key, start, end in spans if last[key] != start for j in range(start, end)}
  return [arg for j, arg in enumerate(argv) if j not in drop]


def _resolve_config_argv(argv: list[str]) -> list[str]:
  out = []
  for i, arg in enumerate(argv):
    if arg.startswith('--config=') and i > 0:
      arg = '--config=' + resolve_config_path(arg[len('--config='):])
    elif i > 0 and argv[i - 1] == '--config':
      arg = resolve_config_path(arg)
    out.append(arg)
  return last_override_wins(out)


_CONFIG = config_flags.DEFINE_config_file('config', resolve_config_path('configs/ssl.py'),
                                          'Config file (file.py[:variant]).', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Run directory (default runs/<mode>-<variant>-<time>).')
_VERBOSE = flags.DEFINE_bool('verbose', False, 'Show the traceback of user errors too.')


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


def _one_line(error: BaseException) -> str:
  text = ' '.join(str(error).split()) or type(error).__name__
  return text.strip('"\'')


def _exit(code: int, fast: bool) -> None:
  """fast: skip interpreter teardown (TF threads, JAX's distributed shutdown barrier, which waits for peers
  that may be gone); everything the job writes is flushed and closed by then."""
  sys.stdout.flush()
  sys.stderr.flush()
  if fast:
    from echojax.jobs import workdir
    workdir.release_all()
    os._exit(code)
  sys.exit(code)


def finish(job, verbose: bool = False) -> None:
  """Runs `job()` under the stop-notice listener and exits the process with the code of how it ended."""
  from echojax.data.subsets import LabelFractionError
  from echojax.jobs import errors, peers, preemption
  from echojax.jobs.logging_lib import NonFiniteLossError
  user_errors = (errors.UserError, LabelFractionError, FileNotFoundError)
  try:
    with preemption.listening():
      job()
  except preemption.Preempted as e:
    print(f'echojax: {e}', file=sys.stderr)
    _exit(errors.EXIT_PREEMPTED, fast=True)
  except (NonFiniteLossError,) + user_errors as e:
    if verbose:
      traceback.print_exc()
    hint = '' if verbose else ' (--verbose for the traceback)'
    print(f'echojax: error: {_one_line(e)}{hint}', file=sys.stderr)
    _exit(errors.EXIT_NONFINITE if isinstance(e, NonFiniteLossError) else errors.EXIT_USER_ERROR,
          fast=peers.running())
  except KeyboardInterrupt:
    print('echojax: interrupted (the current step was not saved)', file=sys.stderr)
    _exit(130, fast=True)
  except Exception as e:  # unexpected: with peers, often a collective that failed because one died
    peers.wait_for_verdict()   # exits the process itself when it names a lost peer
    traceback.print_exc()
    peers.announce_failure(f'{type(e).__name__}: {_one_line(e)[:200]}')
    _exit(errors.EXIT_ERROR, fast=peers.running())


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config-file and override mistakes as one line instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # a config file that raised is wrapped with its traceback: keep the last line
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    message = lines[-1] if lines else type(e).__name__
  except Exception as e:  # an unknown override key: ml_collections chains KeyErrors into AttributeError
    while not isinstance(e, KeyError) and e.__context__ is not None:
      e = e.__context__
    key = e.args[0] if isinstance(e, KeyError) and e.args else e
    message = f'unknown config key in the overrides: {" ".join(str(key).split())}'
  if '--verbose' in argv:
    traceback.print_exc()
  print(f'echojax: error: {message} (--helpshort lists the flags)', file=sys.stderr)
  sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  quiet_library_logs()

  def job():
    from echojax.jobs import config_checks
    cfg = _CONFIG.value
    config_checks.validate(cfg)
    workdir = _WORKDIR.value or default_workdir(cfg)
    print(f'echojax {cfg.mode} ({cfg.get("variant", "")}) → workdir {workdir}', flush=True)
    run(cfg, workdir)

  finish(job, verbose=_VERBOSE.value)


def cli():
  """Console script `echojax`."""
  app.run(main, argv=_resolve_config_argv(sys.argv), flags_parser=_parse_flags)


if __name__ == '__main__':
  cli()
