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


def test_curriculum_weight_holds_then_ramps():
  weights = [float(losses.contrastive_weight_at(step, 3, 4)) for step in range(9)]
  assert weights == [0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
  assert [float(losses.contrastive_weight_at(step, 2, 0)) for step in range(4)] == [0.0, 0.0, 1.0, 1.0]
  assert float(losses.contrastive_weight_at(0)) == 1.0   # off: the paper's objective from step 0


def test_the_curriculum_trains_frame_order_alone_first_then_the_full_objective():
  import jax
  from echojax.core import optim, steps
  from tests.test_gradcache import init_state, ssl_batch, ssl_model
  model = ssl_model()
  tx = optim.make_optimizer({'name': 'sgd', 'lr': 0.01}, total_steps=10, global_batch_size=8)
  batch = {k: jnp.asarray(v) for k, v in ssl_batch(8).items()}
  state = init_state(model, batch['views'][:2], jnp.float32, tx)
  step = jax.jit(steps.make_ssl_train_step(model, tx, temperature=0.1, order_only_steps=1))
  plain = jax.jit(steps.make_ssl_train_step(model, tx, temperature=0.1))
  first, m0 = step(state, batch, jax.random.key(0))
  assert float(m0['contrastive_weight']) == 0.0
  np.testing.assert_allclose(float(m0['loss']), float(m0['order_loss']), rtol=1e-6)   # NT-Xent not in it
  assert float(m0['nt_xent']) > 1.0                                                   # though still logged
  _, m1 = step(first, batch, jax.random.key(1))
  _, reference = plain(first, batch, jax.random.key(1))
  assert float(m1['contrastive_weight']) == 1.0
  for name in ('loss', 'nt_xent', 'order_loss', 'grad_norm'):
    np.testing.assert_allclose(float(m1[name]), float(reference[name]), rtol=1e-6, err_msg=name)
  # Order-only first step: the update is the frame-order gradient alone, not the full objective's.
  _, full_first = plain(state, batch, jax.random.key(0))
  assert abs(float(m0['grad_norm']) - float(full_first['grad_norm'])) > 1e-3
