"""The one process-wide stop-notice path every trainer (and each of its checkpoint managers) shares: SIGTERM
or SIGINT → a flag the loop reads after each step (then it saves and exits EXIT_PREEMPTED), plus a deadline
that ends the process DEADLINE_S after the notice even if the main thread is stuck in a long compile or
save. In a jax.distributed job JAX's own notifier owns SIGTERM and its sync point picks the step at which
every process stops together."""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

from echojax.jobs import checkpointing, workdir
from echojax.jobs.errors import EXIT_PREEMPTED, Preempted  # noqa: F401  (Preempted: re-exported)

# SLURM's default grace between SIGTERM and SIGKILL is 30 s; leave room for the interpreter to exit.
DEADLINE_S = 25.0
_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_state = {'depth': 0, 'previous': {}, 'notice': None, 'time': None, 'wakeup': None, 'deadline': None,
          'sigints': 0, 'sigint_calls': 0}


def _distributed_sync_manager():
  """JAX's preemption sync manager when this is a jax.distributed job with the service on, else None."""
  try:
    from jax._src import distributed  # private, but the only handle on the manager jax.distributed made
  except ImportError:
    return None
  state = distributed.global_state
  return state.preemption_sync_manager if state.client is not None else None


def _deadline_exit() -> None:
  workdir.release_all()
  print(f'echojax: could not save within {DEADLINE_S:.0f} s of the {_state["notice"]}; exiting now with code '
        f'{EXIT_PREEMPTED}. {checkpointing.describe_completed()}; rerun the same command to resume.',
        file=sys.stderr, flush=True)
  os._exit(EXIT_PREEMPTED)


def _notice(signum: int) -> None:
  """Records the first notice (from the wakeup thread, so it is seen while the main thread is in C++)."""
  if _state['notice'] is not None:
    return
  _state['notice'], _state['time'] = signal.Signals(signum).name, time.time()
  print(f'echojax: {_state["notice"]} received: finishing the step, saving a checkpoint, then exiting '
        '(Ctrl-C again to abort without saving)', file=sys.stderr, flush=True)
  timer = threading.Timer(DEADLINE_S, _deadline_exit)
  timer.daemon = True
  timer.start()
  _state['deadline'] = timer


def _watch_wakeup_fd(read_fd: int, generation: int) -> None:
  while True:
    try:
      data = os.read(read_fd, 64)
    except OSError:
      return
    if not data:  # uninstall closed the write end
      os.close(read_fd)
      return
    if _state.get('generation') != generation:
      continue  # uninstalled meanwhile: a byte still in the pipe must not start a deadline for a finished job
    for signum in data:
      if signum in _SIGNALS:
        _state['sigints'] += signum == signal.SIGINT
        _notice(signum)


def _on_signal(signum, frame):
  # Runs when the main thread next executes Python (the wakeup thread usually saw the signal first);
  # deliveries are counted on both sides because several can coalesce into one call here.
  if signum == signal.SIGINT:
    _state['sigint_calls'] += 1
    if max(_state['sigints'], _state['sigint_calls']) >= 2:
      raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the checkpoint
  _notice(signum)


def _forward_to_jax(signum, frame):
  # JAX's notifier listens for SIGTERM only; re-sending it makes Ctrl-C a job-wide notice as well.
  if _state['notice'] is not None:
    raise KeyboardInterrupt
  _state['notice'], _state['time'] = signal.Signals(signum).name, time.time()
  os.kill(os.getpid(), signal.SIGTERM)


def install() -> None:
  """Start listening (nested calls count; `uninstall` restores the previous handlers at depth 0)."""
  _state['depth'] += 1
  if _state['depth'] > 1 or threading.current_thread() is not threading.main_thread():
    return
  reset()
  if _distributed_sync_manager() is not None:
    # A Python SIGTERM handler would replace JAX's C++ one and the notice would never reach the other
    # processes, so only SIGINT is handled here (forwarded as SIGTERM).
    _state['previous'][signal.SIGINT] = signal.signal(signal.SIGINT, _forward_to_jax)
    return
  for signum in _SIGNALS:
    _state['previous'][signum] = signal.signal(signum, _on_signal)
  read_fd, write_fd = os.pipe()
  os.set_blocking(write_fd, False)
  previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
  _state['generation'] = _state.get('generation', 0) + 1
  threading.Thread(target=_watch_wakeup_fd, args=(read_fd, _state['generation']), name='echojax-stop-notice',
                   daemon=True).start()
  _state['wakeup'] = (read_fd, write_fd, previous_fd)


def uninstall() -> None:
  _state['depth'] = max(_state['depth'] - 1, 0)
  if _state['depth'] or threading.current_thread() is not threading.main_thread():
    return
  for signum, handler in _state['previous'].items():
    signal.signal(signum, handler)
  _state['previous'].clear()
  _state['generation'] = _state.get('generation', 0) + 1   # the watcher ignores anything it reads from now on
  if _state['wakeup'] is not None:
    read_fd, write_fd, previous_fd = _state['wakeup']
    signal.set_wakeup_fd(previous_fd)
    os.close(write_fd)   # ends the watcher thread
    _state['wakeup'] = None
  # The job has returned or raised Preempted: main exits at once from here, a library caller decides.
  reset()


@contextlib.contextmanager
def listening():
  """`with listening():` around a job: notices set a flag (and start the deadline) instead of killing."""
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
    raise Preempted(f'preempted during {where} ({describe()}); rerun the same command to resume')


def reset() -> None:
  """Forget a notice and cancel its deadline (a new job, or a test that handled the Preempted exit)."""
  if _state['deadline'] is not None:
    _state['deadline'].cancel()
  _state.update(notice=None, time=None, deadline=None, sigints=0, sigint_calls=0)
