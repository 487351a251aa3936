"""Every trainer's first steps: jax.distributed (when asked), the mesh over all devices, the per-process
batch, the dataset (built on first use by process 0 while the others wait), the resolved config saved as
DIR/config.json, and the jitted train step with its shardings."""
from __future__ import annotations

import os

import jax

from echojax.core import parallel
from echojax.jobs import config_lib


def start_run(cfg, workdir: str):
  """→ (mesh, local_batch)."""
  parallel.maybe_initialize_distributed(cfg.distributed)
  mesh = parallel.make_mesh()
  parallel.global_batch_check(cfg.train.global_batch_size, mesh)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    config_lib.dump_config(cfg, os.path.join(workdir, 'config.json'))
  return mesh, cfg.train.global_batch_size // jax.process_count()


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
