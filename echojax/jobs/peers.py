"""Peer liveness for jax.distributed jobs: every process bumps a counter in the coordination service's
key-value store; a process whose counter stops moving for `timeout_s` (dead, SIGSTOPped, or unreachable),
or that announced a failure, makes every survivor print one line naming it and exit EXIT_PEER_LOST —
instead of JAX's abort after its 100 s heartbeat timeout and a 300 s shutdown barrier."""
from __future__ import annotations

import os
import sys
import threading
import time

import jax

from echojax.jobs import checkpointing, workdir
from echojax.jobs.errors import EXIT_PEER_LOST

_ALIVE, _FAILED = 'echojax/alive/', 'echojax/failed/'
_watch = {'thread': None, 'timeout_s': None, 'last_ok': 0.0, 'verdict': threading.Event()}


def _client():
  from jax._src import distributed  # private: the client jax.distributed.initialize connected
  return distributed.global_state.client


def _lost(process: int, why: str) -> None:
  """Ends this process at once: its peers cannot finish a collective or a multi-process save without
  `process`, and JAX's shutdown would wait for it."""
  workdir.release_all()
  me, n = jax.process_index(), jax.process_count()
  _watch['verdict'].set()
  print(f'echojax: process {me} of {n}: lost process {process} ({why}); exiting with code {EXIT_PEER_LOST}. '
        f'{checkpointing.describe_completed()}; rerun the job to resume.', file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(EXIT_PEER_LOST)


def _interval(timeout_s: float) -> float:
  return min(max(timeout_s / 10, 0.2), 5.0)


def _monitor(timeout_s: float) -> None:
  """A store round trip that fails or hangs (a stopped coordinator never answers) for timeout_s means
  process 0, which hosts the store, is gone; checked here because the heartbeat thread may be stuck."""
  while True:
    time.sleep(_interval(timeout_s))
    silent = time.monotonic() - _watch['last_ok']
    if silent > timeout_s:
      _lost(0, f'the coordinator has not answered for {silent:.0f} s: dead or hung')


def _run(client, me: int, n: int, timeout_s: float) -> None:
  interval = _interval(timeout_s)
  start = time.monotonic()
  last_seen = {p: start for p in range(n) if p != me}
  last_value: dict[int, str] = {}
  count = 0
  while True:
    count += 1
    now = time.monotonic()
    try:
      client.key_value_set(f'{_ALIVE}{me}', str(count), allow_overwrite=True)
      alive = client.key_value_dir_get(_ALIVE)
      failed = client.key_value_dir_get(_FAILED)
      _watch['last_ok'] = time.monotonic()
    except Exception:  # the monitor thread decides when the store has been unreachable for too long
      time.sleep(interval)
      continue
    for key, reason in failed:
      process = int(key.rsplit('/', 1)[1])
      if process != me:
        _lost(process, f'it failed: {reason}')
    for key, value in alive:
      process = int(key.rsplit('/', 1)[1])
      if process != me and last_value.get(process) != value:
        last_value[process], last_seen[process] = value, now
    for process, seen in last_seen.items():
      if now - seen > timeout_s:
        _lost(process, f'no heartbeat for {now - seen:.0f} s: dead or hung')
    time.sleep(interval)


def start_watchdog(timeout_s: float) -> bool:
  """Starts the daemon watchdog once per process (multi-process jobs only); returns whether it runs."""
  if _watch['thread'] is not None:
    return True
  client = _client() if jax.process_count() > 1 else None
  if client is None:
    return False
  _watch['timeout_s'], _watch['last_ok'] = float(timeout_s), time.monotonic()
  thread = threading.Thread(target=_run, args=(client, jax.process_index(), jax.process_count(),
                                               float(timeout_s)), name='echojax-peer-watchdog', daemon=True)
  thread.start()
  if jax.process_index() != 0:
    threading.Thread(target=_monitor, args=(float(timeout_s),),
                     name='echojax-coordinator-monitor', daemon=True).start()
  _watch['thread'] = thread
  return True


def running() -> bool:
  return _watch['thread'] is not None


def announce_failure(reason: str) -> None:
  """Tells the other processes this one is about to exit with an error, so they stop now instead of
  waiting out the heartbeat timeout."""
  client = _client() if running() else None
  if client is not None:
    try:
      client.key_value_set(f'{_FAILED}{jax.process_index()}', reason[:300], allow_overwrite=True)
    except Exception:  # the store may be gone already; the heartbeat timeout still ends the peers
      pass


def wait_for_verdict() -> None:
  """After an unexpected error (often a collective that failed because a peer died): gives the watchdog
  one timeout to name the lost process (it then exits the process); returns if every peer is alive."""
  if running():
    _watch['verdict'].wait(_watch['timeout_s'] + 2 * _interval(_watch['timeout_s']))
