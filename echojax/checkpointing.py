"""Orbax checkpoints of a run (`DIR/checkpoints/`: async, keep-last-N, SIGTERM/preemption-safe) and the
restore used for resuming; encoder export lives in `echojax.export`."""
from __future__ import annotations

import os
import signal
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  pass


class Preempted(SystemExit):
  """Raised after the preemption checkpoint is written, so no caller carries on with a half-trained model."""


class Checkpointer:
  """Thin wrapper over ocp.CheckpointManager so trainers share one save/restore/preemption policy."""

  def __init__(self, workdir: str, *, keep: int = 3, save_every: int = 1000, async_save: bool = True,
               subdir: str = 'checkpoints'):
    self.directory = os.path.abspath(os.path.join(workdir, subdir))
    self.save_every = max(int(save_every), 1)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))
    self._preempted = False
    self._old_handler = None
    try:  # SIGTERM is how schedulers (SLURM, k8s, TPU maintenance) announce preemption.
      self._old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    except ValueError:  # not the main thread (e.g. a test runner thread)
      pass

  def _on_sigterm(self, signum, frame):
    self._preempted = True

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def should_stop(self, step: int) -> bool:
    """True when the job was told to stop (SIGTERM here, or a multi-host preemption notice)."""
    if self._preempted:
      return True
    try:
      return bool(self._manager.reached_preemption(step))
    except Exception:  # no preemption service outside a jax.distributed job
      return False

  def maybe_save(self, step: int, state: Any, *, force: bool = False) -> bool:
    if force or step % self.save_every == 0:
      if self._manager.latest_step() == step:
        return False
      self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
      return True
    return False

  def restore(self, state_template: Any, step: Optional[int] = None) -> Any:
    """Restores into the structure/shardings of `state_template` (a live or abstract state)."""
    step = self._manager.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {self.directory}')
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state_template)
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
    if self._old_handler is not None:
      try:
        signal.signal(signal.SIGTERM, self._old_handler)
      except ValueError:
        pass


def restore_raw(workdir: str, step: Optional[int] = None, subdir: str = 'checkpoints') -> tuple[int, Any]:
  """Restores the latest (or given) checkpoint of a workdir as plain nested dicts of numpy arrays."""
  directory = os.path.abspath(os.path.join(workdir, subdir))
  if not os.path.isdir(directory):
    raise CheckpointError(f'no checkpoints directory: {directory}')
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as m:
    step = m.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {directory}')
    return step, m.restore(step, args=ocp.args.StandardRestore())
