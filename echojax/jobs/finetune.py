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
from echojax.jobs import preemption
from echojax.jobs.checkpointing import Checkpointer
from echojax.jobs.logging_lib import MetricLogger, log
from echojax.models import factory


def train(cfg, workdir: str) -> dict:
  from echojax.data import pipeline

  # --- mesh ---------------------------------------------------------------------------------------
  mesh, local_batch = startup.start_run(cfg, workdir)
  global_batch = cfg.train.global_batch_size

  # --- input: the label fraction is drawn over training studies ---------------------------------
  builder = startup.prepare_dataset(cfg.data, log)
  label_key = cfg.task.label_key
  task = evaluate_job.task_of(cfg, builder)
  tasks.check_early_stopping_metric(task, cfg.train.early_stopping_metric)
  meta = pipeline.read_video_metadata(builder, cfg.data.train_split)
  startup.check_clips_fit(cfg, meta)
  subset = tasks.training_subset(task, meta, cfg.frac, cfg.subset_seed, cfg.task.class_weighted)
  task = tasks.with_standardisation(task, subset['targets'], cfg.task.standardize_target)
  chosen, n_videos, pos_weight = subset['chosen'], subset['n_videos'], subset['pos_weight']
  if jax.process_index() == 0:  # evaluation, predict and a rebuilt model read the task from here
    tasks.update_state(workdir, **tasks.state_of(task), train_studies=len(chosen), train_videos=n_videos)
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
                                     compute_dtype=factory.resolve_dtype(cfg.model.dtype),
                                     learning_rate_fn=optim.make_schedule(cfg.optim, total_steps,
                                                                          global_batch),
                                     accumulate_steps=cfg.train.accumulate_steps, num_shards=mesh.size),
      mesh)

  # --- checkpoints: latest (resume) and best/ (the weights evaluation reads) ----------------------
  # A latest step holds the train state, the best weights so far and the early-stopping state in one
  # atomic save, so a resume continues exactly; early_stopping.json is a readable copy.
  ckpt = Checkpointer(workdir, keep=cfg.train.keep_checkpoints, save_every=steps_per_epoch)
  best_ckpt = Checkpointer(workdir, keep=1, subdir='best', async_save=False)
  stop_file = os.path.join(workdir, 'early_stopping.json')
  es = {'best': None, 'best_step': 0, 'bad_epochs': 0, 'history': [], 'stopped_early': False,
        'pending_validation': None}
  best = None   # best weights so far (copies: the step donates the state's buffers)
  start_step = 0
  restored = ckpt.restore_latest({'state': state, 'best': state_variables(state)})
  if restored is not None:
    start_step, items = restored
    state, best = items['state'], items.get('best')
    es.update(items.get('meta') or (json.load(open(stop_file)) if os.path.exists(stop_file) else {}))
    best_ckpt.discard_after(start_step)
    if best is not None and best_ckpt.latest_step() != es['best_step']:   # keep=1 lost it to that segment
      best_ckpt.save(es['best_step'], {'state': best}, overwrite=True)
    log(f'resumed from {ckpt.directory} at step {start_step} (best step {es["best_step"]}, '
        f'{es["bad_epochs"]} epoch(s) without improvement)')

  ds = pipeline.make_dataset(builder, cfg.data.train_split, 'finetune', batch_size=local_batch,
                             cfg=cfg.data, seed=cfg.seed * 1_000_003 + start_step,
                             study_ids=chosen, label_key=label_key)
  # Double-buffered: the next batch is copied to the devices while the current step runs.
  batches = parallel.prefetch_to_mesh(
      ({'video': h['video'], 'label': task.train_targets(h['label'])} for h in pipeline.as_numpy(ds)), mesh)

  # --- evals: validation loss/AUROC each epoch ----------------------------------------------------
  def validate(state) -> dict:
    pred = evaluate_job.predict_split(cfg, builder, model, state_variables(state), mesh,
                                      cfg.data.val_split)
    return evaluate_job.validation_metrics(pred, pos_weight, task)

  higher_is_better = cfg.train.early_stopping_metric == 'val_auroc'
  logger = MetricLogger(workdir, total_steps, log_every=cfg.train.log_every_steps, clips_per_step=global_batch,
                        checkpointer=ckpt)   # its guard is checked at log steps and before every save

  def items() -> dict:
    return {'state': state, **({'best': best} if best is not None else {})}

  def end_of_epoch(step) -> bool:
    """Validation → early-stopping state → best weights → checkpoint; True when training stops early."""
    nonlocal best
    logger.check_finite(step)   # best/ must never hold weights from after a non-finite step
    es['pending_validation'] = step
    try:
      val = validate(state)
    except preemption.Preempted:   # a notice during validation: save now, validate first on resume
      ckpt.preempt(step, items(), es)
    es['pending_validation'] = None
    logger.write(step, val, prefix='')
    score = val[cfg.train.early_stopping_metric]
    improved = es['best'] is None or (score > es['best'] if higher_is_better else score < es['best'])
    if improved and math.isfinite(score):
      es.update(best=float(score), best_step=step, bad_epochs=0)
      best = jax.tree.map(jnp.copy, state_variables(state))
      best_ckpt.save(step, {'state': best}, overwrite=True)
    else:
      es['bad_epochs'] += 1
    es['history'].append({'step': step, **{k: float(v) for k, v in val.items()}})
    es['stopped_early'] = es['bad_epochs'] >= cfg.train.patience
    ckpt.save(step, items(), es)
    if jax.process_index() == 0:
      with open(stop_file, 'w') as f:
        json.dump(es, f, indent=1)
    if es['stopped_early']:
      log(f'early stopping at step {step}: no {cfg.train.early_stopping_metric} improvement for '
          f'{cfg.train.patience} epochs; best step {es["best_step"]}')
    return es['stopped_early']

  logger.start(start_step)
  rng = jax.random.key(cfg.seed + 1)
  step, stopped_early = start_step, es['stopped_early']
  try:
    preemption.install()
    if es['pending_validation'] == step and not stopped_early:
      stopped_early = end_of_epoch(step)   # the validation a notice interrupted
    while step < total_steps and not stopped_early:
      batch = next(batches)
      state, metrics = train_step(state, batch, jax.random.fold_in(rng, step))
      step += 1
      logger.accumulate(metrics, step)
      if logger.due(step):
        logger.write_accumulated(step, prefix='train/')
      if step % steps_per_epoch == 0 or step == total_steps:
        stopped_early = end_of_epoch(step)
      if preemption.should_stop(step):
        ckpt.preempt(step, items(), es)
      if cfg.train.stop_after_steps > 0 and step - start_step >= cfg.train.stop_after_steps:
        ckpt.save(step, items(), es)
        log(f'stopping at step {step} (checkpoint saved); rerun the same command to resume')
        return {'step': step, 'interrupted': True}

    # --- best weights → final evaluation (a notice here exits; the rerun evaluates again) ----------
    if best is not None:
      log(f'best weights: step {es["best_step"]} ({cfg.train.early_stopping_metric} {es["best"]:.4g})')
    variables = best if best is not None else state_variables(state)
    reports = evaluate_job.evaluate_splits(cfg, builder, model, variables, mesh, workdir)
  finally:
    preemption.uninstall()
    ckpt.close()
    best_ckpt.close()
    logger.close()
    startup.end_run(workdir)
  return {'step': step, 'stopped_early': stopped_early, 'best': es, 'reports': reports,
          'pos_weight': pos_weight, 'train_studies': len(chosen)}


def state_variables(state) -> dict:
  return {'params': state.params, 'batch_stats': state.batch_stats}


run = train  # the job contract main.py dispatches to: run(cfg, workdir)
