"""echojax.optim: kernel-only decay masks, lr scaling, schedules, clipping, LARS, config errors."""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from echojax.core import optim


def toy_params():
  """Flax-style names: conv/dense kernels and biases, BatchNorm scale/bias."""
  return {
      'Conv_0': {'kernel': jnp.full((2, 3), 2.0)},
      'BatchNorm_0': {'scale': jnp.full((3,), 2.0), 'bias': jnp.full((3,), 2.0)},
      'Dense_0': {'kernel': jnp.full((3, 2), 2.0), 'bias': jnp.full((2,), 2.0)},
  }


def one_update(tx, params, grads):
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def test_kernel_mask_selects_only_kernels():
  mask = optim.kernel_mask(toy_params())
  assert mask == {'Conv_0': {'kernel': True}, 'BatchNorm_0': {'scale': False, 'bias': False},
                  'Dense_0': {'kernel': True, 'bias': False}}
  with pytest.raises(ValueError, match='kernel'):
    optim.kernel_mask({'bias': jnp.ones(2)})


@pytest.mark.parametrize('name', ['adam', 'adamw', 'sgd', 'lars'])
def test_weight_decay_touches_kernels_only(name):
  params = toy_params()
  zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  cfg = {'name': name, 'lr': 0.1, 'weight_decay': 0.5, 'momentum': 0.0}
  updates = one_update(optim.make_optimizer(cfg, total_steps=10, global_batch_size=8), params, zero_grads)
  for module, leaves in updates.items():
    for leaf_name, update in leaves.items():
      if leaf_name == 'kernel':
        assert np.all(np.asarray(update) < 0), (name, module)
      else:
        np.testing.assert_array_equal(np.asarray(update), 0.0, err_msg=f'{name} {module}/{leaf_name}')
  if name in ('adamw', 'sgd'):  # decoupled / plain L2 with zero grads: exactly −lr·wd·w
    np.testing.assert_allclose(np.asarray(updates['Dense_0']['kernel']), -0.1 * 0.5 * 2.0, rtol=1e-6)


def test_no_weight_decay_means_zero_update_for_zero_grads():
  params = toy_params()
  zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates = one_update(optim.make_optimizer({'name': 'adamw', 'lr': 0.1}, total_steps=10, global_batch_size=8),
                       params, zero_grads)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree_util.tree_leaves(updates))


@pytest.mark.parametrize('scaling,expected', [('none', 0.1), ('linear', 0.1 * 512 / 256),
                                              ('sqrt', 0.1 * math.sqrt(512 / 256))])
def test_lr_scaling_rule(scaling, expected):
  cfg = ml_collections.ConfigDict({'name': 'adam', 'lr': 0.1, 'lr_scaling': scaling, 'base_batch_size': 256})
  schedule = optim.make_schedule(cfg, total_steps=100, global_batch_size=512)
  assert float(schedule(0)) == pytest.approx(expected)
  assert float(schedule(99)) == pytest.approx(expected)
  assert optim.scaled_learning_rate(cfg, 512) == pytest.approx(expected)


def test_lr_scaling_needs_base_batch_size():
  with pytest.raises(ValueError, match='base_batch_size'):
    optim.make_schedule({'lr': 0.1, 'lr_scaling': 'linear'}, total_steps=10, global_batch_size=64)


def test_warmup_cosine_values():
  cfg = {'name': 'sgd', 'lr': 0.4, 'schedule': 'warmup_cosine', 'warmup_steps': 10, 'end_lr_factor': 0.1}
  schedule = optim.make_schedule(cfg, total_steps=110, global_batch_size=8)
  peak, end = 0.4, 0.04
  def expected(step):
    if step < 10:
      return peak * step / 10
    progress = (step - 10) / 100
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * progress))
  for step in (0, 5, 10, 35, 60, 85, 110):
    assert float(schedule(step)) == pytest.approx(expected(step), rel=1e-5, abs=1e-7), step
  # warmup_fraction: 10 % of 200 steps.
  frac = optim.make_schedule({**cfg, 'warmup_steps': 0, 'warmup_fraction': 0.1}, 200, 8)
  assert float(frac(10)) == pytest.approx(0.2) and float(frac(20)) == pytest.approx(0.4)
  with pytest.raises(ValueError, match='not both'):
    optim.make_schedule({**cfg, 'warmup_fraction': 0.1}, 200, 8)
  with pytest.raises(ValueError, match='total_steps'):
    optim.make_schedule(cfg, total_steps=10, global_batch_size=8)


def test_paper_configs_are_constant():
  ssl = optim.make_schedule({'name': 'adam', 'lr': 0.1, 'schedule': 'constant'}, 10**6, 392)
  assert float(ssl(0)) == pytest.approx(0.1) and float(ssl(999_999)) == pytest.approx(0.1)
  warm = optim.make_schedule({'lr': 1e-4, 'schedule': 'constant', 'warmup_steps': 4}, 100, 88)
  assert float(warm(2)) == pytest.approx(5e-5) and float(warm(50)) == pytest.approx(1e-4)


def test_gradient_clipping_by_global_norm():
  params = {'Dense_0': {'kernel': jnp.zeros((2,)), 'bias': jnp.zeros((2,))}}
  grads = {'Dense_0': {'kernel': jnp.array([6.0, 0.0]), 'bias': jnp.array([0.0, 8.0])}}  # norm 10
  clipped = optim.make_optimizer({'name': 'sgd', 'lr': 1.0, 'momentum': 0.0, 'grad_clip_norm': 1.0},
                                 total_steps=1, global_batch_size=1)
  updates = one_update(clipped, params, grads)
  assert float(optax.global_norm(updates)) == pytest.approx(1.0, rel=1e-6)
  np.testing.assert_allclose(np.asarray(updates['Dense_0']['kernel']), [-0.6, 0.0], rtol=1e-6)
  unclipped = optim.make_optimizer({'name': 'sgd', 'lr': 1.0, 'momentum': 0.0, 'grad_clip_norm': 0.0},
                                   total_steps=1, global_batch_size=1)
  assert float(optax.global_norm(one_update(unclipped, params, grads))) == pytest.approx(10.0)
  with pytest.raises(ValueError, match='grad_clip_norm'):
    optim.make_optimizer({'lr': 1.0, 'grad_clip_norm': -1.0}, total_steps=1, global_batch_size=1)


def test_lars_trust_ratio_on_kernels_only_and_it_trains():
  params = {'Dense_0': {'kernel': jnp.array([3.0, 4.0]), 'bias': jnp.array([1.0, 1.0])}}
  grads = {'Dense_0': {'kernel': jnp.array([0.6, 0.8]), 'bias': jnp.array([0.5, -0.5])}}
  tx = optim.make_optimizer({'name': 'lars', 'lr': 0.1, 'trust_coefficient': 0.01, 'momentum': 0.9},
                            total_steps=10, global_batch_size=8)
  updates = one_update(tx, params, grads)
  # kernel: −lr · tc · ‖w‖/‖g‖ · g = −0.1 · 0.01 · 5/1 · g; bias: plain −lr · g.
  np.testing.assert_allclose(np.asarray(updates['Dense_0']['kernel']), -0.1 * 0.01 * 5 * np.array([0.6, 0.8]),
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(updates['Dense_0']['bias']), [-0.05, 0.05], rtol=1e-6)

  target = {'Dense_0': {'kernel': jnp.array([1.0, -2.0]), 'bias': jnp.array([0.5, 0.0])}}
  loss = lambda p: sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree_util.tree_leaves(p),
                                                              jax.tree_util.tree_leaves(target)))
  tx = optim.make_optimizer({'name': 'lars', 'lr': 0.5, 'trust_coefficient': 0.1, 'momentum': 0.5,
                             'weight_decay': 1e-4}, total_steps=50, global_batch_size=8)
  state, p = tx.init(params), params
  start = float(loss(p))
  for _ in range(30):
    updates, state = tx.update(jax.grad(loss)(p), state, p)
    p = optax.apply_updates(p, updates)
  assert float(loss(p)) < 0.1 * start


def test_adam_matches_optax_adam():
  params, grads = toy_params(), jax.tree_util.tree_map(lambda x: x * 0.3, toy_params())
  ours = one_update(optim.make_optimizer({'name': 'adam', 'lr': 0.1, 'b1': 0.8, 'b2': 0.99, 'eps': 1e-6},
                                         total_steps=10, global_batch_size=8), params, grads)
  ref = one_update(optax.adam(0.1, b1=0.8, b2=0.99, eps=1e-6), params, grads)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6),
                         ours, ref)


def test_config_errors_name_the_key():
  make = lambda cfg: optim.make_optimizer(cfg, total_steps=10, global_batch_size=8)
  with pytest.raises(ValueError, match="name='rmsprop'"):
    make({'name': 'rmsprop', 'lr': 0.1})
  with pytest.raises(ValueError, match='schedule'):
    make({'name': 'adam', 'lr': 0.1, 'schedule': 'step'})
  with pytest.raises(ValueError, match='lr_scaling'):
    make({'name': 'adam', 'lr': 0.1, 'lr_scaling': 'cube'})
  with pytest.raises(ValueError, match='learnin_rate'):
    make({'name': 'adam', 'lr': 0.1, 'learnin_rate': 3})
  with pytest.raises(ValueError, match='lr'):
    make({'name': 'adam'})


def test_freeze_subtree_zeroes_encoder_updates_only():
  params = {'encoder': {'Conv_0': {'kernel': jnp.ones((2, 2))}, 'bn': {'scale': jnp.ones(2)}},
            'head': {'Dense_0': {'kernel': jnp.ones((2, 1)), 'bias': jnp.ones(1)}}}
  grads = jax.tree_util.tree_map(lambda x: 0.5 * jnp.ones_like(x), params)
  tx = optim.freeze_subtree(
      optim.make_optimizer({'name': 'adamw', 'lr': 0.1, 'weight_decay': 0.1}, total_steps=10,
                           global_batch_size=8), 'encoder')
  updates = one_update(tx, params, grads)
  assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree_util.tree_leaves(updates['encoder']))
  assert all(float(jnp.abs(u).min()) > 0.0 for u in jax.tree_util.tree_leaves(updates['head']))
  with pytest.raises(ValueError, match="'backbone'"):
    one_update(optim.freeze_subtree(optax.sgd(0.1), 'backbone'), params, grads)


def test_default_config_block_builds_every_optimizer():
  """configs/common.py's optim block (all keys present, warm-up 0) is accepted as is."""
  block = ml_collections.ConfigDict(dict(
      name='adam', lr=0.1, lr_scaling='none', base_batch_size=256, schedule='constant', warmup_steps=0,
      warmup_fraction=0.0, end_lr_factor=0.0, weight_decay=0.0, b1=0.9, b2=0.999, momentum=0.9,
      trust_coefficient=0.001, grad_clip_norm=0.0))
  params = toy_params()
  for name in optim.OPTIMIZERS:
    block.name = name
    tx = optim.make_optimizer(block, total_steps=100, global_batch_size=392)
    assert jax.tree_util.tree_structure(one_update(tx, params, params)) == jax.tree_util.tree_structure(params)
  assert float(optim.make_schedule(block, 100, 392)(0)) == pytest.approx(0.1)
