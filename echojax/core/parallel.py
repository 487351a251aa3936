"""Data parallelism over every device of every process: the 1-D 'data' mesh, batch/replicated shardings,
host-local numpy batches → global jax.Arrays (and a double-buffered prefetch of them), optional
jax.distributed start-up, and the parameter-sharding hook (replicated, or a simple FSDP split).
"""
from __future__ import annotations

import collections
import itertools
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
# FSDP leaves below this many elements stay replicated: sharding them costs more in collectives than it saves.
FSDP_MIN_SIZE = 2**14


def make_mesh(num_devices: int | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """1-D mesh with axis 'data' over `devices` (default: jax.devices(), all processes' devices).

  num_devices takes the first n of them (single-process debugging only: in a multi-process run every
  process must own a device of the mesh).
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_devices is not None:
    if not 0 < num_devices <= len(devices):
      raise ValueError(f'make_mesh: num_devices={num_devices} but {len(devices)} devices are available')
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over 'data', the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch_check(global_batch: int, mesh: Mesh) -> None:
  """Raise unless the global batch splits evenly over the mesh's devices (and so over processes)."""
  num_devices = mesh.devices.size
  if global_batch <= 0 or global_batch % num_devices:
    raise ValueError(
        f'global batch size {global_batch} is not a positive multiple of the device count {num_devices} '
        f'({jax.process_count()} process(es)); choose a batch size divisible by {num_devices}')


def _is_numeric(value: Any) -> bool:
  array = np.asarray(value)
  return array.dtype.kind in 'biufc'


def host_to_global(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's slice of the batch (dict of numpy, leading dim = local batch) → global jax.Arrays
  sharded over 'data' via jax.make_array_from_process_local_data.

  Numeric entries are converted. Non-numeric entries (strings, bytes, object arrays such as video_id) are
  DROPPED: they cannot enter a jitted step; a caller that needs them (e.g. evaluation aggregating by study)
  reads them from its host-local batch, whose rows are this process's rows of the global batch, in order.
  """
  sharding = data_sharding(mesh)
  local_devices = len(mesh.local_devices)
  global_batch = {}
  for key, value in batch.items():
    if not _is_numeric(value):
      continue
    value = np.asarray(value)
    if value.ndim == 0:
      raise ValueError(f'host_to_global: entry {key!r} is a scalar; every entry needs a batch dimension')
    if value.shape[0] % local_devices:
      raise ValueError(f'host_to_global: entry {key!r} has local batch {value.shape[0]}, not divisible by '
                       f'the {local_devices} local devices of process {jax.process_index()}')
    global_batch[key] = jax.make_array_from_process_local_data(sharding, value)
  return global_batch


def prefetch_to_mesh(batches: Iterable[Mapping[str, Any]], mesh: Mesh, size: int = 2,
                     keys: Sequence[str] | None = None) -> Iterator[dict[str, jax.Array]]:
  """Global batches from host-local ones (host_to_global), with `size` batches transferred ahead.

  Transfers and jitted steps are dispatched asynchronously: when the loop asks for batch k+1 (right after
  dispatching step k), batch k+1 is already on the devices and batch k+1+size starts its transfer while
  step k runs, so neither the step nor the loop waits on host→device copies. size=2 is double buffering;
  each buffered batch costs its size in device memory. keys: the entries to transfer (default: all
  numeric ones).
  """
  if size < 1:
    raise ValueError(f'prefetch_to_mesh: size must be >= 1, got {size}')
  queue: collections.deque = collections.deque()
  iterator = iter(batches)

  def enqueue(n: int) -> None:
    for host in itertools.islice(iterator, n):
      queue.append(host_to_global(host if keys is None else {k: host[k] for k in keys}, mesh))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)  # runs when the next batch is asked for, i.e. after the step on this one was dispatched


def _fsdp_spec(shape: tuple[int, ...], num_shards: int, min_size: int) -> P:
  """Shard the largest dimension divisible by the device count; replicate small or indivisible leaves."""
  if not shape or int(np.prod(shape)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % num_shards == 0:
      spec = [None] * len(shape)
      spec[axis] = DATA_AXIS
      return P(*spec)
  return P()


def param_sharding(mesh: Mesh, params: Any, fsdp: bool = False, fsdp_min_size: int = FSDP_MIN_SIZE) -> Any:
  """A pytree of NamedShardings matching `params` (any pytree of arrays, e.g. a whole TrainState).

  fsdp=False: everything replicated (pure data parallelism). fsdp=True: each leaf of at least fsdp_min_size
  elements is split along its largest dimension divisible by the device count; the rule depends only on the
  shape, so optimizer moments get the same layout as their parameters. XLA inserts the all-gathers; the
  results do not change.
  """
  num_shards = mesh.devices.size
  def sharding_of(leaf):
    if not fsdp:
      return replicated(mesh)
    return NamedSharding(mesh, _fsdp_spec(tuple(np.shape(leaf)), num_shards, fsdp_min_size))
  return jax.tree_util.tree_map(sharding_of, params)


def _cfg_get(cfg: Any, key: str) -> Any:
  """cfg[key] for a dict / ConfigDict / object, with the config's 'unset' sentinels ('', 0, -1) as None."""
  if cfg is None:
    return None
  value = cfg.get(key) if (isinstance(cfg, Mapping) or hasattr(cfg, 'get')) else getattr(cfg, key, None)
  if isinstance(value, bool):
    return value
  return None if value in ('', -1) or (key != 'process_id' and value == 0) else value


def _detected_cluster() -> str | None:
  """Name of the multi-process cluster environment JAX would auto-detect (SLURM, Open MPI, TPU pod, k8s),
  or None. A SLURM / Open MPI job of a single task counts as none."""
  try:
    from jax._src import clusters  # private, but it is exactly the detection jax.distributed uses
    env = next((c for c in clusters.ClusterEnv._cluster_types
                if not c.opt_in_only_method and c.is_env_present()), None)
  except (ImportError, AttributeError):  # a JAX without this module: fall back to the launchers' variables
    size = os.environ.get('OMPI_COMM_WORLD_SIZE') or os.environ.get('SLURM_NTASKS')
    return 'env' if size and int(size) > 1 else None
  if env is None:
    return None
  if env.__name__ in ('OmpiCluster', 'SlurmCluster') and env.get_process_count() <= 1:
    return None
  return env.__name__


def maybe_initialize_distributed(cfg: Any = None) -> bool:
  """Start jax.distributed when asked; returns whether it is running (started now or before).

  cfg: None, a dict or a ConfigDict — the config's `distributed` block with keys mode ('auto' | 'off';
  'distributed' is accepted as an alias), coordinator_address, num_processes, process_id, optional
  local_device_ids ('' / 0 / -1 mean unset). In order, start-up is asked for by: cfg.coordinator_address
  (then num_processes and process_id are required); the environment JAX_COORDINATOR_ADDRESS (+
  JAX_NUM_PROCESSES, JAX_PROCESS_ID); mode 'auto' inside a detected multi-process cluster job (SLURM,
  Open MPI, TPU pod, k8s). mode 'off' never starts it. Must run before any other JAX computation.
  """
  if jax.distributed.is_initialized():
    return True
  mode = _cfg_get(cfg, 'mode') or _cfg_get(cfg, 'distributed')
  if mode in (False, 'off', 'none'):
    return False
  if mode not in (None, 'auto', True):
    raise ValueError(f"distributed start-up: mode={mode!r} must be 'auto' or 'off'")
  cfg_address = _cfg_get(cfg, 'coordinator_address')
  address = cfg_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
  if address:
    def required(cfg_key, env_key):
      value = _cfg_get(cfg, cfg_key) if cfg_address else os.environ.get(env_key)
      if value is None or value == '':
        raise ValueError(f'distributed start-up: coordinator address {address!r} given but '
                         f'{cfg_key if cfg_address else env_key} is not set')
      return int(value)
    kwargs = dict(coordinator_address=address, num_processes=required('num_processes', 'JAX_NUM_PROCESSES'),
                  process_id=required('process_id', 'JAX_PROCESS_ID'))
    local_ids = _cfg_get(cfg, 'local_device_ids')
    if local_ids is not None:
      kwargs['local_device_ids'] = list(local_ids)
    jax.distributed.initialize(**kwargs)
    return True
  if mode in ('auto', True) and _detected_cluster():
    jax.distributed.initialize()
    return True
  return False
