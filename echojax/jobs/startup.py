"""Every trainer's first steps, in the order that keeps a mistake from costing anything: the config
validated, jax.distributed (when asked) with the peer watchdog, the mesh and per-process batch, then the
workdir lock and config provenance (process 0, before anything is written); the dataset (built on first
use by process 0 while the others wait) and the jitted train step with its shardings."""
from __future__ import annotations

import jax
import numpy as np

from echojax.core import parallel
from echojax.jobs import config_checks, peers, workdir as workdir_lib
from echojax.jobs.errors import ConfigError
from echojax.jobs.logging_lib import log


def start_distributed(cfg) -> None:
  """jax.distributed when the config or environment asks for it, then (several processes) the watchdog
  that ends every survivor within distributed.peer_timeout_s of a peer's death."""
  parallel.maybe_initialize_distributed(cfg.distributed)
  peers.start_watchdog(cfg.distributed.peer_timeout_s)


def start_run(cfg, workdir: str):
  """→ (mesh, local_batch). Raises ConfigError / WorkdirError before the workdir is touched."""
  config_checks.validate(cfg)
  start_distributed(cfg)
  mesh = parallel.make_mesh()
  try:
    parallel.global_batch_check(cfg.train.global_batch_size, mesh)
  except ValueError as e:
    raise ConfigError(f'config: train.global_batch_size: {e}') from None
  claim_workdir(cfg, workdir)
  return mesh, cfg.train.global_batch_size // jax.process_count()


def claim_workdir(cfg, workdir: str) -> None:
  """Process 0 takes the lock and checks/records the config; every process learns whether it may go on."""
  refusal = ''
  if jax.process_index() == 0:
    try:
      workdir_lib.acquire(workdir, cfg.mode, log)
      try:
        workdir_lib.check_and_record_config(cfg, workdir, log)
      except BaseException:
        workdir_lib.release(workdir)
        raise
    except workdir_lib.WorkdirError as e:
      refusal = str(e)
      if jax.process_count() == 1:
        raise
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    refused = int(multihost_utils.broadcast_one_to_all(np.int32(bool(refusal))))
    if refused:
      raise workdir_lib.WorkdirError(refusal or f'process 0 refused workdir {workdir} (see its log)')


def end_run(workdir: str) -> None:
  """Releases the workdir lock (also released at exit, and by the kernel if the process dies)."""
  workdir_lib.release(workdir)


def check_clips_fit(cfg, meta: list[dict]) -> None:
  """Clip lengths vs the training videos' frame counts (after the dataset is known, before any model)."""
  config_checks.check_clips_fit(cfg.data, meta, cfg.data.train_split, log)


def prepare_dataset(data_cfg, log=print):
  """The TFDS builder of `data_cfg`, built first when absent and allowed; all processes agree."""
  from jax.experimental import multihost_utils
  from echojax.data import prepare

  def barrier():
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('dataset built')

  return prepare.prepare_dataset(data_cfg, log=log, is_chief=jax.process_index() == 0, barrier=barrier)


def jit_train_step(step_fn, mesh):
  """jit with state replicated, batch sharded over 'data', and the old state's buffers donated."""
  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(step_fn, in_shardings=(repl, data, repl), out_shardings=(repl, repl), donate_argnums=(0,))
