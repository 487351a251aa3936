"""Run logging for trainers: CLU writers (TensorBoard + stdout), `metrics.jsonl` (one JSON object per
logged step), step-1 logging and a rate/ETA clocked from after compilation, the non-finite guard (kept on
device, checked only where the host syncs anyway), and TTY-aware progress for long phases."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from echojax.jobs import preemption

# Without a terminal, a long phase prints one progress line at most this often (log files stay short).
PLAIN_PROGRESS_EVERY_S = 60.0


class NonFiniteLossError(RuntimeError):
  """Raised when a train step produced a NaN/Inf loss, gradient or update; the last good checkpoint is kept."""


@jax.jit
def _first_bad(first, finite, step):
  return jnp.where((first < 0) & (finite == 0), step, first)


class NonFiniteGuard:
  """The first step whose update the train step skipped as non-finite, accumulated on device so that
  training never waits for the host; `first()` fetches it (a host sync)."""

  def __init__(self):
    self._first = jnp.asarray(-1, jnp.int32)

  def update(self, finite, step: int) -> None:
    self._first = _first_bad(self._first, finite, jnp.asarray(step, jnp.int32))

  def first(self) -> Optional[int]:
    bad = int(self._first)
    return bad if bad >= 0 else None


class MetricLogger:
  """Writes scalars to TensorBoard (CLU), stdout and metrics.jsonl; only process 0 writes files.

  `accumulate` averages each step's metrics on device (CLU) and tracks non-finite steps; `due(step)` says
  when to `write_accumulated` (the first step of this invocation, every `log_every` steps, the last step).
  With a `checkpointer`, its saves first check the guard, so a state after a bad step is never saved.
  """

  def __init__(self, workdir: str, total_steps: int, *, log_every: int = 0, clips_per_step: int = 0,
               tensorboard: bool = True, checkpointer=None):
    self.is_lead = jax.process_index() == 0
    self.total_steps = total_steps
    self.log_every = log_every
    self.clips_per_step = clips_per_step
    self._writer = None
    self._jsonl = None
    if self.is_lead:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      if tensorboard:
        from clu import metric_writers  # imports TensorFlow: orchestration layer only
        self._writer = metric_writers.SummaryWriter(os.path.join(workdir, 'tensorboard'))
    self._created = time.time()
    self._t0 = None
    self._step0 = None
    self._first_step = None
    self._acc = None
    self.guard = NonFiniteGuard()
    self._checkpointer = checkpointer
    if checkpointer is not None:
      checkpointer.before_save = self.check_finite

  def start(self, step: int) -> None:
    """The loop starts after `step`: step + 1 is logged, and the rate clock starts once it is done."""
    self._first_step, self._t0, self._step0 = step + 1, None, None

  def due(self, step: int) -> bool:
    return (step == self._first_step or step == self.total_steps
            or (self.log_every > 0 and step % self.log_every == 0))

  def accumulate(self, metrics: Mapping, step: int) -> None:
    """On device only: the running means of `metrics` and the first non-finite step (no host sync)."""
    from clu import metrics as clu_metrics  # CLU pulls in TensorFlow: orchestration layer only
    update = metric_collection(clu_metrics, metrics).single_from_model_output(**metrics)
    self._acc = update if self._acc is None else self._acc.merge(update)
    if 'finite' in metrics:
      self.guard.update(metrics['finite'], step)

  def write_accumulated(self, step: int, prefix: str = 'train/') -> dict:
    """Checks the guard, then writes the means since the last write."""
    self.check_finite(step)
    record = self.write(step, self._acc.compute() if self._acc is not None else {}, prefix=prefix,
                        clock=True)
    self._acc = None
    return record

  def check_finite(self, step: int) -> None:
    bad = self.guard.first()
    if bad is None:
      return
    where = ''
    if self._checkpointer is not None:
      self._checkpointer.wait()
      where = (f'; last good checkpoint: step {self._checkpointer.latest_step()} in '
               f'{self._checkpointer.directory}')
    raise NonFiniteLossError(f'non-finite loss/gradient/update first at step {bad} (seen at step {step}); '
                             f'those updates were not applied{where}')

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = '', clock: bool = False) -> dict:
    """clock: a train-step write; the first one ends compilation and starts the rate/ETA clock."""
    record = {'step': int(step)}
    for k, v in scalars.items():
      v = float(np.asarray(v))
      record[prefix + k] = v if math.isfinite(v) else str(v)
    now = time.time()
    if self._t0 is None and clock:
      record['first_step_s'] = now - self._created
      self._t0, self._step0 = now, step
    elif self._t0 is not None and step > self._step0:
      rate = (step - self._step0) / (now - self._t0)
      record['steps_per_s'] = rate
      if self.clips_per_step:
        record['clips_per_s'] = rate * self.clips_per_step
      record['eta_s'] = (self.total_steps - step) / max(rate, 1e-9)
    if self.is_lead:
      self._jsonl.write(json.dumps(record) + '\n')
      self._jsonl.flush()
      if self._writer is not None:
        self._writer.write_scalars(int(step), {k: v for k, v in record.items()
                                               if k != 'step' and isinstance(v, float)})
      shown = ' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                       for k, v in record.items()
                       if k not in ('step', 'eta_s', 'steps_per_s', 'first_step_s'))
      extra = f' eta {format_seconds(record["eta_s"])}' if 'eta_s' in record else ''
      if 'first_step_s' in record:
        extra = f' (first step incl. compilation: {record["first_step_s"]:.1f} s)'
      print(f'[step {step}/{self.total_steps}] {shown}{extra}', flush=True)
    return record

  def close(self) -> None:
    if self._writer is not None:
      self._writer.flush()
      self._writer.close()
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None


def format_seconds(s: float) -> str:
  s = int(s)
  return f'{s // 3600}h{s % 3600 // 60:02d}m' if s >= 3600 else f'{s // 60}m{s % 60:02d}s'


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def progress(iterable: Iterable, desc: str, total: Optional[int] = None, unit: str = 'batch',
             interruptible: bool = True):
  """Yields `iterable` with progress on process 0: a tqdm bar on a terminal, else a plain line at most
  every PLAIN_PROGRESS_EVERY_S (so logs stay short). Interruptible: a stop notice ends the phase with
  Preempted between items (single-process runs; see preemption.check)."""
  lead = jax.process_index() == 0
  if lead and sys.stderr.isatty():
    from tqdm import tqdm
    iterable = tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, dynamic_ncols=True)
  t0 = last = time.time()
  for i, item in enumerate(iterable, 1):
    if interruptible:
      preemption.check(desc)
    yield item
    now = time.time()
    if lead and not sys.stderr.isatty() and now - last >= PLAIN_PROGRESS_EVERY_S:
      last = now
      of = f'/{total}' if total else ''
      eta = f', eta {format_seconds((total - i) * (now - t0) / i)}' if total and i < total else ''
      print(f'{desc}: {unit} {i}{of} after {format_seconds(now - t0)}{eta}', flush=True)


_COLLECTIONS: dict = {}


def metric_collection(clu_metrics, metrics: Mapping):
  """A CLU Collection averaging every scalar a step returns (created once per set of metric names), so
  metrics are accumulated on device and fetched only when logged."""
  names = tuple(sorted(metrics))
  if names not in _COLLECTIONS:
    _COLLECTIONS[names] = clu_metrics.Collection.create(
        **{k: clu_metrics.Average.from_output(k) for k in names})
  return _COLLECTIONS[names]
