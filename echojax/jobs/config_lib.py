"""Config helpers shared by configs/*.py and the trainers: variant parsing, epoch→step durations, the
resolved-config dump, and the CPU-only warning for paper-scale configs."""
from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import ml_collections


def parse_variant(arg: str | None, allowed: Sequence[str], default: str) -> str:
  """`file.py:VARIANT` → VARIANT, with a clear error listing the allowed variants."""
  variant = (arg or default).strip()
  if variant not in allowed:
    raise ValueError(f'unknown config variant {variant!r}; choose one of {", ".join(allowed)}')
  return variant


def steps_from_duration(train_cfg, *, examples_per_epoch: int, global_batch_size: int) -> tuple[int, int]:
  """(total_steps, steps_per_epoch): `num_steps` > 0 wins over `num_epochs` (both live in train_cfg)."""
  steps_per_epoch = max(examples_per_epoch // global_batch_size, 1)
  if train_cfg.get('num_steps', -1) and train_cfg.get('num_steps', -1) > 0:
    return int(train_cfg.num_steps), steps_per_epoch
  return int(math.ceil(train_cfg.num_epochs * steps_per_epoch)), steps_per_epoch


def to_dict(cfg: Any) -> Any:
  if isinstance(cfg, ml_collections.ConfigDict):
    return {k: to_dict(v) for k, v in cfg.items()}
  if isinstance(cfg, (list, tuple)):
    return [to_dict(v) for v in cfg]
  return cfg


def dump_config(cfg: ml_collections.ConfigDict, path: str) -> None:
  """Writes the resolved config as JSON (the exact settings a run used)."""
  with open(path, 'w') as f:
    json.dump(to_dict(cfg), f, indent=2, sort_keys=True, default=str)


def estimate_cpu_step_seconds(cfg) -> float:
  """Rough XLA:CPU train-step time (2 cores ≈ 100 GFLOP/s effective; train ≈ 3× forward MACs·2)."""
  gmac_per_clip = 10.78 * (cfg.data.clip_len / 4) * (cfg.model.width / 64) ** 2
  clips = 2 * cfg.train.global_batch_size
  return 3 * 2 * gmac_per_clip * clips / 100.0


def warn_if_paper_scale_on_cpu(cfg, backend: str, log) -> None:
  """On CPU a paper-scale config would take months: say so, with the estimate, and point to :demo."""
  if backend != 'cpu':
    return
  est = estimate_cpu_step_seconds(cfg)
  if est > 30:
    log(f'WARNING: this config is paper scale; on this CPU one train step would take ~{est:,.0f} s '
        f'(R3D width {cfg.model.width}, global batch {cfg.train.global_batch_size}). '
        'Use a GPU/TPU, or try `--config=configs/ssl.py:demo` on CPU.')


def merge(base: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Returns a copy of `base` with dotted-key overrides (unknown keys are an error)."""
  cfg = ml_collections.ConfigDict(base.to_dict())
  for key, value in overrides.items():
    node = cfg
    parts = key.split('.')
    for p in parts[:-1]:
      node = node[p]
    if parts[-1] not in node:
      raise KeyError(f'unknown config key {key!r}')
    node[parts[-1]] = value
  return cfg
