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
from echojax.jobs import preemption
from echojax.jobs.checkpointing import Checkpointer
from echojax.jobs.logging_lib import MetricLogger, log


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


def has_order_task(cfg) -> bool:
  """Frame order is a training task: frames shuffled (data.frame_order) and its loss weighted. With
  ssl.order_weight=0 the views are still shuffled but no order head exists (configs/ssl.py:echoclr_no_order)."""
  return bool(cfg.data.frame_order) and cfg.ssl.order_weight > 0


def curriculum(cfg) -> dict:
  """The frame-order-first curriculum's step counts. Without an order task (echoclr_no_order, the control)
  the same schedule applies: for order_only_steps only the projection head learns, so the control differs
  from EchoCLR by the order loss alone."""
  return dict(order_only_steps=cfg.ssl.order_only_steps, contrastive_warmup_steps=cfg.ssl.contrastive_warmup_steps)


def train(cfg, workdir: str) -> dict:
  from echojax.data import pipeline

  # --- mesh ---------------------------------------------------------------------------------------
  mesh, local_batch = startup.start_run(cfg, workdir)
  global_batch = cfg.train.global_batch_size
  config_lib.warn_if_paper_scale_on_cpu(cfg, jax.default_backend(), log)

  # --- input --------------------------------------------------------------------------------------
  builder = startup.prepare_dataset(cfg.data, log)
  meta = pipeline.read_video_metadata(builder, cfg.data.train_split)
  startup.check_clips_fit(cfg, meta)
  n_examples = examples_per_epoch(meta, cfg.ssl.pairing, cfg.data.pairs_per_study)
  total_steps, steps_per_epoch = config_lib.steps_from_duration(
      cfg.train, examples_per_epoch=n_examples, global_batch_size=global_batch)
  log(f'SSL {cfg.variant}: {cfg.ssl.pairing} pairs, frame_order={cfg.data.frame_order}, '
      f'{len(meta)} train videos → {n_examples} samples/epoch, {steps_per_epoch} steps/epoch, '
      f'{total_steps} steps, global batch {global_batch} on {mesh.size} device(s), '
      f'{jax.process_count()} process(es)')

  # --- model, optimiser, sharded state -----------------------------------------------------------
  num_order = math.factorial(cfg.data.clip_len) if has_order_task(cfg) else 0
  model = factory.ssl_model(**cfg.model, num_order_classes=num_order,
                            gradient_balance=cfg.ssl.get('gradient_balance', 'none'))
  tx = optim.make_optimizer(cfg.optim, total_steps=total_steps, global_batch_size=global_batch)
  if cfg.ssl.get('freeze_stem', False):   # the stem's (motion) filters stay at their init (README "Pretraining")
    tx = optim.freeze_subtree(tx, 'stem_conv')
  sample = jnp.zeros((2, 2, cfg.data.clip_len, cfg.data.image_size, cfg.data.image_size, 1),
                     jnp.float32)
  state = steps.create_train_state(model, tx, jax.random.key(cfg.seed, impl='rbg'), sample)  # rbg: fast init compile
  state = jax.device_put(state, parallel.replicated(mesh))
  train_step = startup.jit_train_step(
      steps.make_ssl_train_step(model, tx, temperature=cfg.ssl.temperature,
                                order_weight=cfg.ssl.order_weight if has_order_task(cfg) else 0.0,
                                compute_dtype=factory.resolve_dtype(cfg.model.dtype),
                                learning_rate_fn=optim.make_schedule(cfg.optim, total_steps, global_batch),
                                microbatch_size=cfg.train.microbatch_size, num_shards=mesh.size,
                                order_input=cfg.ssl.get('order_input', 'shared'),
                                **curriculum(cfg)),
      mesh)

  # --- checkpoint / resume ------------------------------------------------------------------------
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints,
                      save_every=cfg.train.checkpoint_every_steps)
  start_step = 0
  restored = ckpt.restore_latest({'state': state})   # falls back past unreadable steps
  if restored is not None:
    start_step, state = restored[0], restored[1]['state']
    log(f'resumed from {ckpt.directory} at step {start_step}')

  # Reseeding from the step makes a resumed run deterministic given (seed, step) without storing
  # tf.data iterator state (shuffle buffers) in the checkpoint.
  ds = pipeline.make_dataset(builder, cfg.data.train_split, cfg.ssl.pairing, batch_size=local_batch,
                             cfg=cfg.data, seed=cfg.seed * 1_000_003 + start_step)
  # Double-buffered: the next batch is copied to the devices while the current step runs.
  batches = parallel.prefetch_to_mesh(
      ({k: v for k, v in b.items() if k in ('views', 'order_label')} for b in pipeline.as_numpy(ds)), mesh)

  # --- evals: the linear probe --------------------------------------------------------------------
  def probe(step, state):
    from echojax.jobs import probe as probe_lib
    return probe_lib.linear_probe_auroc(cfg, builder, model, state, mesh)

  # --- loop ---------------------------------------------------------------------------------------
  # The logger checks the on-device non-finite guard at log steps and before every save (no per-step sync).
  logger = MetricLogger(workdir, total_steps, log_every=cfg.train.log_every_steps,
                        clips_per_step=2 * global_batch, checkpointer=ckpt)
  logger.start(start_step)
  rng = jax.random.key(cfg.seed + 1)
  last = {}
  step = start_step
  stop_after = cfg.train.stop_after_steps
  try:
    preemption.install()
    while step < total_steps:
      batch = next(batches)
      state, metrics = train_step(state, batch, jax.random.fold_in(rng, step))
      step += 1
      logger.accumulate(metrics, step)
      if logger.due(step):
        last = logger.write_accumulated(step, prefix='train/')
      if cfg.probe.every_steps > 0 and (step % cfg.probe.every_steps == 0 or step == total_steps):
        try:
          last.update(logger.write(step, probe(step, state), prefix='probe/'))
        except preemption.Preempted:  # a notice during the probe: skip it, save below and exit
          pass
      ckpt.maybe_save(step, {'state': state}, force=step == total_steps)
      if preemption.should_stop(step):
        ckpt.preempt(step, {'state': state})
      if stop_after > 0 and step - start_step >= stop_after:
        ckpt.maybe_save(step, {'state': state}, force=True)
        log(f'stopping at step {step} (checkpoint saved); rerun the same command to resume')
        break
  finally:
    preemption.uninstall()
    ckpt.close()
    logger.close()
    startup.end_run(workdir)
  return {'step': step, 'state': state, 'last_metrics': last, 'total_steps': total_steps}


run = train  # the job contract main.py dispatches to: run(cfg, workdir)
