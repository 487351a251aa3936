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


def test_curriculum_share_holds_then_ramps():
  shares = [float(losses.contrastive_encoder_share_at(step, 3, 4)) for step in range(9)]
  assert shares == [0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
  assert [float(losses.contrastive_encoder_share_at(step, 2, 0)) for step in range(4)] == [0.0, 0.0, 1.0, 1.0]
  assert float(losses.contrastive_encoder_share_at(0)) == 1.0   # off: the paper's objective from step 0


def _grads(model, state, batch, share):
  import jax
  from echojax.core import steps
  loss_fn = steps.make_ssl_loss_fn(model, temperature=0.1)
  b = dict(batch) if share is None else {**batch, 'contrastive_encoder_share': jnp.float32(share)}
  (loss, (metrics, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.batch_stats, b,
                                                                         jax.random.key(0))
  return loss, metrics, grads


def test_curriculum_keeps_nt_xent_out_of_the_encoder_but_trains_the_projection_head():
  import jax
  from echojax.core import optim
  from tests.test_gradcache import init_state, ssl_batch, ssl_model
  model = ssl_model()
  tx = optim.make_optimizer({'name': 'sgd', 'lr': 0.01}, total_steps=10, global_batch_size=8)
  batch = {k: jnp.asarray(v) for k, v in ssl_batch(8).items()}
  state = init_state(model, batch['views'][:2], jnp.float32, tx)
  loss_full, m_full, g_full = _grads(model, state, batch, None)
  loss_0, m_0, g_0 = _grads(model, state, batch, 0.0)
  _, _, g_half = _grads(model, state, batch, 0.5)
  # The objective's value is the paper's at every share; only where its gradient flows changes.
  np.testing.assert_allclose(float(loss_0), float(loss_full), rtol=1e-6)
  np.testing.assert_allclose(float(m_0['nt_xent']), float(m_full['nt_xent']), rtol=1e-6)
  # Projection head: NT-Xent's full gradient at any share; frame-order head: untouched by NT-Xent anyway.
  for head in ('projection', 'frame_order'):
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
                           g_0[head], g_full[head])
  # Encoder at share 0: the frame-order gradient alone (the same as a model trained on order CE only).
  order_only = jax.grad(lambda p: steps_order_loss(model, p, state, batch))(state.params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                         g_0['encoder'], order_only['encoder'])
  # Share 0.5: exactly halfway between, since the encoder's gradient is linear in the share.
  jax.tree_util.tree_map(lambda h, a, b: np.testing.assert_allclose(h, (a + b) / 2, rtol=1e-4, atol=1e-6),
                         g_half['encoder'], g_0['encoder'], g_full['encoder'])
  assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree_util.tree_leaves(g_0['encoder']),
                                                        jax.tree_util.tree_leaves(g_full['encoder']))) > 1e-4


def steps_order_loss(model, params, state, batch):
  import jax
  from echojax.core import losses as L
  outputs, _ = model.apply({'params': params, 'batch_stats': state.batch_stats}, batch['views'], train=True,
                           mutable=['batch_stats'], rngs={'dropout': jax.random.key(0)})
  return L.frame_order_loss(outputs['order_logits'], batch['order_label'])[0]


def test_the_curriculum_step_logs_its_share_and_then_equals_the_plain_step():
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
  _, full_first = plain(state, batch, jax.random.key(0))
  assert float(m0['contrastive_encoder_share']) == 0.0
  np.testing.assert_allclose(float(m0['loss']), float(full_first['loss']), rtol=1e-6)   # same objective value
  assert abs(float(m0['grad_norm']) - float(full_first['grad_norm'])) > 1e-3            # another gradient
  _, m1 = step(first, batch, jax.random.key(1))
  _, reference = plain(first, batch, jax.random.key(1))
  assert float(m1['contrastive_encoder_share']) == 1.0
  for name in ('loss', 'nt_xent', 'order_loss', 'grad_norm'):
    np.testing.assert_allclose(float(m1[name]), float(reference[name]), rtol=1e-6, err_msg=name)
