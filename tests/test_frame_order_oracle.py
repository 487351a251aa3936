"""The frame-order oracle (scripts/frame_order_oracle.py) recovers the permutation of smooth clips up to
reversal, and is at chance on clips whose frames carry no temporal structure."""
import os
import sys

import numpy as np

from scripts import frame_order_oracle as oracle  # noqa: E402
from echojax.data.augment import permutation_table  # noqa: E402

PERMS = np.asarray(permutation_table(4))
# Label of the time-reversed clip under the same shuffle: view frame k = original frame 3 - p[k].
REVERSED = np.array([next(j for j, q in enumerate(PERMS) if (q == 3 - p).all()) for p in PERMS])


def shuffled(clips, labels):
  """The pipeline's shuffle: view frame k = original frame PERMS[label][k]."""
  return np.stack([clip[PERMS[label]] for clip, label in zip(clips, labels)])


def test_oracle_finds_smooth_orders_up_to_reversal():
  rng = np.random.default_rng(0)
  base, drift = rng.normal(size=(48, 1, 6, 6)), rng.normal(size=(48, 1, 6, 6))
  clips = base + drift * np.arange(4)[None, :, None, None]   # frames move steadily in time
  labels = rng.integers(0, 24, 48)
  predicted = oracle.oracle_predictions(shuffled(clips, labels), PERMS)
  assert ((predicted == labels) | (predicted == REVERSED[labels])).all()


def test_oracle_is_at_chance_without_temporal_structure():
  rng = np.random.default_rng(1)
  clips = rng.normal(size=(2400, 4, 6, 6))                    # independent frames: no order to find
  labels = rng.integers(0, 24, 2400)
  predicted = oracle.oracle_predictions(shuffled(clips, labels), PERMS)
  hit = ((predicted == labels) | (predicted == REVERSED[labels])).mean()
  assert 0.04 < hit < 0.13                                    # chance 2/24 ≈ 0.083
