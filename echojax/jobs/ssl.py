"""Self-supervised pretraining (SimCLR, MI-SimCLR, EchoCLR), top to bottom: mesh → input → model →
sharding → step → checkpoint → probe → loop. Resuming re-runs the same command on the same workdir: the
state comes from the latest checkpoint and the input stream is reseeded deterministically from the step."""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from echojax.core import optim, parallel, steps
from echojax.jobs import config_lib, startup
from echojax.models import factory
from echojax.jobs.checkpointing import Checkpointer, Preempted
from echojax.jobs.logging_lib import MetricLogger, NonFiniteLossError, log, metric_collection


def examples_per_epoch(meta: list[dict], pairing: str, pairs_per_study: str) -> int:
  """SimCLR: one sample per video. Multi-instance: every unordered pair of a study's videos (a
  single-video study counts once), or one per study with pairs_per_study='one'."""
  if pairing == 'simclr':
    return len(meta)
  counts: dict[str, int] = {}
  for m in meta:
    counts[m['study_id']] = counts.get(m['study_id'], 0) + 1
  if pairs_per_study == 'one':
    return len(counts)
  return sum(max(n * (n - 1) // 2, 1) for n in counts.values())


def train(cfg, workdir: str) -> dict:
  from clu import metrics as clu_metrics  # CLU pulls in TensorFlow: orchestration layer only
  from echojax.data import pipeline

  # --- mesh ---------------------------------------------------------------------------------------
  mesh, local_batch = startup.start_run(cfg, workdir)
  global_batch = cfg.train.global_batch_size
  config_lib.warn_if_paper_scale_on_cpu(cfg, jax.default_backend(), log)

  # --- input --------------------------------------------------------------------------------------
  builder = startup.prepare_dataset(cfg.data, log)
  meta = pipeline.read_video_metadata(builder, cfg.data.train_split)
  n_examples = examples_per_epoch(meta, cfg.ssl.pairing, cfg.data.pairs_per_study)
  total_steps, steps_per_epoch = config_lib.steps_from_duration(
      cfg.train, examples_per_epoch=n_examples, global_batch_size=global_batch)
  log(f'SSL {cfg.variant}: {cfg.ssl.pairing} pairs, frame_order={cfg.data.frame_order}, '
      f'{len(meta)} train videos → {n_examples} samples/epoch, {steps_per_epoch} steps/epoch, '
      f'{total_steps} steps, global batch {global_batch} on {mesh.size} device(s), '
      f'{jax.process_count()} process(es)')

  # --- model, optimiser, sharded state -----------------------------------------------------------
  num_order = math.factorial(cfg.data.clip_len) if cfg.data.frame_order else 0
  model = factory.ssl_model(**cfg.model, num_order_classes=num_order)
  tx = optim.make_optimizer(cfg.optim, total_steps=total_steps, global_batch_size=global_batch)
  sample = jnp.zeros((2, 2, cfg.data.clip_len, cfg.data.image_size, cfg.data.image_size, 1),
                     jnp.float32)
  state = steps.create_train_state(model, tx, jax.random.key(cfg.seed, impl='rbg'), sample)  # rbg: fast init compile
  state = jax.device_put(state, parallel.replicated(mesh))
  train_step = startup.jit_train_step(
      steps.make_ssl_train_step(model, tx, temperature=cfg.ssl.temperature,
                                order_weight=cfg.ssl.order_weight if cfg.data.frame_order else 0.0,
                                compute_dtype=jnp.dtype(cfg.model.dtype),
                                learning_rate_fn=optim.make_schedule(cfg.optim, total_steps, global_batch)),
      mesh)

  # --- checkpoint / resume ------------------------------------------------------------------------
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints,
                      save_every=cfg.train.checkpoint_every_steps)
  start_step = 0
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
    start_step = int(ckpt.latest_step())
    log(f'resumed from {ckpt.directory} at step {start_step}')

  # Reseeding from the step makes a resumed run deterministic given (seed, step) without storing
  # tf.data iterator state (shuffle buffers) in the checkpoint.
  ds = pipeline.make_dataset(builder, cfg.data.train_split, cfg.ssl.pairing, batch_size=local_batch,
                             cfg=cfg.data, seed=cfg.seed * 1_000_003 + start_step)
  batches = pipeline.as_numpy(ds)

  # --- evals: the linear probe --------------------------------------------------------------------
  def probe(step, state):
    from echojax.jobs import probe as probe_lib
    return probe_lib.linear_probe_auroc(cfg, builder, model, state, mesh)

  # --- loop ---------------------------------------------------------------------------------------
  logger = MetricLogger(workdir, total_steps, clips_per_step=2 * global_batch)
  logger.start(start_step)
  rng = jax.random.key(cfg.seed + 1)
  acc = None
  last = {}
  step = start_step
  stop_after = cfg.train.stop_after_steps
  try:
    while step < total_steps:
      host_batch = next(batches)
      batch = parallel.host_to_global(
          {k: v for k, v in host_batch.items() if k in ('views', 'order_label')}, mesh)
      state, metrics = train_step(state, batch, jax.random.fold_in(rng, step))
      step += 1
      if not bool(metrics['finite']):
        ckpt.wait()
        raise NonFiniteLossError(
            f'non-finite loss/gradient at step {step} (loss={float(metrics["loss"])}); the update was '
            f'not applied; last good checkpoint: step {ckpt.latest_step()} in {ckpt.directory}')
      update = metric_collection(clu_metrics, metrics).single_from_model_output(**metrics)
      acc = update if acc is None else acc.merge(update)
      if step % cfg.train.log_every_steps == 0 or step == total_steps:
        last = logger.write(step, acc.compute(), prefix='train/')
        acc = None
      if cfg.probe.every_steps > 0 and (step % cfg.probe.every_steps == 0 or step == total_steps):
        last.update(logger.write(step, probe(step, state), prefix='probe/'))
      ckpt.maybe_save(step, state, force=step == total_steps)
      if ckpt.should_stop(step):
        ckpt.maybe_save(step, state, force=True)
        ckpt.wait()
        raise Preempted(f'preempted at step {step}: checkpoint saved; rerun the same command to resume')
      if stop_after > 0 and step - start_step >= stop_after:
        ckpt.maybe_save(step, state, force=True)
        log(f'stopping at step {step} (checkpoint saved); rerun the same command to resume')
        break
  finally:
    ckpt.close()
    logger.close()
  return {'step': step, 'state': state, 'last_metrics': last, 'total_steps': total_steps}


run = train  # the job contract main.py dispatches to: run(cfg, workdir)
