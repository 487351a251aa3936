"""echojax.parallel and echojax.steps: mesh/sharding helpers, and train/eval steps that give the same loss,
gradients, parameters and global BatchNorm statistics on 8 sharded devices as on 1 device."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from echojax.core import optim, parallel, steps

from tests import multiprocess_worker as standins  # noqa: E402  (tiny stand-in models shared with the worker)


def one_device_mesh():
  return parallel.make_mesh(devices=jax.devices()[:1])


def assert_close(actual, expected, name, rtol=1e-5, atol=1e-6):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=rtol, atol=atol, err_msg=name)


def assert_trees_close(actual, expected, name, rtol=1e-5, atol=1e-6):
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
  flat_e, tree_e = jax.tree_util.tree_flatten(expected)
  assert tree_a == tree_e, name
  for (path, a), e in zip(flat_a, flat_e):
    assert_close(a, e, f'{name}{jax.tree_util.keystr(path)}', rtol, atol)


# ---------------------------------------------------------------------------------------------- helpers

def test_make_mesh_spans_all_devices():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ('data',) and mesh.devices.size == len(jax.devices()) == 8
  assert parallel.make_mesh(num_devices=2).devices.size == 2
  assert list(one_device_mesh().devices.flat) == jax.devices()[:1]
  with pytest.raises(ValueError, match='num_devices=9'):
    parallel.make_mesh(num_devices=9)
  assert parallel.data_sharding(mesh).spec == P('data')
  assert parallel.replicated(mesh).spec == P()


def test_global_batch_check():
  mesh = parallel.make_mesh()
  parallel.global_batch_check(16, mesh)
  with pytest.raises(ValueError, match='global batch size 12 .* device count 8'):
    parallel.global_batch_check(12, mesh)
  with pytest.raises(ValueError, match='global batch size 0'):
    parallel.global_batch_check(0, mesh)


def test_host_to_global_shards_numeric_entries_and_drops_strings():
  mesh = parallel.make_mesh()
  batch = {'video': np.arange(16 * 3, dtype=np.uint8).reshape(16, 3), 'label': np.arange(16.0),
           'video_id': np.array([f'id{i}' for i in range(16)]), 'note': np.array(['x'] * 16, dtype=object)}
  out = parallel.host_to_global(batch, mesh)
  assert set(out) == {'video', 'label'}  # strings / objects dropped (documented)
  assert out['video'].dtype == np.uint8 and out['video'].shape == (16, 3)
  assert out['video'].sharding.spec == P('data')
  assert len(out['video'].addressable_shards) == 8
  assert out['video'].addressable_shards[1].data.shape == (2, 3)
  np.testing.assert_array_equal(np.asarray(out['label']), batch['label'])
  with pytest.raises(ValueError, match="'label' has local batch 12"):
    parallel.host_to_global({'label': np.zeros(12)}, mesh)
  with pytest.raises(ValueError, match="'step' is a scalar"):
    parallel.host_to_global({'step': np.int32(3)}, mesh)


def test_prefetch_to_mesh_keeps_order_and_transfers_ahead():
  mesh = parallel.make_mesh()
  reads = []

  def source():
    for i in range(5):
      reads.append(i)
      yield {'views': np.full((8, 2), i, np.float32), 'video_id': np.array([f'v{i}'] * 8)}

  stream = parallel.prefetch_to_mesh(source(), mesh, size=2, keys=('views',))
  first = next(stream)
  assert reads == [0, 1]  # batch 1 was transferred before anyone asked for it
  assert set(first) == {'views'} and first['views'].sharding.spec == P('data')
  second = next(stream)  # asking for batch 1 starts batch 2's transfer
  assert reads == [0, 1, 2] and float(second['views'][0, 0]) == 1.0
  assert [float(b['views'][0, 0]) for b in stream] == [2.0, 3.0, 4.0]
  np.testing.assert_array_equal(np.asarray(first['views']), np.zeros((8, 2)))
  with pytest.raises(ValueError, match='size must be >= 1'):
    next(parallel.prefetch_to_mesh(source(), mesh, size=0))


def test_param_sharding_replicated_and_fsdp():
  mesh = parallel.make_mesh()
  params = {'big': jnp.zeros((3, 64, 128)), 'odd': jnp.zeros((2**15 + 1,)), 'small': jnp.zeros((16,)),
            'scalar': jnp.zeros(())}
  assert all(s.spec == P() for s in jax.tree_util.tree_leaves(parallel.param_sharding(mesh, params)))
  fsdp = parallel.param_sharding(mesh, params, fsdp=True)
  assert fsdp['big'].spec == P(None, None, 'data')
  assert fsdp['odd'].spec == P() and fsdp['small'].spec == P() and fsdp['scalar'].spec == P()
  assert parallel.param_sharding(mesh, params, fsdp=True, fsdp_min_size=1)['small'].spec == P('data')


def test_maybe_initialize_distributed_only_when_asked(monkeypatch):
  for key in list(os.environ):
    if key.startswith(('JAX_COORDINATOR', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'SLURM_', 'OMPI_')):
      monkeypatch.delenv(key)
  assert parallel.maybe_initialize_distributed(None) is False
  assert parallel.maybe_initialize_distributed({}) is False
  # configs/common.py's default block: mode 'auto' with unset sentinels, on a plain machine → no start.
  default_block = {'mode': 'auto', 'coordinator_address': '', 'num_processes': 0, 'process_id': -1}
  assert parallel.maybe_initialize_distributed(default_block) is False
  assert parallel.maybe_initialize_distributed({'distributed': 'off'}) is False
  with pytest.raises(ValueError, match="mode='sometimes'"):
    parallel.maybe_initialize_distributed({'mode': 'sometimes'})
  with pytest.raises(ValueError, match='num_processes is not set'):
    parallel.maybe_initialize_distributed({**default_block, 'coordinator_address': '127.0.0.1:1234',
                                           'process_id': 0})
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', '127.0.0.1:1234')
  with pytest.raises(ValueError, match='JAX_NUM_PROCESSES is not set'):
    parallel.maybe_initialize_distributed(default_block)
  assert parallel.maybe_initialize_distributed({'mode': 'off'}) is False
  assert not jax.distributed.is_initialized()


def test_cluster_detection_for_auto_mode(monkeypatch):
  for key in list(os.environ):
    if key.startswith(('SLURM_', 'OMPI_')):
      monkeypatch.delenv(key)
  assert parallel._detected_cluster() is None
  slurm = {'SLURM_JOB_ID': '42', 'SLURM_STEP_NODELIST': 'node001', 'SLURM_NTASKS': '1', 'SLURM_PROCID': '0',
           'SLURM_LOCALID': '0'}
  for key, value in slurm.items():
    monkeypatch.setenv(key, value)
  assert parallel._detected_cluster() is None  # a single-task job needs no coordination
  monkeypatch.setenv('SLURM_NTASKS', '4')
  assert parallel._detected_cluster() == 'SlurmCluster'


# ------------------------------------------------------------------------------- sharded == unsharded

def assert_outputs_match(actual, expected, label, rtol=1e-5):
  """Elementwise rtol, with an absolute floor of rtol × the largest |value| (accumulation-order noise on
  near-zero entries of a sharded reduction)."""
  for name in ('loss', 'grads', 'params', 'batch_stats', 'step', 'finite'):
    scale = float(np.abs(expected[name]).max())
    assert_close(actual[name], expected[name], f'{label}: {name}', rtol=rtol, atol=rtol * scale + 1e-7)


def test_ssl_step_8_devices_equals_1_device():
  batch = standins.fixed_ssl_batch()
  host_state = standins.initial_state(standins.TinySSLModel())
  one = standins.ssl_step_outputs(one_device_mesh(), batch, host_state=host_state)
  eight = standins.ssl_step_outputs(parallel.make_mesh(), batch, host_state=host_state)
  fsdp = standins.ssl_step_outputs(parallel.make_mesh(), batch, fsdp=True, host_state=host_state)
  assert float(one['finite']) == 1.0 and int(one['step']) == 1
  assert np.abs(one['grads']).max() > 1e-3  # the comparison is not between zeros
  # SGD's first step is params − 0.1·grads: the parameters checked below carry the gradients too.
  np.testing.assert_allclose(one['params'], standins.flat(host_state.params) - 0.1 * one['grads'],
                             rtol=1e-5, atol=1e-6)
  assert_outputs_match(eight, one, '8 devices')
  assert_outputs_match(fsdp, one, '8 devices FSDP')
  # Global BN: with one example per device, per-device statistics would differ from the 1-device ones.
  assert np.abs(one['batch_stats'] - standins.flat(host_state.batch_stats)).max() > 1e-3


@pytest.mark.slow
def test_ssl_step_with_tiny_resnet3d_8_devices_equals_1_device():
  models = pytest.importorskip('echojax.models')
  model = models.SSLModel(encoder={'width': 4, 'stage_depths': (1, 1, 1, 1), 'conv_impl': 'xla'},
                          proj_hidden=8, proj_dim=8, num_order_classes=24)
  view_shape = (4, 16, 16, 1)
  batch = standins.fixed_ssl_batch(view_shape=view_shape)
  host_state = standins.initial_state(model, view_shape)
  one = standins.ssl_step_outputs(one_device_mesh(), batch, model=model, host_state=host_state)
  eight = standins.ssl_step_outputs(parallel.make_mesh(), batch, model=model, host_state=host_state)
  assert float(one['finite']) == 1.0 and np.abs(one['grads']).max() > 1e-3
  assert_outputs_match(eight, one, 'ResNet3D 8 devices')


def finetune_batch(batch_size=8, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, size=batch_size).astype(np.float32)
  labels[1] = -1  # unknown label: left out of the loss
  mask = np.ones(batch_size, np.float32)
  mask[-1] = 0  # padding row
  return {'video': rng.uniform(size=(batch_size,) + standins.VIEW_SHAPE).astype(np.float32),
          'label': labels, 'mask': mask}


def finetune_step_outputs(mesh, batch, pos_weight=2.5):
  model = standins.TinyClassifier(num_outputs=1, dropout_rate=0.25)
  tx = optim.make_optimizer({'name': 'sgd', 'lr': 0.1, 'momentum': 0.9}, total_steps=10, global_batch_size=8)
  init = lambda: steps.create_train_state(model, tx, jax.random.PRNGKey(0),
                                          jnp.zeros((2,) + standins.VIEW_SHAPE))
  state_sharding = parallel.param_sharding(mesh, jax.eval_shape(init))
  state = jax.jit(init, out_shardings=state_sharding)()
  global_batch = parallel.host_to_global(batch, mesh)
  batch_sharding = {key: parallel.data_sharding(mesh) for key in global_batch}
  repl = parallel.replicated(mesh)
  rng = jax.random.PRNGKey(3)
  loss_fn = steps.make_finetune_loss_fn(model, pos_weight=pos_weight)
  train_step = steps.make_finetune_train_step(model, tx, pos_weight=pos_weight)

  def grads_and_step(state, batch, rng):
    grads = jax.grad(lambda p: loss_fn(p, state.batch_stats, batch, jax.random.fold_in(rng, state.step))[0])(
        state.params)
    return (grads,) + train_step(state, batch, rng)

  grads, new_state, metrics = jax.jit(
      grads_and_step, in_shardings=(state_sharding, batch_sharding, repl),
      out_shardings=(state_sharding.params, state_sharding, repl), donate_argnums=(0,))(state, global_batch, rng)
  return jax.device_get((grads, new_state.params, new_state.batch_stats, metrics))


def test_finetune_step_8_devices_equals_1_device_with_dropout_and_mask():
  batch = finetune_batch()
  grads1, params1, stats1, metrics1 = finetune_step_outputs(one_device_mesh(), batch)
  grads8, params8, stats8, metrics8 = finetune_step_outputs(parallel.make_mesh(), batch)
  assert float(metrics1['finite']) == 1.0 and float(metrics1['num_valid']) == 6.0
  assert set(metrics1) == set(steps.FINETUNE_METRIC_NAMES) | {'finite'}
  assert np.abs(grads1['Dense_0']['kernel']).max() > 1e-4
  assert_trees_close(grads8, grads1, 'grads')
  assert_trees_close(params8, params1, 'params')
  assert_trees_close(stats8, stats1, 'batch_stats')
  assert_trees_close(metrics8, metrics1, 'metrics')


def test_finetune_loss_is_weighted_bce_over_valid_rows_and_dropout_is_on():
  model = standins.TinyClassifier(num_outputs=1, dropout_rate=0.25)
  tx = optim.make_optimizer({'name': 'adam', 'lr': 1e-4}, total_steps=10, global_batch_size=8)
  state = steps.create_train_state(model, tx, jax.random.PRNGKey(0), jnp.zeros((2,) + standins.VIEW_SHAPE))
  batch = {k: jnp.asarray(v) for k, v in finetune_batch().items()}
  loss_fn = steps.make_finetune_loss_fn(model, pos_weight=2.5)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  rng = jax.random.PRNGKey(5)
  loss, (metrics, _) = jax.jit(loss_fn)(state.params, state.batch_stats, batch, rng)
  logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                                               rngs={'dropout': rng}))(variables, batch['video'])
  x, y = np.asarray(logits[:, 0], np.float64), np.asarray(batch['label'], np.float64)
  valid = (y >= 0) & (np.asarray(batch['mask']) > 0)
  per_row = 2.5 * y * np.log1p(np.exp(-x)) + (1 - y) * np.log1p(np.exp(x))
  assert_close(loss, per_row[valid].mean(), 'finetune loss')
  assert_close(metrics['accuracy'], np.mean((x[valid] > 0) == (y[valid] > 0.5)), 'accuracy')
  assert np.sum(np.asarray(logits) == 0) >= 1  # dropout (p=0.25 on 8 logits, fixed key) zeroed some


def test_eval_step_multi_clip_matches_per_clip_and_sharded():
  model = standins.TinyClassifier(num_outputs=1)
  tx = optim.make_optimizer({'name': 'adam', 'lr': 1e-4}, total_steps=10, global_batch_size=8)
  state = steps.create_train_state(model, tx, jax.random.PRNGKey(0), jnp.zeros((2,) + standins.VIEW_SHAPE))
  # Non-trivial running statistics, so eval mode (running averages) differs from batch statistics.
  state = state.replace(batch_stats=jax.tree_util.tree_map(lambda x: x + 0.3, state.batch_stats))
  rng = np.random.default_rng(1)
  video = rng.uniform(size=(8, 3) + standins.VIEW_SHAPE).astype(np.float32)
  labels = np.array([1, 0, 1, 1, 0, 0, -1, 1], np.float32)
  eval_step = steps.make_eval_step(model, pos_weight=2.0)
  out = jax.jit(eval_step)(state, {'video': video, 'label': labels})
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  per_clip = np.stack([np.asarray(model.apply(variables, video[:, i], train=False))[:, 0] for i in range(3)], 1)
  assert out['logits'].shape == (8, 3)
  assert_close(out['logits'], per_clip, 'multi-clip logits')
  valid = labels >= 0
  x, y = per_clip[valid].astype(np.float64), np.repeat(labels[valid, None], 3, 1)
  assert_close(out['loss'], np.mean(2.0 * y * np.log1p(np.exp(-x)) + (1 - y) * np.log1p(np.exp(x))), 'eval loss')
  assert float(out['num_valid']) == 7.0
  single = eval_step(state, {'video': video[:, 0]})
  assert set(single) == {'logits'} and single['logits'].shape == (8,)
  assert_close(single['logits'], per_clip[:, 0], 'single clip')

  mesh = parallel.make_mesh()
  batch = parallel.host_to_global({'video': video, 'label': labels}, mesh)
  sharded = jax.jit(eval_step, in_shardings=(parallel.replicated(mesh), parallel.data_sharding(mesh)))(
      jax.device_put(state, parallel.replicated(mesh)), batch)
  assert_trees_close(sharded, jax.device_get(out), 'sharded eval')


# ----------------------------------------------------------------------------------- guards and dtypes

def ssl_state_and_step(compute_dtype=jnp.float32):
  model = standins.TinySSLModel()
  tx = optim.make_optimizer({'name': 'adam', 'lr': 0.1}, total_steps=10, global_batch_size=8)
  schedule = optim.make_schedule({'lr': 0.1}, 10, 8)
  # New-style typed keys (jax.random.key), as the trainers use.
  state = steps.create_train_state(model, tx, jax.random.key(0), jnp.zeros((2, 2) + standins.VIEW_SHAPE))
  step = jax.jit(steps.make_ssl_train_step(model, tx, temperature=0.05, order_weight=1.0,
                                           compute_dtype=compute_dtype, learning_rate_fn=schedule))
  return state, step


def test_nan_batch_leaves_state_unchanged_and_reports_not_finite():
  state, step = ssl_state_and_step()
  batch = {k: jnp.asarray(v) for k, v in standins.fixed_ssl_batch().items() if k != 'video_id'}
  before = jax.device_get(state)
  good_state, good_metrics = step(state, batch, jax.random.key(0))
  assert float(good_metrics['finite']) == 1.0 and int(good_state.step) == 1
  assert float(good_metrics['learning_rate']) == pytest.approx(0.1)
  assert set(good_metrics) == set(steps.ssl_metric_names(frame_order=True)) | {'finite', 'learning_rate'}
  assert not np.allclose(np.asarray(good_state.params['Dense_0']['kernel']), before.params['Dense_0']['kernel'])

  nan_batch = dict(batch, views=batch['views'].at[0, 0, 0, 0, 0, 0].set(jnp.nan))
  bad_state, bad_metrics = step(state, nan_batch, jax.random.key(0))
  assert float(bad_metrics['finite']) == 0.0
  assert int(bad_state.step) == 0
  for name, tree in (('params', before.params), ('batch_stats', before.batch_stats),
                     ('opt_state', before.opt_state)):
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b), name),
                           getattr(bad_state, name), tree)


def test_bf16_compute_keeps_float32_params_and_loss():
  state, step = ssl_state_and_step(jnp.bfloat16)
  batch = {k: jnp.asarray(v) for k, v in standins.fixed_ssl_batch().items() if k != 'video_id'}
  new_state, metrics = step(state, batch, jax.random.PRNGKey(0))
  assert float(metrics['finite']) == 1.0 and metrics['loss'].dtype == jnp.float32
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(new_state.params))


def test_integer_video_is_rejected():
  state, step = ssl_state_and_step()
  with pytest.raises(TypeError, match="batch\\['views'\\] must be floating point"):
    step(state, {'views': jnp.zeros((8, 2) + standins.VIEW_SHAPE, jnp.uint8),
                 'order_label': jnp.zeros((8, 2), jnp.int32)}, jax.random.PRNGKey(0))


def test_pure_jax_modules_import_without_tensorflow_sklearn_or_clu():
  code = ('import sys; import echojax.core.losses, echojax.core.optim, echojax.core.parallel, echojax.core.steps; '
          'bad = [m for m in ("tensorflow", "sklearn", "clu", "tensorflow_datasets") if m in sys.modules]; '
          'assert not bad, bad')
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  result = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
