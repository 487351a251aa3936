"""Frame-order accuracy, exactly and up to time reversal, on the permutation table the data pipeline uses."""
import itertools

import jax.numpy as jnp
import numpy as np
import pytest

from echojax.core import losses
from echojax.data.augment import permutation_table


@pytest.mark.parametrize('clip_len', [2, 3, 4])
def test_reversal_index_matches_the_pipeline_table(clip_len):
  table = permutation_table(clip_len)
  rev = losses._reversal_index(len(table))
  for k, perm in enumerate(table):
    np.testing.assert_array_equal(table[rev[k]], perm[::-1])
  assert np.array_equal(rev[rev], np.arange(len(table)))


def test_accuracy_counts_the_reverse_only_in_the_reversal_metric():
  table = permutation_table(4)
  rev = losses._reversal_index(24)
  labels = jnp.array([0, 5, 7, 23])
  exact = jnp.array([0, 5, 1, 2])            # 2 right
  reversed_ = jnp.array([rev[0], 5, rev[7], 3])   # 1 exact, 2 reversed, 1 wrong
  onehot = lambda p: jnp.eye(24)[p] * 10.0
  _, acc = losses.frame_order_loss(onehot(exact), labels)
  assert float(acc) == 0.5
  assert float(losses.order_accuracy_up_to_reversal(onehot(exact), labels)) == 0.5
  _, acc = losses.frame_order_loss(onehot(reversed_), labels)
  assert float(acc) == 0.25
  assert float(losses.order_accuracy_up_to_reversal(onehot(reversed_), labels)) == 0.75
  assert tuple(table[rev[7]]) == tuple(table[7][::-1])
  with pytest.raises(ValueError, match='not T!'):
    losses._reversal_index(25)
  assert list(itertools.permutations(range(3)))[0] == (0, 1, 2)
