"""Label-fraction subsets of training studies (nested: each fraction is a prefix of one seeded
permutation) and the class weights computed over the chosen training videos."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


class LabelFractionError(ValueError):
  pass


def nested_study_subset(study_ids: Sequence[str], frac: float, seed: int) -> list[str]:
  """The first ceil(frac·n) studies of a seeded permutation of the sorted unique ids: 1 % ⊂ 5 % ⊂ …"""
  if not 0.0 < frac <= 1.0:
    raise LabelFractionError(f'label fraction must be in (0, 1], got {frac}')
  unique = sorted(set(study_ids))
  order = np.random.default_rng(seed).permutation(len(unique))
  k = max(1, math.ceil(frac * len(unique) - 1e-9))
  return [unique[i] for i in order[:k]]


def study_labels(meta: Sequence[dict], label_key: str) -> dict[str, int]:
  """study_id → label from per-video metadata (labels < 0 = unknown are left out)."""
  out: dict[str, int] = {}
  for m in meta:
    y = int(m[label_key])
    if y < 0:
      continue
    if out.setdefault(m['study_id'], y) != y:
      raise ValueError(f'study {m["study_id"]!r} has videos with different {label_key} labels')
  return out


def check_both_classes(labels_by_study: dict[str, int], frac: float) -> None:
  pos = sum(1 for y in labels_by_study.values() if y > 0)
  neg = len(labels_by_study) - pos
  if pos == 0 or neg == 0:
    raise LabelFractionError(
        f'label fraction {frac} leaves {pos} positive and {neg} negative training studies '
        f'(of {len(labels_by_study)}); both classes are needed — use a larger fraction or another subset_seed')


def pos_weight(meta: Sequence[dict], label_key: str, studies: set[str]) -> float:
  """n_neg / n_pos over the training VIDEOS of the chosen studies (the seed code's class weighting)."""
  ys = np.array([int(m[label_key]) for m in meta if m['study_id'] in studies and int(m[label_key]) >= 0])
  n_pos = int((ys > 0).sum())
  if n_pos == 0:
    raise LabelFractionError('no positive training videos')
  return float((ys == 0).sum()) / n_pos
