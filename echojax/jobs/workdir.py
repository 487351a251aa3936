"""A run directory's guards, applied before a job writes anything: the lock (`DIR/run.lock`: host, PID,
start time; held with flock, so a dead holder never blocks; a stale holder on this host is taken over
with a warning) and config provenance (`config.json` is written once and never overwritten; a job of
another mode or with other model/data/objective settings is refused naming the keys; allowed changes,
durations and logging, are recorded as `config-<step>.json`)."""
from __future__ import annotations

import atexit
import fcntl
import fnmatch
import json
import os
import socket
import time

from echojax.jobs import checkpointing, config_lib
from echojax.jobs.errors import UserError

LOCK_FILE = 'run.lock'
CONFIG_FILE = 'config.json'
# Keys a resumed run may change: how long it runs, how it logs / checkpoints / evaluates, where the data
# lives and how processes are launched. Every other key (model, data content, objective, optimiser, seeds,
# init) defines the run and must match config.json; new keys are protected unless listed here.
ALLOWED_CHANGES = (
    'train.num_epochs', 'train.num_steps', 'train.stop_after_steps', 'train.log_every_steps',
    'train.checkpoint_every_steps', 'train.keep_checkpoints', 'train.patience', 'probe.*', 'eval.*',
    'data.data_dir', 'data.manual_dir', 'data.auto_build', 'distributed.*', 'model.conv_impl', 'model.remat')
_HELD: dict[str, int] = {}   # workdir → the open, flocked lock file descriptor


class WorkdirError(UserError):
  """The workdir is in use, or holds a run this job must not continue."""


def _proc_start(pid: int) -> str:
  """The process's start time in clock ticks since boot (Linux), to tell a live holder from a reused PID."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return ''


def _alive(holder: dict) -> bool:
  try:
    os.kill(int(holder['pid']), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, KeyError, ValueError, TypeError):
    return True
  start = _proc_start(int(holder['pid']))
  return not (start and holder.get('proc_start') and start != holder['proc_start'])


def _describe(holder: dict) -> str:
  return (f'PID {holder.get("pid")} on host {holder.get("host")} (started {holder.get("started")}, '
          f'{holder.get("mode", "?")} job)')


def acquire(workdir: str, mode: str = '', log=print) -> None:
  """Takes DIR/run.lock for this process (again, if it already holds it) or raises WorkdirError."""
  workdir = os.path.abspath(workdir)
  if workdir in _HELD:
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    with open(path) as f:
      text = f.read().strip()
    holder = json.loads(text) if text else {}
  except (OSError, ValueError):
    holder = {}
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    os.close(fd)
    raise WorkdirError(f'workdir {workdir} is in use by {_describe(holder)}; wait for it, stop it, or '
                       'use another --workdir') from None
  host = socket.gethostname()
  if holder.get('pid') and int(holder['pid']) != os.getpid():
    # flock is free; on filesystems that do not share flocks between hosts, only the host can judge.
    if holder.get('host') != host:
      os.close(fd)
      raise WorkdirError(f'workdir {workdir} is locked by {_describe(holder)}, which this host cannot check; '
                         f'if that run is gone, delete {path}')
    if _alive(holder):
      os.close(fd)
      raise WorkdirError(f'workdir {workdir} is in use by {_describe(holder)}; use another --workdir')
    log(f'WARNING: taking over the stale lock of {_describe(holder)} (that process is gone) in {workdir}')
  record = {'host': host, 'pid': os.getpid(), 'proc_start': _proc_start(os.getpid()),
            'started': time.strftime('%Y-%m-%dT%H:%M:%S%z'), 'mode': mode}
  os.ftruncate(fd, 0)
  os.pwrite(fd, (json.dumps(record) + '\n').encode(), 0)
  os.fsync(fd)
  _HELD[workdir] = fd


def release(workdir: str) -> None:
  """Frees the lock (the file stays, emptied: removing it would let a racing run lock a deleted inode)."""
  fd = _HELD.pop(os.path.abspath(workdir), None)
  if fd is not None:
    os.ftruncate(fd, 0)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


@atexit.register
def release_all() -> None:
  """Every lock this process holds (at exit; called explicitly before os._exit, which skips atexit)."""
  for workdir in list(_HELD):
    release(workdir)


def _flat(tree, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, dict) and value:
      out.update(_flat(value, path + '.'))
    else:
      out[path] = value
  return out


def _normalised(cfg) -> dict:
  """The config as config.json stores it (tuples → lists, other objects → str), for comparisons."""
  return json.loads(json.dumps(config_lib.to_dict(cfg), sort_keys=True, default=str))


def config_diff(old: dict, new: dict) -> dict[str, tuple]:
  """{dotted key: (old, new)} for every key whose value differs, was added or was removed."""
  a, b = _flat(old), _flat(new)
  missing = object()
  return {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
          if a.get(k, missing) != b.get(k, missing)} if a != b else {}


def _allowed(key: str) -> bool:
  return any(fnmatch.fnmatchcase(key, pattern) for pattern in ALLOWED_CHANGES)


def _present(value) -> bool:
  return isinstance(value, (str, int, float, bool, list, dict, type(None)))


def _show(value) -> str:
  return json.dumps(value) if _present(value) else '(absent)'


def _recorded_configs(workdir: str) -> list[str]:
  """config.json, then config-<step>[.n].json in the order they were written (step, then n)."""
  def order(name):
    step, _, n = name[len('config-'):-len('.json')].partition('.')
    return int(step), int(n or 0)
  names = [n for n in os.listdir(workdir) if n.startswith('config-') and n.endswith('.json')
           and n[len('config-'):-len('.json')].split('.')[0].isdigit()]
  return [CONFIG_FILE] + sorted(names, key=order)


def check_and_record_config(cfg, workdir: str, log=print) -> None:
  """Writes config.json for a new run; for an existing one, refuses a different mode or protected key
  before anything is written, and records allowed changes as config-<step>.json (step = the latest
  completed checkpoint, which the run resumes from) with the diff logged."""
  new = _normalised(cfg)
  path = os.path.join(workdir, CONFIG_FILE)
  ckpt_steps = checkpointing.completed_steps(os.path.join(workdir, 'checkpoints'))
  if not os.path.exists(path):
    if ckpt_steps:
      raise WorkdirError(f'workdir {workdir} has checkpoints but no {CONFIG_FILE}: it was not written by '
                         'this echojax job; use another --workdir')
    config_lib.dump_config(cfg, path)
    return
  try:
    with open(path) as f:
      saved = json.load(f)
  except ValueError as e:
    raise WorkdirError(f'{path} is not valid JSON ({e}); it is never overwritten: fix or move it') from None
  if saved.get('mode') != new.get('mode'):
    raise WorkdirError(f'workdir {workdir} holds a {saved.get("mode")!r} run ({CONFIG_FILE}); this is a '
                       f'{new.get("mode")!r} job: use another --workdir')
  diff = config_diff(saved, new)
  # A key only one side has comes from a code version that added or dropped it: recorded, not refused.
  protected = [k for k, (a, b) in diff.items() if not _allowed(k) and _present(a) and _present(b)]
  if protected:
    shown = ', '.join(f'{k} ({_show(diff[k][0])} → {_show(diff[k][1])})' for k in protected[:8])
    more = f' and {len(protected) - 8} more' if len(protected) > 8 else ''
    raise WorkdirError(f'workdir {workdir} was started with other settings: {shown}{more}; only durations, '
                       'logging and data location may change on resume: use another --workdir')
  recorded = _recorded_configs(workdir)
  with open(os.path.join(workdir, recorded[-1])) as f:
    previous = json.load(f)
  changes = config_diff(previous, new)
  if not changes:
    return
  step = ckpt_steps[-1] if ckpt_steps else 0
  name, n = f'config-{step}.json', 0
  while os.path.exists(os.path.join(workdir, name)):
    n += 1
    name = f'config-{step}.{n}.json'
  config_lib.dump_config(cfg, os.path.join(workdir, name))
  log(f'config changes since {recorded[-1]} (resuming from step {step}): '
      + ', '.join(f'{k} {_show(a)} → {_show(b)}' for k, (a, b) in changes.items()) + f'; recorded in {name}')
