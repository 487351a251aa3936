"""Chunked steps (echojax.core.gradcache): the gradient-cached SSL step and the gradient-accumulating
fine-tuning step equal their unchunked steps — loss, metrics, gradients, BatchNorm running statistics and
the updated parameters — in float64 on 1 and on 8 (simulated) devices, with remat, and over a short run."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echojax.core import gradcache, optim, parallel, steps
from echojax.models.heads import Classifier, SSLModel

TINY = {'width': 4, 'stage_depths': (1,), 'conv_impl': 'xla'}  # real ResNet3D code path, tiny compile
VIEW = (4, 16, 16, 1)


def ssl_model(dtype=jnp.float32, group=2, remat=False, order=True, **kwargs):
  return SSLModel(encoder={**TINY, 'dtype': dtype, 'remat': remat}, proj_hidden=8, proj_dim=8,
                  num_order_classes=24 if order else 0, bn_group_size=group, **kwargs)


def ssl_batch(pairs, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  return {'views': rng.uniform(size=(pairs, 2) + VIEW).astype(dtype),
          'order_label': rng.integers(0, 24, size=(pairs, 2)).astype(np.int32)}


def widened(tree, dtype):
  return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
                                tree)


def init_state(model, sample, dtype, tx=None):
  tx = tx or optim.make_optimizer({'name': 'sgd', 'lr': 0.1, 'momentum': 0.9}, total_steps=10,
                                  global_batch_size=8)
  state = steps.create_train_state(model, tx, jax.random.key(0), jnp.asarray(sample))
  # Running statistics away from their init, so the ghost-BN update is visible in the comparison.
  stats = jax.tree_util.tree_map(lambda x: x + 0.25, state.batch_stats)
  state = state.replace(params=widened(state.params, dtype), batch_stats=widened(stats, dtype))
  return state.replace(opt_state=tx.init(state.params))


def assert_trees_close(actual, expected, name, rtol):
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(jax.device_get(actual))
  flat_e, tree_e = jax.tree_util.tree_flatten(jax.device_get(expected))
  assert tree_a == tree_e, name
  for (path, a), e in zip(flat_a, flat_e):
    e = np.asarray(e, np.float64)
    np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=rtol * (np.abs(e).max() + 1e-30),
                               err_msg=f'{name}{jax.tree_util.keystr(path)}')


# ------------------------------------------------------------------------------------------- layout

def test_chunk_rows_keeps_each_device_on_its_own_rows():
  x = jnp.arange(12)
  chunks = gradcache.chunk_rows(x, chunks=3, num_shards=2)  # devices hold rows 0-5 and 6-11
  np.testing.assert_array_equal(chunks, [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]])
  assert gradcache.num_chunks(16, 2, 4) == 2
  with pytest.raises(ValueError, match='multiple of microbatch_size 3'):
    gradcache.num_chunks(16, 3, 4)


# ------------------------------------------------------------------------------------------- GradCache

@pytest.mark.parametrize('bn_mode,projection,remat,order,encoder_share', [
    ('global', 'paper', False, True, None),       # EchoCLR: NT-Xent + frame-order CE, BN over both views
    ('per_view', 'simclr_v2', True, False, None),  # the paper's per-view BN, BN in the head too, remat
    ('global', 'paper', False, True, 0.25),       # inside the frame-order-first curriculum's ramp
])
def test_gradcache_equals_unchunked_loss_and_gradients_float64(bn_mode, projection, remat, order,
                                                               encoder_share):
  with jax.enable_x64(True):
    model = ssl_model(jnp.float64, group=2, remat=remat, order=order, bn_mode=bn_mode, projection=projection)
    batch = {k: jnp.asarray(v) for k, v in ssl_batch(8, np.float64).items()}
    if encoder_share is not None:
      batch['contrastive_encoder_share'] = jnp.float64(encoder_share)
    state = init_state(model, batch['views'][:2], jnp.float64)
    rng = jax.random.key(3)
    loss_fn = steps.make_ssl_loss_fn(model, temperature=0.1, compute_dtype=jnp.float64)
    apply = steps._ssl_apply(model, jnp.float64)
    ref = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(state.params, state.batch_stats, batch, rng)
    chunked = jax.jit(lambda p, s, b, r: gradcache.ssl_value_and_grad(
        apply, p, s, b, r, temperature=0.1, order_weight=1.0, microbatch_size=2,
        contrastive_encoder_share=b.get('contrastive_encoder_share')))(state.params, state.batch_stats, batch, rng)
  (loss, (metrics, stats)), grads = ref
  (c_loss, (c_metrics, c_stats)), c_grads = chunked
  assert loss.dtype == jnp.float64 and set(c_metrics) == set(metrics)
  assert ('order_loss' in metrics) == order
  assert max(float(np.abs(g).max()) for g in jax.tree_util.tree_leaves(grads)) > 1e-3
  assert_trees_close(c_loss, loss, 'loss', 1e-12)
  assert_trees_close(c_metrics, metrics, 'metrics', 1e-12)
  assert_trees_close(c_grads, grads, 'grads', 1e-10)
  assert_trees_close(c_stats, stats, 'batch_stats', 1e-12)
  moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), stats,
                                 jax.device_get(state.batch_stats))
  assert max(jax.tree_util.tree_leaves(moved)) > 1e-3  # the running statistics really were updated


def sharded_ssl_step(mesh, model, state, batch, dtype, microbatch_size):
  """One jitted SSL train step with the trainers' shardings (state replicated, batch over 'data')."""
  step = steps.make_ssl_train_step(model, state.tx, temperature=0.1, compute_dtype=dtype,
                                   microbatch_size=microbatch_size, num_shards=mesh.size)
  repl = parallel.replicated(mesh)
  jitted = jax.jit(step, in_shardings=(repl, parallel.data_sharding(mesh), repl), out_shardings=(repl, repl))
  global_batch = parallel.host_to_global(batch, mesh)
  state = jax.device_put(state, repl)
  return jitted, (state, global_batch, jax.random.key(5))


def test_gradcache_on_8_devices_equals_unchunked_on_1_device_float64():
  with jax.enable_x64(True):
    model = ssl_model(jnp.float64, group=1)
    batch = ssl_batch(16, np.float64)
    state = init_state(model, batch['views'][:2], jnp.float64)
    one_step, one_args = sharded_ssl_step(parallel.make_mesh(devices=jax.devices()[:1]), model, state, batch,
                                          jnp.float64, 0)
    one_state, one_metrics = one_step(*one_args)
    eight_step, eight_args = sharded_ssl_step(parallel.make_mesh(), model, state, batch, jnp.float64, 1)
    compiled = eight_step.lower(*eight_args).compile()
    eight_state, eight_metrics = compiled(*eight_args)
    hlo = compiled.as_text()
  assert float(one_metrics['finite']) == 1.0 and int(eight_state.step) == 1
  assert_trees_close(eight_metrics, one_metrics, 'metrics', 1e-10)
  assert_trees_close(eight_state.params, one_state.params, 'params', 1e-10)
  assert_trees_close(eight_state.batch_stats, one_state.batch_stats, 'batch_stats', 1e-10)
  # Chunks are per device: the views are never gathered or exchanged between devices.
  assert 'all-to-all' not in hlo
  gathers = [line for line in hlo.splitlines() if 'all-gather(' in line and ',16,16,1]' in line]
  assert not gathers, gathers[:3]


def test_gradcache_short_run_losses_match_to_1e4():
  model = ssl_model(jnp.float32, group=2)
  tx = optim.make_optimizer({'name': 'adam', 'lr': 1e-2}, total_steps=10, global_batch_size=8)
  state = init_state(model, np.zeros((2, 2) + VIEW, np.float32), jnp.float32, tx)
  runs = {}
  for microbatch in (0, 2):
    step = jax.jit(steps.make_ssl_train_step(model, tx, temperature=0.1, microbatch_size=microbatch))
    s, losses = state, []
    for i in range(4):
      s, metrics = step(s, {k: jnp.asarray(v) for k, v in ssl_batch(8, seed=i).items()}, jax.random.key(i))
      losses.append(float(metrics['loss']))
    runs[microbatch] = losses
  assert runs[0][-1] < runs[0][0]  # it trains
  np.testing.assert_allclose(runs[2], runs[0], rtol=1e-4)


def test_gradcache_needs_bn_groups_inside_chunks_and_order_labels():
  tx = optim.make_optimizer({'name': 'sgd', 'lr': 0.1}, total_steps=10, global_batch_size=8)
  with pytest.raises(ValueError, match='set model.bn_group_size to a divisor of the per-device chunk'):
    steps.make_ssl_train_step(ssl_model(group=0), tx, temperature=0.1, microbatch_size=2)
  with pytest.raises(ValueError, match='bn_group_size=4'):
    steps.make_ssl_train_step(ssl_model(group=4), tx, temperature=0.1, microbatch_size=2)
  model = ssl_model(group=2)
  state = init_state(model, np.zeros((2, 2) + VIEW, np.float32), jnp.float32, tx)
  step = steps.make_ssl_train_step(model, tx, temperature=0.1, microbatch_size=2)
  with pytest.raises(KeyError, match='no order_label'):
    jax.eval_shape(step, state, {'views': jnp.zeros((4, 2) + VIEW)}, jax.random.key(0))
  with pytest.raises(ValueError, match='multiple of microbatch_size 2'):
    jax.eval_shape(step, state, {k: jnp.asarray(v) for k, v in ssl_batch(5).items()}, jax.random.key(0))


# ------------------------------------------------------------------------------- gradient accumulation

def finetune_batch(n, dtype):
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, size=n).astype(dtype)
  labels[[0, 1, 2]] = -1  # unknown labels and padding fall unevenly into the chunks
  mask = np.ones(n, dtype)
  mask[3] = 0
  return {'video': rng.uniform(size=(n,) + VIEW).astype(dtype), 'label': labels, 'mask': mask}


def finetune_step_outputs(mesh, accumulate_steps, group):
  model = Classifier(encoder_kwargs={**TINY, 'dtype': jnp.float64, 'bn_group_size': group}, dropout_rate=0.0)
  tx = optim.make_optimizer({'name': 'adam', 'lr': 1e-3}, total_steps=10, global_batch_size=16)
  batch = finetune_batch(16, np.float64)
  state = init_state(model, batch['video'][:2], jnp.float64, tx)
  step = steps.make_finetune_train_step(model, tx, pos_weight=2.0, compute_dtype=jnp.float64,
                                        accumulate_steps=accumulate_steps, num_shards=mesh.size)
  repl = parallel.replicated(mesh)
  jitted = jax.jit(step, in_shardings=(repl, parallel.data_sharding(mesh), repl), out_shardings=(repl, repl))
  new_state, metrics = jitted(jax.device_put(state, repl), parallel.host_to_global(batch, mesh),
                              jax.random.key(2))
  return jax.device_get((new_state, metrics))


def test_accumulation_equals_the_large_batch_float64_on_1_and_8_devices():
  with jax.enable_x64(True):
    one = parallel.make_mesh(devices=jax.devices()[:1])
    # 16 clips in 4 chunks of 4; ghost-BN groups of 4 clips in both steps.
    large_state, large = finetune_step_outputs(one, 1, group=4)
    acc_state, acc = finetune_step_outputs(one, 4, group=4)
    # 8 devices × 2 clips, 2 chunks of 1 clip per device: groups of 1 clip.
    large1_state, large1 = finetune_step_outputs(one, 1, group=1)
    acc8_state, acc8 = finetune_step_outputs(parallel.make_mesh(), 2, group=1)
  assert float(large['num_valid']) == 12.0 and float(acc['finite']) == 1.0
  pairs = (((acc_state, acc), (large_state, large), '1 dev'), ((acc8_state, acc8), (large1_state, large1), '8 dev'))
  for (state, metrics), (ref_state, ref_metrics), label in pairs:
    assert_trees_close(metrics, ref_metrics, f'{label} metrics', 1e-10)
    assert_trees_close(state.params, ref_state.params, f'{label} params', 1e-9)
    assert_trees_close(state.batch_stats, ref_state.batch_stats, f'{label} batch_stats', 1e-10)
    assert_trees_close(state.opt_state, ref_state.opt_state, f'{label} opt_state', 1e-9)


def test_accumulation_needs_bn_groups_inside_chunks():
  model = Classifier(encoder_kwargs={**TINY, 'bn_group_size': 0}, dropout_rate=0.0)
  tx = optim.make_optimizer({'name': 'sgd', 'lr': 0.1}, total_steps=10, global_batch_size=8)
  state = steps.create_train_state(model, tx, jax.random.key(0), jnp.zeros((2,) + VIEW))
  step = steps.make_finetune_train_step(model, tx, accumulate_steps=2)
  batch = {k: jnp.asarray(v) for k, v in finetune_batch(8, np.float32).items()}
  with pytest.raises(ValueError, match='train.accumulate_steps=2: BatchNorm statistics cannot span chunks'):
    jax.eval_shape(step, state, batch, jax.random.key(0))
