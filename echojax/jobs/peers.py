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

from echojax.jobs.errors import EXIT_PEER_LOST

_ALIVE, _FAILED = 'echojax/alive/', 'echojax/failed/'
_watch = {'thread': None, 'timeout_s': None, 'verdict': threading.Event()}


def _client():
  from jax._src import distributed  # private: the client jax.distributed.initialize connected
  return distributed.global_state.client


def _lost(process: int, why: str) -> None:
  """Ends this process at once: its peers cannot finish a collective or a multi-process save without
  `process`, and JAX's shutdown would wait for it."""
  from echojax.jobs import checkpointing
  me, n = jax.process_index(), jax.process_count()
  _watch['verdict'].set()
  print(f'echojax: process {me} of {n}: lost process {process} ({why}); exiting with code {EXIT_PEER_LOST}. '
        f'{checkpointing.describe_completed()}; rerun the job to resume.', file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(EXIT_PEER_LOST)


def _run(client, me: int, n: int, timeout_s: float) -> None:
  interval = min(max(timeout_s / 10, 0.2), 5.0)
  start = time.monotonic()
  last_seen = {p: start for p in range(n) if p != me}
  last_value: dict[int, str] = {}
  last_ok, count = start, 0
  while True:
    count += 1
    now = time.monotonic()
    try:
      client.key_value_set(f'{_ALIVE}{me}', str(count), allow_overwrite=True)
      alive = client.key_value_dir_get(_ALIVE)
      failed = client.key_value_dir_get(_FAILED)
      last_ok = now
    except Exception as e:  # the coordinator (process 0) hosts the store: unreachable means it is gone
      if me != 0 and now - last_ok > timeout_s:
        _lost(0, f'the coordinator has not answered for {now - last_ok:.0f} s: {str(e).splitlines()[0][:120]}')
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
  _watch['timeout_s'] = float(timeout_s)
  thread = threading.Thread(target=_run, args=(client, jax.process_index(), jax.process_count(),
                                               float(timeout_s)), name='echojax-peer-watchdog', daemon=True)
  thread.start()
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
    _watch['verdict'].wait(_watch['timeout_s'] + 2 * min(max(_watch['timeout_s'] / 10, 0.2), 5.0))
