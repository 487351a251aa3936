"""Tiny stand-in models (same output contract as echojax.models) and one SSL train step on a fixed global
batch; imported by the tests for the single-process reference and run as a script by test_multiprocess.py,
once per process: `python multiprocess_worker.py --process-id I --num-processes P --port N --out DIR`.
With `--train`: the trainers' loop contract (checkpoint every 2 steps, the job-wide stop notice, the peer
watchdog, the job exit codes of echojax.main.finish) on the tiny model, until stopped or killed.
"""
from __future__ import annotations

import argparse
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

GLOBAL_BATCH = 8
VIEW_SHAPE = (4, 8, 8, 1)  # T, H, W, C
NUM_ORDERS = 24


class TinyEncoder(nn.Module):
  """Conv3D → BatchNorm (global over the batch under jit) → ReLU → global average pool."""
  width: int = 4

  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Conv(self.width, (2, 3, 3), strides=(1, 2, 2), use_bias=False)(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
    return jnp.mean(nn.relu(x), axis=(1, 2, 3))


class TinySSLModel(nn.Module):
  """views (B,2,T,H,W,C) → embeddings (B,2,D), order_logits (B,2,K) when num_orders, features (B,2,F)."""
  embed_dim: int = 8
  num_orders: int = NUM_ORDERS

  @nn.compact
  def __call__(self, views, train: bool):
    b = views.shape[0]
    # Both views in one encoder call, so BatchNorm statistics are over all 2B clips.
    features = TinyEncoder()(views.reshape((b * 2,) + views.shape[2:]), train)
    hidden = nn.relu(nn.Dense(16, use_bias=False)(features))
    embeddings = nn.Dense(self.embed_dim, use_bias=False)(hidden)
    outputs = {'embeddings': embeddings.reshape(b, 2, -1), 'features': features.reshape(b, 2, -1)}
    if self.num_orders:
      outputs['order_logits'] = nn.Dense(self.num_orders)(features).reshape(b, 2, -1)
    return outputs


class TinyClassifier(nn.Module):
  """video (B,T,H,W,C) → logits (B, num_outputs); dropout on the logit as in the paper's head."""
  num_outputs: int = 1
  dropout_rate: float = 0.25

  @nn.compact
  def __call__(self, video, train: bool):
    logits = nn.Dense(self.num_outputs)(TinyEncoder()(video, train))
    return nn.Dropout(self.dropout_rate, deterministic=not train)(logits)


def fixed_ssl_batch(global_batch: int = GLOBAL_BATCH, seed: int = 0,
                    view_shape: tuple[int, ...] = VIEW_SHAPE) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {
      'views': rng.uniform(size=(global_batch, 2) + view_shape).astype(np.float32),
      'order_label': rng.integers(0, NUM_ORDERS, size=(global_batch, 2)).astype(np.int32),
      'video_id': np.array([f'v{i}' for i in range(global_batch)]),  # dropped by host_to_global
  }


def flat(tree) -> np.ndarray:
  return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree_util.tree_leaves(tree)])


def initial_state(model: nn.Module, view_shape: tuple[int, ...] = VIEW_SHAPE):
  """The model's TrainState (SGD, momentum 0.9: the first update is −0.1·grad) on the host, computed on one
  local device, so every process and every mesh starts from the same values."""
  from echojax.core import optim, steps

  tx = optim.make_optimizer({'name': 'sgd', 'lr': 0.1, 'momentum': 0.9}, total_steps=10,
                            global_batch_size=GLOBAL_BATCH)
  sample = jnp.zeros((2, 2) + tuple(view_shape), jnp.float32)
  with jax.default_device(jax.local_devices()[0]):
    state = jax.jit(lambda: steps.create_train_state(model, tx, jax.random.PRNGKey(0), sample))()
  return jax.device_get(state)


def ssl_step_outputs(mesh, local_batch: dict[str, np.ndarray], fsdp: bool = False,
                     model: nn.Module | None = None, host_state=None) -> dict[str, np.ndarray]:
  """Loss, flattened gradients, updated params and batch_stats of one jitted SSL step on `mesh`
  (fsdp: every parameter leaf split over 'data' where a dimension divides, instead of replicated).
  host_state: the model's `initial_state` (computed here when None)."""
  from echojax.core import parallel, steps

  model = model or TinySSLModel()
  if host_state is None:
    host_state = initial_state(model, local_batch['views'].shape[2:])
  tx = host_state.tx
  state_sharding = parallel.param_sharding(mesh, host_state, fsdp=fsdp, fsdp_min_size=1)
  # device_put of identical host values on every process is how the trainers place the state too.
  # Copies: on CPU device_put may alias numpy memory, and the step donates the state.
  state = jax.device_put(jax.tree_util.tree_map(np.array, host_state), state_sharding)

  batch = parallel.host_to_global(local_batch, mesh)
  batch_sharding = {key: parallel.data_sharding(mesh) for key in batch}
  rng = jax.random.PRNGKey(1)
  repl = parallel.replicated(mesh)

  loss_fn = steps.make_ssl_loss_fn(model, temperature=0.1, order_weight=1.0)
  train_step = steps.make_ssl_train_step(model, tx, temperature=0.1, order_weight=1.0)

  def grads_and_step(state, batch, rng):
    # One compiled program for both (the step's grads are internal): halves compile time in the tests.
    grads = jax.grad(lambda p: loss_fn(p, state.batch_stats, batch, jax.random.fold_in(rng, state.step))[0])(
        state.params)
    return (grads,) + train_step(state, batch, rng)

  grads, new_state, metrics = jax.jit(
      grads_and_step, in_shardings=(state_sharding, batch_sharding, repl),
      out_shardings=(state_sharding.params, state_sharding, repl), donate_argnums=(0,))(state, batch, rng)

  return {'loss': np.asarray(metrics['loss']), 'finite': np.asarray(metrics['finite']),
          'grads': flat(grads), 'params': flat(new_state.params),
          'batch_stats': flat(new_state.batch_stats), 'step': np.asarray(new_state.step)}


def inference_batches(process_id: int | None = None, local_batch: int = 4):
  """Eval-pipeline-shaped batches (video, mask, label, study_id, video_id) of 7 videos. process_id None: all
  of them in one list (the single-process reference); else that process's share — 5 videos in 2 batches
  for process 0 and 2 videos in 1 batch for process 1, so the processes hold different batch counts and
  masked padding rows."""
  rng = np.random.default_rng(7)
  videos = rng.normal(size=(7, 2, 3, 4, 4, 1)).astype(np.float32)  # (V, N clips, T, H, W, C) after batching
  ids = [(f'study{i // 3}', f'study{i // 3}_{i}') for i in range(7)]
  labels = np.array([i % 2 for i in range(7)], np.int32)
  shares = {None: [range(0, 4), range(4, 7)], 0: [range(0, 4), range(4, 5)], 1: [range(5, 7)]}[process_id]
  batches = []
  for rows in shares:
    rows = list(rows)
    pad = local_batch - len(rows)
    batches.append({
        'video': np.concatenate([videos[rows], np.zeros((pad,) + videos.shape[1:], np.float32)]),
        'mask': np.array([True] * len(rows) + [False] * pad),
        'label': np.concatenate([labels[rows], np.full(pad, -1, np.int32)]),
        'study_id': np.array([ids[r][0].encode() for r in rows] + [b''] * pad, object),
        'video_id': np.array([ids[r][1].encode() for r in rows] + [b''] * pad, object)})
  return batches


def inference_outputs(mesh, batches, num_local_batches: int | None = None) -> dict:
  """run_inference with a per-clip linear map: outputs (V, N), ids and labels of every process's rows."""
  from echojax.core import inference
  weights = jnp.arange(16, dtype=jnp.float32).reshape(4, 4, 1) / 16
  apply_fn = jax.jit(lambda x: jnp.einsum('bnthwc,hwc->bn', x, weights))
  return inference.run_inference(apply_fn, batches, mesh, num_local_batches=num_local_batches)


def train_until_stopped(args) -> None:
  """Prints `step N` after each completed step; exits like a job (echojax.main.finish)."""
  import time
  import ml_collections
  from echojax import main as echojax_main
  from echojax.core import parallel, steps
  from echojax.jobs import preemption, startup
  from echojax.jobs.checkpointing import Checkpointer
  from echojax.jobs.logging_lib import NonFiniteGuard

  cfg = ml_collections.ConfigDict({'distributed': {
      'mode': 'auto', 'coordinator_address': f'127.0.0.1:{args.port}', 'num_processes': args.num_processes,
      'process_id': args.process_id, 'peer_timeout_s': args.peer_timeout_s}})

  def job():
    startup.start_distributed(cfg)
    mesh = parallel.make_mesh()
    model = TinySSLModel()
    host_state = initial_state(model)
    state = jax.device_put(jax.tree_util.tree_map(np.array, host_state), parallel.replicated(mesh))
    train_step = startup.jit_train_step(steps.make_ssl_train_step(model, host_state.tx, temperature=0.1), mesh)
    rows = GLOBAL_BATCH // args.num_processes
    local = {k: v[args.process_id * rows:(args.process_id + 1) * rows] for k, v in fixed_ssl_batch().items()}
    ckpt = Checkpointer(args.out, keep=2, save_every=2)
    guard, step = NonFiniteGuard(), 0
    try:
      preemption.install()
      while True:
        state, metrics = train_step(state, parallel.host_to_global(local, mesh), jax.random.key(step))
        step += 1
        guard.update(metrics['finite'], step)
        assert guard.first() is None  # a host sync on a replicated global array: the step is done
        ckpt.maybe_save(step, {'state': state})
        print(f'step {step}', flush=True)
        if preemption.should_stop(step):
          ckpt.preempt(step, {'state': state})
        time.sleep(args.step_sleep_s)
    finally:
      preemption.uninstall()
      ckpt.close()

  echojax_main.finish(job)


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('--process-id', type=int, required=True)
  parser.add_argument('--num-processes', type=int, required=True)
  parser.add_argument('--port', type=int, required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--train', action='store_true', help='run the checkpointed loop until stopped')
  parser.add_argument('--peer-timeout-s', type=float, default=5.0)
  parser.add_argument('--step-sleep-s', type=float, default=0.2)
  args = parser.parse_args(argv)
  if args.train:
    return train_until_stopped(args)

  from echojax.core import parallel

  started = parallel.maybe_initialize_distributed({
      'coordinator_address': f'127.0.0.1:{args.port}', 'num_processes': args.num_processes,
      'process_id': args.process_id})
  assert started and jax.process_count() == args.num_processes, (started, jax.process_count())
  mesh = parallel.make_mesh()
  global_batch = fixed_ssl_batch()
  rows = GLOBAL_BATCH // args.num_processes
  mine = slice(args.process_id * rows, (args.process_id + 1) * rows)
  local = {key: value[mine] for key, value in global_batch.items()}
  outputs = ssl_step_outputs(mesh, local)
  outputs['num_global_devices'] = np.asarray(len(jax.devices()))
  outputs['num_local_devices'] = np.asarray(len(jax.local_devices()))
  mine = inference_batches(args.process_id)
  gathered = inference_outputs(mesh, mine, num_local_batches=len(mine))
  outputs.update({f'inference_{k}': np.asarray(v) for k, v in gathered.items()})
  np.savez(os.path.join(args.out, f'process_{args.process_id}.npz'), **outputs)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
