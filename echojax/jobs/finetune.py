"""Fine-tuning for study labels (severe AS by default; task.kind binary | multiclass | regression), top to
bottom: mesh → input (label fraction of training studies) → model (random | kinetics | ssl init) → sharding
→ step → checkpoint → validation with early stopping (best weights restored) → final evaluation reports for
the configured splits."""
from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from echojax.core import optim, parallel, steps
from echojax.jobs import evaluate as evaluate_job
from echojax.jobs import model_init, startup, tasks
from echojax.jobs.checkpointing import Checkpointer, Preempted
from echojax.jobs.logging_lib import MetricLogger, NonFiniteLossError, log, metric_collection


def train(cfg, workdir: str) -> dict:
  from clu import metrics as clu_metrics  # CLU pulls in TensorFlow: orchestration layer only
  from echojax.data import pipeline

  # --- mesh ---------------------------------------------------------------------------------------
  mesh, local_batch = startup.start_run(cfg, workdir)
  global_batch = cfg.train.global_batch_size

  # --- input: the label fraction is drawn over training studies ---------------------------------
  builder = startup.prepare_dataset(cfg.data, log)
  label_key = cfg.task.label_key
  task = tasks.task_from_config(cfg.task, builder)
  tasks.check_early_stopping_metric(task, cfg.train.early_stopping_metric)
  meta = pipeline.read_video_metadata(builder, cfg.data.train_split)
  subset = tasks.training_subset(task, meta, cfg.frac, cfg.subset_seed, cfg.task.class_weighted)
  task = tasks.with_standardisation(task, subset['targets'], cfg.task.standardize_target)
  chosen, n_videos, pos_weight = subset['chosen'], subset['n_videos'], subset['pos_weight']
  if jax.process_index() == 0:  # evaluation, predict and a rebuilt model read the task from here
    tasks.update_state(workdir, **tasks.state_of(task))
  steps_per_epoch = (cfg.train.steps_per_epoch if cfg.train.steps_per_epoch > 0
                     else max(n_videos // global_batch, 1))
  total_steps = (cfg.train.num_steps if cfg.train.num_steps > 0
                 else cfg.train.num_epochs * steps_per_epoch)
  log(f'fine-tune {task.name} ({task.kind}, {label_key}): init={cfg.init}, frac={cfg.frac} → '
      f'{len(chosen)}/{subset["n_studies"]} training studies ({subset["describe"]}), {n_videos} videos, '
      f'pos_weight={pos_weight:.3f}, '
      f'{steps_per_epoch} steps/epoch, ≤{total_steps} steps')

  # --- model, optimiser, init weights -------------------------------------------------------------
  model, init_variables, init_spec = model_init.classifier_with_init(cfg, log, task.num_outputs)
  if init_spec is not None and jax.process_index() == 0:
    with open(os.path.join(workdir, model_init.INIT_SPEC_FILE), 'w') as f:  # model rebuild needs it
      json.dump(init_spec, f, indent=1)
  tx = optim.make_optimizer(cfg.optim, total_steps=total_steps, global_batch_size=global_batch)
  if cfg.task.freeze_encoder:
    tx = optim.freeze_subtree(tx, 'encoder')
  sample = jnp.zeros((2, cfg.data.finetune_clip_len, cfg.data.image_size, cfg.data.image_size, 1))
  state = steps.create_train_state(model, tx, jax.random.key(cfg.seed, impl='rbg'), sample)  # rbg: fast init compile
  state = model_init.apply_encoder_init(state, init_variables)
  state = jax.device_put(state, parallel.replicated(mesh))
  train_step = startup.jit_train_step(
      steps.make_finetune_train_step(model, tx, pos_weight=pos_weight,
                                     label_smoothing=cfg.task.label_smoothing, task=task.kind,
                                     compute_dtype=jnp.dtype(cfg.model.dtype),
                                     learning_rate_fn=optim.make_schedule(cfg.optim, total_steps,
                                                                          global_batch)),
      mesh)

  # --- checkpoints: latest (resume) and best (early stopping) -------------------------------------
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints, save_every=steps_per_epoch)
  best_ckpt = Checkpointer(workdir, keep=1, subdir='best', async_save=False)
  stop_file = os.path.join(workdir, 'early_stopping.json')
  es = {'best': None, 'best_step': 0, 'bad_epochs': 0, 'history': []}
  start_step = 0
  if ckpt.latest_step() is not None:
    state = ckpt.restore(state)
    start_step = int(ckpt.latest_step())
    if os.path.exists(stop_file):
      es = json.load(open(stop_file))
    log(f'resumed from {ckpt.directory} at step {start_step}')

  ds = pipeline.make_dataset(builder, cfg.data.train_split, 'finetune', batch_size=local_batch,
                             cfg=cfg.data, seed=cfg.seed * 1_000_003 + start_step,
                             study_ids=chosen, label_key=label_key)
  batches = pipeline.as_numpy(ds)

  # --- evals: validation loss/AUROC each epoch ----------------------------------------------------
  def validate(state) -> dict:
    pred = evaluate_job.predict_split(cfg, builder, model, state_variables(state), mesh,
                                      cfg.data.val_split)
    return evaluate_job.validation_metrics(pred, pos_weight, task)

  higher_is_better = cfg.train.early_stopping_metric == 'val_auroc'
  logger = MetricLogger(workdir, total_steps, clips_per_step=global_batch)
  logger.start(start_step)
  rng = jax.random.key(cfg.seed + 1)
  acc, step, stopped_early = None, start_step, False
  try:
    while step < total_steps:
      host = next(batches)
      batch = parallel.host_to_global({'video': host['video'], 'label': task.train_targets(host['label'])},
                                      mesh)
      state, metrics = train_step(state, batch, jax.random.fold_in(rng, step))
      step += 1
      if not bool(metrics['finite']):
        raise NonFiniteLossError(f'non-finite loss/gradient at step {step}; last good checkpoint: '
                                 f'step {ckpt.latest_step()} in {ckpt.directory}')
      update = metric_collection(clu_metrics, metrics).single_from_model_output(**metrics)
      acc = update if acc is None else acc.merge(update)
      if step % cfg.train.log_every_steps == 0:
        logger.write(step, acc.compute(), prefix='train/')
        acc = None
      if step % steps_per_epoch == 0 or step == total_steps:
        val = validate(state)
        logger.write(step, val, prefix='')
        score = val[cfg.train.early_stopping_metric]
        improved = es['best'] is None or (score > es['best'] if higher_is_better else score < es['best'])
        if improved and math.isfinite(score):
          es.update(best=float(score), best_step=step, bad_epochs=0)
          best_ckpt.maybe_save(step, state, force=True)
        else:
          es['bad_epochs'] += 1
        es['history'].append({'step': step, **{k: float(v) for k, v in val.items()}})
        ckpt.maybe_save(step, state, force=True)
        if jax.process_index() == 0:
          json.dump(es, open(stop_file, 'w'), indent=1)
        if es['bad_epochs'] >= cfg.train.patience:
          log(f'early stopping at step {step}: no {cfg.train.early_stopping_metric} improvement for '
              f'{cfg.train.patience} epochs; best step {es["best_step"]}')
          stopped_early = True
          break
      if ckpt.should_stop(step):
        ckpt.maybe_save(step, state, force=True)
        ckpt.wait()
        raise Preempted(f'preempted at step {step}: checkpoint saved; rerun the same command to resume')
      if cfg.train.stop_after_steps > 0 and step - start_step >= cfg.train.stop_after_steps:
        ckpt.maybe_save(step, state, force=True)
        log(f'stopping at step {step} (checkpoint saved); rerun the same command to resume')
        return {'step': step, 'interrupted': True}
  finally:
    ckpt.close()
    logger.close()

  # --- best weights → final evaluation ------------------------------------------------------------
  if best_ckpt.latest_step() is not None:
    state = best_ckpt.restore(state)
    log(f'restored best weights from step {best_ckpt.latest_step()}')
  best_ckpt.close()
  reports = evaluate_job.evaluate_splits(cfg, builder, model, state_variables(state), mesh, workdir)
  return {'step': step, 'stopped_early': stopped_early, 'best': es, 'reports': reports,
          'pos_weight': pos_weight, 'train_studies': len(chosen)}


def state_variables(state) -> dict:
  return {'params': state.params, 'batch_stats': state.batch_stats}


run = train  # the job contract main.py dispatches to: run(cfg, workdir)
