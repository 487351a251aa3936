"""Run logging for trainers: CLU writers (TensorBoard + stdout), `metrics.jsonl` (one JSON object per
logged step), progress with ETA and clips/s, and the non-finite-loss guard's error."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Mapping

import jax
import numpy as np


class NonFiniteLossError(RuntimeError):
  """Raised when a train step produced a NaN/Inf loss or gradient; the last good checkpoint is kept."""


class MetricLogger:
  """Writes scalars to TensorBoard (CLU), stdout and metrics.jsonl; only process 0 writes files."""

  def __init__(self, workdir: str, total_steps: int, *, clips_per_step: int = 0, tensorboard: bool = True):
    self.is_lead = jax.process_index() == 0
    self.total_steps = total_steps
    self.clips_per_step = clips_per_step
    self._writer = None
    self._jsonl = None
    if self.is_lead:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
      if tensorboard:
        from clu import metric_writers  # imports TensorFlow: orchestration layer only
        self._writer = metric_writers.SummaryWriter(os.path.join(workdir, 'tensorboard'))
    self._t0 = None
    self._step0 = None

  def start(self, step: int) -> None:
    self._t0, self._step0 = time.time(), step

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = '') -> dict:
    record = {'step': int(step)}
    for k, v in scalars.items():
      v = float(np.asarray(v))
      record[prefix + k] = v if math.isfinite(v) else str(v)
    if self._t0 is not None and step > self._step0:
      elapsed = time.time() - self._t0
      rate = (step - self._step0) / elapsed
      record['steps_per_s'] = rate
      if self.clips_per_step:
        record['clips_per_s'] = rate * self.clips_per_step
      eta = (self.total_steps - step) / max(rate, 1e-9)
      record['eta_s'] = eta
    if self.is_lead:
      self._jsonl.write(json.dumps(record) + '\n')
      self._jsonl.flush()
      if self._writer is not None:
        self._writer.write_scalars(int(step), {k: v for k, v in record.items()
                                               if k != 'step' and isinstance(v, float)})
      shown = ' '.join(f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}'
                       for k, v in record.items() if k not in ('step', 'eta_s', 'steps_per_s'))
      eta = f' eta {format_seconds(record["eta_s"])}' if 'eta_s' in record else ''
      print(f'[step {step}/{self.total_steps}] {shown}{eta}', flush=True)
    return record

  def close(self) -> None:
    if self._writer is not None:
      self._writer.flush()
      self._writer.close()
    if self._jsonl is not None:
      self._jsonl.close()


def format_seconds(s: float) -> str:
  s = int(s)
  return f'{s // 3600}h{s % 3600 // 60:02d}m' if s >= 3600 else f'{s // 60}m{s % 60:02d}s'


def log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


_COLLECTIONS: dict = {}


def metric_collection(clu_metrics, metrics: Mapping):
  """A CLU Collection averaging every scalar a step returns (created once per set of metric names), so
  metrics are accumulated on device and fetched only when logged."""
  names = tuple(sorted(metrics))
  if names not in _COLLECTIONS:
    _COLLECTIONS[names] = clu_metrics.Collection.create(
        **{k: clu_metrics.Average.from_output(k) for k in names})
  return _COLLECTIONS[names]
