"""The one batched-inference loop (probe features, validation, test evaluation, prediction): host batches →
global arrays on the mesh → jitted apply → host-local outputs, gathered across processes with their ids.
Processes may hold different numbers of batches; the shorter ones feed fully masked batches."""
from __future__ import annotations

from typing import Callable, Iterable, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

ID_BYTES = 96


def _encode_ids(ids) -> np.ndarray:
  out = np.zeros((len(ids), ID_BYTES), np.uint8)
  for i, s in enumerate(ids):
    b = s if isinstance(s, bytes) else str(s).encode()
    if len(b) > ID_BYTES:
      raise ValueError(f'id longer than {ID_BYTES} bytes: {b[:40]!r}...')
    out[i, :len(b)] = np.frombuffer(b, np.uint8)
  return out


def _decode_ids(arr: np.ndarray) -> list[str]:
  return [bytes(row).rstrip(b'\0').decode() for row in arr]


def run_inference(apply_fn: Callable, batches: Iterable[Mapping[str, np.ndarray]], mesh, *,
                  input_key: str = 'video', num_local_batches: int | None = None,
                  keep_keys=('label',)) -> dict:
  """Applies `apply_fn(global_input) -> array (B, ...)` to every batch; returns numpy arrays of the valid
  rows of ALL processes: 'outputs', 'study_id', 'video_id' and `keep_keys`.

  With several processes every one must run the same number of steps: either the iterators have equal
  lengths (the eval pipeline pads to that), or pass `num_local_batches` and shorter ones are padded here.
  """
  data_sharding = jax.sharding.NamedSharding(mesh, P('data'))
  n_proc = jax.process_count()
  iterator = iter(batches)
  total = None
  if n_proc > 1 and num_local_batches is not None:
    total = int(multihost_utils.process_allgather(np.int32(num_local_batches)).max())
  outputs, study_ids, video_ids, kept = [], [], [], {k: [] for k in keep_keys}
  template = None
  step = 0
  while total is None or step < total:
    batch = next(iterator, None)
    if batch is None:
      if total is None:
        break
      batch = {k: np.zeros_like(v) for k, v in template.items()}  # masked filler batch
      batch['mask'] = np.zeros_like(template['mask'])
    template = template or batch
    x = jax.make_array_from_process_local_data(data_sharding, np.asarray(batch[input_key]))
    y = apply_fn(x)
    local = np.asarray(multihost_utils.global_array_to_host_local_array(y, mesh, P('data')))
    mask = np.asarray(batch['mask']).astype(bool)
    outputs.append(local[mask])
    study_ids.extend(np.asarray(batch['study_id'])[mask].tolist())
    video_ids.extend(np.asarray(batch['video_id'])[mask].tolist())
    for k in keep_keys:
      kept[k].append(np.asarray(batch[k])[mask])
    step += 1
  if not outputs:
    raise ValueError('run_inference got no batches')
  result = {'outputs': np.concatenate(outputs), 'study_id': study_ids, 'video_id': video_ids,
            **{k: np.concatenate(v) for k, v in kept.items()}}
  result['study_id'] = [s.decode() if isinstance(s, bytes) else s for s in result['study_id']]
  result['video_id'] = [s.decode() if isinstance(s, bytes) else s for s in result['video_id']]
  if n_proc > 1:
    result = _gather_rows(result)
  return result


def _gather_rows(result: dict) -> dict:
  """Concatenates every process's rows (padded to a common length) so each process sees all rows."""
  n = len(result['study_id'])
  n_max = int(multihost_utils.process_allgather(np.int32(n)).max())
  counts = np.asarray(multihost_utils.process_allgather(np.int32(n)))

  def pad(a):
    a = np.asarray(a)
    return np.concatenate([a, np.zeros((n_max - n,) + a.shape[1:], a.dtype)])

  gathered = {}
  for k, v in result.items():
    arr = _encode_ids(v) if k in ('study_id', 'video_id') else np.asarray(v)
    allv = np.asarray(multihost_utils.process_allgather(pad(arr)))
    rows = np.concatenate([allv[p, :counts[p]] for p in range(len(counts))])
    gathered[k] = _decode_ids(rows) if k in ('study_id', 'video_id') else rows
  return gathered
