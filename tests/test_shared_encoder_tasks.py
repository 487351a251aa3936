"""Two ways of letting NT-Xent and frame order share an encoder: ssl.gradient_balance (the fork's backward
against a NumPy reference, heads and loss untouched, sharded = single-device) and ssl.order_input='separate'."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echojax.core import parallel, steps
from echojax.models import gradient_fork


def np_balance(gp, go, kind):
  gp, go = np.asarray(gp, np.float64), np.asarray(go, np.float64)
  if kind == 'none':
    return gp + go
  if kind == 'equal_norm':
    target = (np.linalg.norm(gp) + np.linalg.norm(go)) / 2
    return gp / np.linalg.norm(gp) * target + go / np.linalg.norm(go) * target
  raise ValueError(kind)


@pytest.mark.parametrize('kind', gradient_fork.GRADIENT_BALANCES)
def test_balance_matches_the_reference(kind):
  rng = np.random.default_rng(3)
  go = rng.normal(size=(6, 2, 5)).astype(np.float32)
  gp = (20.0 * (-go + 0.5 * rng.normal(size=go.shape))).astype(np.float32)   # 20×: NT-Xent's 1/τ
  out = np.asarray(gradient_fork.balance_cotangents(jnp.asarray(gp), jnp.asarray(go), kind))
  np.testing.assert_allclose(out, np_balance(gp, go, kind), rtol=2e-5, atol=1e-5)
  if kind == 'equal_norm':   # the order gradient is no longer 20× smaller than NT-Xent's
    share_o = np.linalg.norm(out - gp * (np.linalg.norm(gp) + np.linalg.norm(go)) / 2 / np.linalg.norm(gp))
    np.testing.assert_allclose(share_o, (np.linalg.norm(gp) + np.linalg.norm(go)) / 2, rtol=1e-4)
  with pytest.raises(ValueError, match='gradient_balance'):
    gradient_fork.balance_cotangents(jnp.asarray(gp), jnp.asarray(go), 'gradnorm')


def test_a_silent_branch_leaves_the_other_one_alone():
  g = jnp.arange(6.0).reshape(2, 3) * 1e3   # large enough that target / tiny would overflow to inf
  for kind in ('equal_norm',):
    out = gradient_fork.balance_cotangents(jnp.zeros_like(g), g, kind)   # curriculum share 0: order only
    assert np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(np.asarray(out) / np.linalg.norm(out), np.asarray(g) / np.linalg.norm(g),
                               rtol=1e-6)


@pytest.mark.parametrize('kind', ['none', 'equal_norm'])
def test_fork_backward_is_the_balanced_sum_of_the_two_branch_gradients(kind):
  rng = np.random.default_rng(0)
  w = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
  a = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
  loss_p = lambda h: 30.0 * jnp.sum(jnp.tanh(h) * a) ** 2
  loss_o = lambda h: -jnp.sum(jnp.sin(h))

  def total(w):
    hp, ho = gradient_fork.fork(x @ w, kind)
    return loss_p(hp) + loss_o(ho)

  h, pullback = jax.vjp(lambda w: x @ w, w)
  expected = pullback(jnp.asarray(np_balance(jax.grad(loss_p)(h), jax.grad(loss_o)(h), kind), jnp.float32))[0]
  np.testing.assert_allclose(jax.grad(total)(w), expected, rtol=1e-5, atol=1e-6)
  hp, ho = gradient_fork.fork(x @ w, kind)
  np.testing.assert_array_equal(hp, x @ w)
  np.testing.assert_array_equal(ho, x @ w)


def _ssl_grads(model, state, batch, order_weight=1.0):
  loss_fn = steps.make_ssl_loss_fn(model, temperature=0.05, order_weight=order_weight)
  (loss, (metrics, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, state.batch_stats, batch, jax.random.key(0))
  return loss, metrics, grads


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)]).astype(np.float64)


@pytest.mark.parametrize('kind', ['equal_norm'])
def test_ssl_model_balance_reweights_only_the_encoder_gradient(kind):
  from tests.test_gradcache import init_state, ssl_batch, ssl_model
  plain, balanced = ssl_model(), ssl_model(gradient_balance=kind)
  batch = {k: jnp.asarray(v) for k, v in ssl_batch(8).items()}
  state = init_state(plain, batch['views'][:2], jnp.float32)
  loss, metrics, g_plain = _ssl_grads(plain, state, batch)
  loss_b, metrics_b, g_bal = _ssl_grads(balanced, state, batch)
  assert float(loss_b) == float(loss)                       # the objective's value is unchanged
  for name in metrics:
    np.testing.assert_allclose(float(metrics_b[name]), float(metrics[name]), rtol=1e-6, err_msg=name)
  for head in ('projection', 'frame_order'):                # so are the heads' own gradients
    np.testing.assert_allclose(_flat(g_bal[head]), _flat(g_plain[head]), rtol=1e-5, atol=1e-8)
  # The encoder's gradient: a re-weighting of the NT-Xent-only and the order-only encoder gradients
  # (the fork's cotangent is linear in the two branch cotangents), not their plain sum.
  _, _, g_contrastive = _ssl_grads(plain, state, batch, order_weight=0.0)
  g_order = jax.tree_util.tree_map(lambda a, b: a - b, g_plain['encoder'], g_contrastive['encoder'])
  basis = np.stack([_flat(g_contrastive['encoder']), _flat(g_order)], axis=1)
  target = _flat(g_bal['encoder'])
  coef, *_ = np.linalg.lstsq(basis, target, rcond=None)
  assert np.linalg.norm(basis @ coef - target) < 1e-3 * np.linalg.norm(target)
  assert coef[0] > 0 and coef[1] > 0 and not np.allclose(coef, [1.0, 1.0], atol=1e-2)


def test_balance_under_a_sharded_batch_equals_single_device():
  from tests.test_gradcache import init_state, ssl_batch, ssl_model
  model = ssl_model(group=0, gradient_balance='equal_norm')
  batch = {k: jnp.asarray(v) for k, v in ssl_batch(8).items()}
  state = init_state(model, batch['views'][:2], jnp.float32)
  grad_fn = jax.jit(lambda s, b: _ssl_grads(model, s, b)[2]['encoder'])
  single = grad_fn(state, batch)
  mesh = parallel.make_mesh()
  assert mesh.size == 8
  sharded = grad_fn(state, jax.device_put(batch, parallel.data_sharding(mesh)))
  np.testing.assert_allclose(_flat(sharded), _flat(single), rtol=1e-4, atol=1e-7)


def test_gradcache_refuses_a_balance():
  from echojax.core import optim
  from tests.test_gradcache import ssl_model
  tx = optim.make_optimizer({'name': 'sgd', 'lr': 0.01}, total_steps=10, global_batch_size=8)
  with pytest.raises(ValueError, match='gradient_balance'):
    steps.make_ssl_train_step(ssl_model(group=2, gradient_balance='equal_norm'), tx, temperature=0.1,
                              microbatch_size=2)


# --- ssl.order_input='separate': NT-Xent on the clips in recorded order, the order head on the shuffled ones

def _shuffle(recorded, labels):
  from echojax.data.augment import permutation_table
  table = permutation_table(recorded.shape[2])
  return np.stack([np.stack([recorded[i, v][table[labels[i, v]]] for v in range(2)]) for i in range(len(labels))])


def test_frames_in_recorded_order_undoes_the_pipelines_shuffle():
  from echojax.core import losses
  rng = np.random.default_rng(5)
  for clip_len in (2, 3, 4):
    recorded = rng.normal(size=(6, 2, clip_len, 3, 3, 1)).astype(np.float32)
    labels = rng.integers(0, int(np.prod(range(1, clip_len + 1))), size=(6, 2)).astype(np.int32)
    shuffled = _shuffle(recorded, labels)
    assert clip_len == 2 or not np.array_equal(shuffled, recorded)
    np.testing.assert_array_equal(losses.frames_in_recorded_order(jnp.asarray(shuffled), jnp.asarray(labels)),
                                  recorded)


def test_order_views_equal_to_views_give_the_shared_outputs():
  # Duplicating every clip leaves BatchNorm's batch mean and variance unchanged, so passing the views again
  # as order_views must reproduce the shared model's outputs exactly: the two paths are one network.
  from tests.test_gradcache import init_state, ssl_batch, ssl_model
  model = ssl_model(group=0)
  batch = {k: jnp.asarray(v) for k, v in ssl_batch(4).items()}
  state = init_state(model, batch['views'][:2], jnp.float32)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  shared, _ = model.apply(variables, batch['views'], train=True, mutable=['batch_stats'])
  separate, _ = model.apply(variables, batch['views'], train=True, mutable=['batch_stats'],
                            order_views=batch['views'])
  for key in ('embeddings', 'features', 'order_logits'):
    np.testing.assert_allclose(separate[key], shared[key], rtol=1e-4, atol=1e-5, err_msg=key)
  with pytest.raises(ValueError, match='order_views'):
    model.apply(variables, batch['views'], train=True, mutable=['batch_stats'], order_views=batch['views'][:2])


def test_separate_order_input_feeds_nt_xent_the_recorded_clips():
  from tests.test_gradcache import init_state, ssl_batch, ssl_model
  rng = np.random.default_rng(1)
  recorded = ssl_batch(4)['views']
  labels = rng.integers(1, 24, size=(4, 2)).astype(np.int32)
  shuffled = {'views': jnp.asarray(_shuffle(recorded, labels)), 'order_label': jnp.asarray(labels)}
  # Without an order head, 'separate' is NT-Xent on the recorded clips: the shared loss of the recorded batch.
  plain = ssl_model(group=0, order=False)
  state = init_state(plain, recorded[:2], jnp.float32)
  separate_loss = steps.make_ssl_loss_fn(plain, 0.1, order_input='separate')
  shared_loss = steps.make_ssl_loss_fn(plain, 0.1)
  args = (state.params, state.batch_stats)
  value, _ = separate_loss(*args, shuffled, jax.random.key(0))
  reference, _ = shared_loss(*args, {'views': jnp.asarray(recorded)}, jax.random.key(0))
  on_shuffled, _ = shared_loss(*args, shuffled, jax.random.key(0))
  np.testing.assert_allclose(float(value), float(reference), rtol=1e-6)
  assert abs(float(on_shuffled) - float(reference)) > 1e-4
  # With the order head, the identity permutation makes 'separate' the shared objective (views = order_views).
  model = ssl_model(group=0)
  state = init_state(model, recorded[:2], jnp.float32)
  identity = {'views': jnp.asarray(recorded), 'order_label': jnp.zeros((4, 2), jnp.int32)}
  value, (metrics, _) = steps.make_ssl_loss_fn(model, 0.1, order_input='separate')(
      state.params, state.batch_stats, identity, jax.random.key(0))
  reference, (ref_metrics, _) = steps.make_ssl_loss_fn(model, 0.1)(
      state.params, state.batch_stats, identity, jax.random.key(0))
  np.testing.assert_allclose(float(value), float(reference), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['order_loss']), float(ref_metrics['order_loss']), rtol=1e-5)
  with pytest.raises(ValueError, match='order_input'):
    steps.make_ssl_loss_fn(model, 0.1, order_input='both')


def test_gradcache_refuses_separate_order_input():
  from echojax.core import optim
  from tests.test_gradcache import ssl_model
  tx = optim.make_optimizer({'name': 'sgd', 'lr': 0.01}, total_steps=10, global_batch_size=8)
  with pytest.raises(ValueError, match='order_input'):
    steps.make_ssl_train_step(ssl_model(group=2), tx, temperature=0.1, microbatch_size=2,
                              order_input='separate')

