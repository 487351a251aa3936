"""Orbax checkpoints of a run (`DIR/checkpoints/`, `DIR/best/`: atomic, async, keep-last-N): each step holds
named pytree items ('state', optionally 'best') and a JSON 'meta' item saved together, so everything a
resume needs changes in one commit. Restore falls back past unreadable steps, moving them aside as
`<step>.corrupt-<time>` (never deleted). Stop notices live in `preemption`; encoder export in `model_init`."""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping, Optional

import jax
import orbax.checkpoint as ocp

from echojax.jobs.errors import Preempted, UserError

META = 'meta'
_LEGACY_ITEM = 'default'   # checkpoints written before named items: one unnamed train state
_DIRECTORIES: list[str] = []   # every checkpoint directory this process used, for exit messages


class CheckpointError(UserError, RuntimeError):
  pass


class CheckpointMismatch(CheckpointError):
  """The step is readable but its arrays do not fit the model being restored (e.g. the code changed)."""


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _reason(error: BaseException) -> str:
  """The innermost cause's first line (Orbax wraps TensorStore's DATA_LOSS etc. in long generic errors);
  control-flow exceptions that a parser raised internally are not causes."""
  chain = [error]
  while (chain[-1].__cause__ or chain[-1].__context__) is not None and len(chain) < 20:
    chain.append(chain[-1].__cause__ or chain[-1].__context__)
  error = [e for e in chain if not isinstance(e, (StopIteration, StopAsyncIteration))][-1]
  first = (str(error).strip().splitlines() or [''])[0]
  return f'{type(error).__name__}: {first[:200]}'


def completed_steps(directory: str) -> list[int]:
  """Steps whose Orbax save finished (their directory got its final, numeric name), oldest first."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def _leaf_shapes(tree) -> list[tuple]:
  return sorted(tuple(getattr(leaf, 'shape', ())) for leaf in jax.tree_util.tree_leaves(tree))


def _check_shapes(item_dir: str, template: Any, step: int) -> None:
  """Raise CheckpointMismatch when the saved array shapes (from the item's metadata) are not the
  template's; unreadable metadata is left to the restore, which then reports the step as unreadable."""
  try:
    saved = ocp.StandardCheckpointer().metadata(item_dir)
    saved = _leaf_shapes(getattr(saved, 'item_metadata', saved))
  except Exception:
    return
  wanted = _leaf_shapes(template)
  if saved and saved != wanted:
    differ = sorted(set(saved) ^ set(wanted))[:6]
    raise CheckpointMismatch(
        f'checkpoint step {step} in {os.path.dirname(item_dir)} holds {len(saved)} arrays that do not match '
        f'the {len(wanted)} of this model (shapes only on one side: {differ}); was it written for another '
        'config or code version? Use another --workdir')


def describe_completed() -> str:
  """'last completed checkpoint: step 40 in DIR' for each checkpoint directory of this process."""
  parts = []
  for directory in _DIRECTORIES:
    steps = completed_steps(directory)
    parts.append(f'step {steps[-1]} in {directory}' if steps else f'none yet in {directory}')
  return 'last completed checkpoint: ' + ('; '.join(parts) if parts else 'none')


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


class Checkpointer:
  """One ocp.CheckpointManager with the run's save/restore policy; every Checkpointer of a job stops on
  the same notice (`preemption`), so a second manager (best/) never hides the first's."""

  def __init__(self, workdir: str, *, keep: int = 3, save_every: int = 1000, async_save: bool = True,
               subdir: str = 'checkpoints'):
    self.directory = os.path.abspath(os.path.join(workdir, subdir))
    self.save_every = max(int(save_every), 1)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))
    # Set by MetricLogger: raises NonFiniteLossError before a save would store a state after a bad step.
    self.before_save: Callable[[int], None] = lambda step: None
    if self.directory not in _DIRECTORIES:
      _DIRECTORIES.append(self.directory)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def due(self, step: int) -> bool:
    return step % self.save_every == 0

  def save(self, step: int, items: Mapping[str, Any], meta: Optional[dict] = None, *,
           overwrite: bool = False) -> bool:
    """Saves the pytrees `items` (+ JSON `meta`) as step `step` in one atomic Orbax commit. A step already
    saved is kept (False), unless `overwrite` (best/: weights of a run segment a resume replayed)."""
    self.before_save(step)
    if step in self._manager.all_steps():
      if not overwrite:
        return False
      self._manager.wait_until_finished()
      self._manager.delete(step)
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
    if meta is not None:
      args[META] = ocp.args.JsonSave(meta)
    self._manager.save(step, args=ocp.args.Composite(**args), force=True)
    return True

  def maybe_save(self, step: int, items: Mapping[str, Any], meta: Optional[dict] = None, *,
                 force: bool = False) -> bool:
    return self.save(step, items, meta) if force or self.due(step) else False

  def preempt(self, step: int, items: Mapping[str, Any], meta: Optional[dict] = None) -> None:
    """Save step `step`, wait for it to be on disk, then raise Preempted (the job's distinct exit)."""
    self.save(step, items, meta)
    self.wait()
    raise Preempted(f'preempted at step {step}: checkpoint saved in {self.directory}; rerun the same '
                    'command to resume')

  def _restore_step(self, step: int, templates: Mapping[str, Any]) -> dict:
    step_dir = os.path.join(self.directory, str(step))
    present = set(os.listdir(step_dir))
    if 'state' in templates and 'state' not in present and _LEGACY_ITEM in present:
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, templates['state'])
      return {'state': self._manager.restore(step, args=ocp.args.StandardRestore(abstract))}
    if not set(templates) & present:
      raise CheckpointError(f'no item of {sorted(templates)} in the step directory (has {sorted(present)})')
    for name in set(templates) & present:
      _check_shapes(os.path.join(step_dir, name), templates[name], step)
    # Items a template asks for but the step lacks (e.g. 'best' before the first validation) are absent.
    args = {name: ocp.args.StandardRestore(jax.tree.map(ocp.utils.to_shape_dtype_struct, tree))
            for name, tree in templates.items() if name in present}
    if META in present:
      args[META] = ocp.args.JsonRestore()
    restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    return {name: restored[name] for name in args}

  def restore_latest(self, templates: Mapping[str, Any]) -> Optional[tuple[int, dict]]:
    """(step, {item: restored pytree, 'meta': dict}) of the newest readable step, restored into the
    structures/shardings of `templates` (live or abstract pytrees); None when there is no checkpoint.

    An unreadable step is logged (step + reason), moved aside as `<step>.corrupt-<time>` and the next older
    one is tried; when none can be read, CheckpointError says so (the steps are moved aside, not deleted).
    """
    moved = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        return step, self._restore_step(step, templates)
      except CheckpointMismatch:  # readable, but for another model: not corruption, nothing is moved
        raise
      except Exception as error:  # any unreadable file: TensorStore, JSON, missing items, ...
        moved.append(self._move_aside(step, _reason(error)))
    if moved:
      raise CheckpointError(f'no readable checkpoint in {self.directory}: moved aside {", ".join(moved)}; '
                            'rerunning now starts this run from step 0 (or restore those steps from a backup)')
    return None

  def _move_aside(self, step: int, reason: str) -> str:
    name = f'{step}.corrupt-{time.strftime("%Y%m%d-%H%M%S")}'
    if jax.process_index() == 0:
      while os.path.exists(os.path.join(self.directory, name)):
        name += '+'
      os.rename(os.path.join(self.directory, str(step)), os.path.join(self.directory, name))
      _log(f'checkpoint step {step} in {self.directory} is unreadable ({reason}); moved aside to {name}, '
           'falling back to the previous step')
    _barrier(f'checkpoint {step} moved aside')
    self._manager.reload()  # forget the step, so it can be saved again
    return name

  def discard_after(self, step: int) -> None:
    """Deletes steps newer than `step`: they came from a run segment that a resume from `step` replays."""
    for newer in [s for s in self._manager.all_steps() if s > step]:
      self._manager.delete(newer)
      _log(f'{self.directory}: removed step {newer}, written after the resumed step {step} by the '
           'interrupted run (it is replayed now)')

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _local_target(item_dir: str):
  """The saved tree as abstract arrays on this process's first device: a checkpoint written by another
  device set (a multi-host job, a GPU box) restores anywhere without the original shardings."""
  saved = ocp.StandardCheckpointer().metadata(item_dir)
  if not jax.tree_util.tree_leaves(getattr(saved, 'item_metadata', saved)):
    raise CheckpointError(f'{item_dir}: no readable array metadata')
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
                      getattr(saved, 'item_metadata', saved))


def restore_raw(workdir: str, step: Optional[int] = None, subdir: str = 'checkpoints',
                item: str = 'state') -> tuple[int, Any]:
  """(step, item as nested dicts of arrays on one local device) of the latest readable (or the given) step
  of a workdir. Read-only: an unreadable latest step is skipped with a log line, never moved."""
  directory = os.path.abspath(os.path.join(workdir, subdir))
  if not os.path.isdir(directory):
    raise CheckpointError(f'no checkpoints directory: {directory}')
  with ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True)) as m:
    steps = sorted(m.all_steps(), reverse=True) if step is None else [step]
    if not steps:
      raise CheckpointError(f'no checkpoint in {directory}')
    problems = []
    for s in steps:
      try:
        present = os.listdir(os.path.join(directory, str(s)))
        name = item if item in present or _LEGACY_ITEM not in present else _LEGACY_ITEM
        target = _local_target(os.path.join(directory, str(s), name))
        if name == _LEGACY_ITEM:
          return s, m.restore(s, args=ocp.args.StandardRestore(target))
        return s, m.restore(s, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(target)}))[item]
      except Exception as error:
        problems.append(f'step {s} ({_reason(error)})')
        _log(f'checkpoint step {s} in {directory} is unreadable ({_reason(error)}); trying an older one')
    raise CheckpointError(f'no readable checkpoint in {directory}: {"; ".join(problems)}')
