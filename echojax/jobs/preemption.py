"""The one process-wide stop-notice path every trainer (and each of its checkpoint managers) shares: SIGTERM
or SIGINT → a flag the loop reads after each step; in a jax.distributed job JAX's own preemption sync
(its notifier owns SIGTERM there) picks the step at which every process stops together."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

from echojax.jobs.errors import EXIT_PREEMPTED

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_state = {'depth': 0, 'previous': {}, 'notice': None, 'time': None}


class Preempted(SystemExit):
  """Raised once the preemption checkpoint is written, so nothing carries on with a half-trained model.
  A SystemExit whose code is EXIT_PREEMPTED; str() is the one-line message."""

  def __init__(self, message: str):
    super().__init__(EXIT_PREEMPTED)
    self.message = message

  def __str__(self) -> str:
    return self.message


def _distributed_sync_manager():
  """JAX's preemption sync manager when this is a jax.distributed job with the service on, else None."""
  try:
    from jax._src import distributed  # private, but the only handle on the manager jax.distributed made
  except ImportError:
    return None
  state = distributed.global_state
  return state.preemption_sync_manager if state.client is not None else None


def _on_signal(signum, frame):
  name = signal.Signals(signum).name
  if _state['notice'] is not None:
    if signum == signal.SIGINT:  # a second Ctrl-C: the user does not want to wait for the checkpoint
      raise KeyboardInterrupt
    return
  _state['notice'], _state['time'] = name, time.time()
  print(f'echojax: {name} received: finishing the step, saving a checkpoint, then exiting '
        '(Ctrl-C again to abort without saving)', file=sys.stderr, flush=True)


def _forward_to_jax(signum, frame):
  # JAX's notifier listens for SIGTERM only; re-sending it makes Ctrl-C a job-wide notice as well.
  _state['notice'] = _state['notice'] or signal.Signals(signum).name
  os.kill(os.getpid(), signal.SIGTERM)


def install() -> None:
  """Start listening (nested calls count; `uninstall` restores the previous handlers at depth 0)."""
  _state['depth'] += 1
  if _state['depth'] > 1 or threading.current_thread() is not threading.main_thread():
    return
  _state['notice'] = None
  # With JAX's sync manager, a Python SIGTERM handler would replace its C++ one and the notice would
  # never reach the other processes, so only SIGINT is handled here (forwarded as SIGTERM).
  handlers = ({signal.SIGINT: _forward_to_jax} if _distributed_sync_manager() is not None
              else {s: _on_signal for s in _SIGNALS})
  for signum, handler in handlers.items():
    _state['previous'][signum] = signal.signal(signum, handler)


def uninstall() -> None:
  _state['depth'] = max(_state['depth'] - 1, 0)
  if _state['depth'] or threading.current_thread() is not threading.main_thread():
    return
  for signum, handler in _state['previous'].items():
    signal.signal(signum, handler)
  _state['previous'].clear()
  reset()  # the notice was acted on (Preempted carries it); a later phase must not see it again


@contextlib.contextmanager
def listening():
  """`with listening():` around a training loop: notices set a flag instead of killing the process."""
  install()
  try:
    yield
  finally:
    uninstall()


def requested() -> bool:
  """Whether this process got a notice (single-process runs; a distributed job stops via `should_stop`)."""
  return _state['notice'] is not None and _distributed_sync_manager() is None


def should_stop(step: int) -> bool:
  """True at the step where the job must save and exit. Call once per step on every process: in a
  distributed job JAX agrees on the same step everywhere."""
  manager = _distributed_sync_manager()
  if manager is not None:
    return bool(manager.reached_sync_point(step))
  return _state['notice'] is not None


def describe() -> str:
  """'SIGTERM 1.2 s ago' (the notice this process saw), or 'a preemption notice' in a distributed job."""
  if _state['notice'] is None or _state['time'] is None:
    return 'a preemption notice'
  return f'{_state["notice"]} {time.time() - _state["time"]:.1f} s ago'


def check(where: str) -> None:
  """Raise Preempted inside a long phase (validation, evaluation, probe) when a notice has arrived; only
  single-process runs, where no other process waits in a collective for this one."""
  if requested():
    raise Preempted(f'preempted during {where} ({describe()})')


def reset() -> None:
  """Forget a notice (tests, or a library caller that handled the Preempted exit itself)."""
  _state['notice'], _state['time'] = None, None
