"""Pure train/eval step functions and the TrainState they update (SSL pretraining, fine-tuning, evaluation).

The trainer jit-compiles these with in/out shardings and donate_argnums; nothing here knows about devices,
so a step gives the same result on one device or sharded over many. A step whose loss or gradients are not
finite returns the state unchanged and metrics['finite'] = 0.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from echojax import losses

TASKS = ('binary', 'multiclass')
Metrics = dict[str, jax.Array]
# Keys every SSL / fine-tune train step returns (besides 'finite', and 'learning_rate' when asked for).
SSL_METRIC_NAMES = ('loss', 'nt_xent', 'contrastive_acc', 'grad_norm')
SSL_ORDER_METRIC_NAMES = ('order_loss', 'order_acc')  # only when the model has a frame-order head
FINETUNE_METRIC_NAMES = ('loss', 'accuracy', 'num_valid', 'grad_norm')


def ssl_metric_names(frame_order: bool) -> tuple[str, ...]:
  """The SSL step's averaged metrics for a model with (True) or without (False) a frame-order head."""
  return SSL_METRIC_NAMES + (SSL_ORDER_METRIC_NAMES if frame_order else ())


class TrainState(train_state.TrainState):
  """flax TrainState (step, params, opt_state; static apply_fn, tx) plus BatchNorm running statistics."""
  batch_stats: Any = None


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, rng: jax.Array,
                       sample_input: jax.Array, init_kwargs: Mapping[str, Any] | None = None) -> TrainState:
  """Initialise the model's variables on `sample_input` (train=False unless init_kwargs says otherwise)."""
  params_rng, dropout_rng = jax.random.split(rng)
  variables = model.init({'params': params_rng, 'dropout': dropout_rng}, sample_input,
                         **{'train': False, **dict(init_kwargs or {})})
  return TrainState.create(apply_fn=model.apply, params=variables['params'], tx=tx,
                           batch_stats=variables.get('batch_stats', {}))


def _all_finite(*trees) -> jax.Array:
  leaves = [leaf for tree in trees for leaf in jax.tree_util.tree_leaves(tree)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def _float_input(x: jax.Array, name: str, compute_dtype) -> jax.Array:
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f'batch[{name!r}] must be floating point (scaled to [0, 1] by the input pipeline), '
                    f'got {x.dtype}')
  return x.astype(compute_dtype)


def _to_float32(tree):
  return jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), tree)


def _guarded_update(state: TrainState, tx: optax.GradientTransformation, grads, new_batch_stats, loss,
                    metrics: Metrics, learning_rate_fn: Callable | None):
  """Apply the update only if loss and gradients are finite; otherwise keep every field of the old state."""
  finite = _all_finite(loss, grads)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  updated = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=new_opt_state, batch_stats=new_batch_stats)
  new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), updated, state)
  metrics = dict(metrics, finite=finite.astype(jnp.float32), grad_norm=optax.global_norm(grads))
  if learning_rate_fn is not None:
    metrics['learning_rate'] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
  return new_state, metrics


def _train_step_from_loss(loss_fn, tx: optax.GradientTransformation, learning_rate_fn: Callable | None):
  """fn(state, batch, rng) -> (state, metrics): one guarded optimiser step on `loss_fn`'s gradients."""
  def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array):
    dropout_rng = jax.random.fold_in(rng, state.step)
    (loss, (metrics, new_batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, batch, dropout_rng)
    return _guarded_update(state, tx, grads, new_batch_stats, loss, metrics, learning_rate_fn)
  return train_step


def make_ssl_loss_fn(model: nn.Module, temperature: float, order_weight: float = 1.0,
                     compute_dtype=jnp.float32):
  """loss_fn(params, batch_stats, batch, dropout_rng) -> (loss, (metrics, new_batch_stats)), in train mode."""
  def loss_fn(params, batch_stats, batch, dropout_rng):
    views = _float_input(batch['views'], 'views', compute_dtype)
    outputs, mutated = model.apply({'params': params, 'batch_stats': batch_stats}, views, train=True,
                                   mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    loss, metrics = losses.ssl_loss(_to_float32(outputs), batch, temperature, order_weight)
    return loss, (metrics, mutated['batch_stats'])
  return loss_fn


def make_ssl_train_step(model: nn.Module, tx: optax.GradientTransformation, temperature: float,
                        order_weight: float = 1.0, compute_dtype=jnp.float32,
                        learning_rate_fn: Callable | None = None):
  """fn(state, batch, rng) -> (state, metrics); batch: views (B,2,T,H,W,C) float, optional order_label (B,2).

  Inputs are cast to compute_dtype (the model's own `dtype` sets its compute precision); params, the loss
  and the optimizer stay float32. `tx` must be the transformation the state's opt_state was made by.
  """
  loss_fn = make_ssl_loss_fn(model, temperature, order_weight, compute_dtype)

  return _train_step_from_loss(loss_fn, tx, learning_rate_fn)


def _valid_rows(batch: Mapping[str, jax.Array], labels: jax.Array) -> jax.Array:
  """Rows that count: label >= 0 (−1 = unknown in the record schema) and batch['mask'] when given."""
  valid = labels >= 0
  if 'mask' in batch:
    valid = valid & (batch['mask'].reshape(labels.shape) > 0)
  return valid.astype(jnp.float32)


def _supervised_loss(logits: jax.Array, labels: jax.Array, valid: jax.Array, task: str, pos_weight: float,
                     label_smoothing: float):
  """(loss, accuracy) of logits (R, num_outputs) against labels (R,) over valid rows."""
  logits = logits.astype(jnp.float32)
  if task == 'binary':
    if logits.shape[-1] != 1:
      raise ValueError(f'task=binary needs a model with 1 output, got logits {logits.shape}')
    logits = logits[..., 0]
    loss = losses.weighted_bce(logits, labels, pos_weight, valid, label_smoothing)
    correct = (logits > 0) == (labels > 0.5)
  else:
    loss = losses.softmax_ce(logits, labels.astype(jnp.int32), valid, label_smoothing)
    correct = jnp.argmax(logits, axis=-1) == labels
  accuracy = jnp.sum(correct * valid) / jnp.maximum(jnp.sum(valid), 1.0)
  return loss, accuracy


def _check_task(task: str) -> None:
  if task not in TASKS:
    raise ValueError(f'task must be one of {TASKS}, got {task!r}')


def make_finetune_loss_fn(model: nn.Module, pos_weight: float = 1.0, label_smoothing: float = 0.0,
                          task: str = 'binary', compute_dtype=jnp.float32):
  """loss_fn(params, batch_stats, batch, dropout_rng) -> (loss, (metrics, new_batch_stats)), train mode."""
  _check_task(task)

  def loss_fn(params, batch_stats, batch, dropout_rng):
    video = _float_input(batch['video'], 'video', compute_dtype)
    logits, mutated = model.apply({'params': params, 'batch_stats': batch_stats}, video, train=True,
                                  mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    labels = batch['label']
    valid = _valid_rows(batch, labels)
    loss, accuracy = _supervised_loss(logits, labels, valid, task, pos_weight, label_smoothing)
    metrics = {'loss': loss, 'accuracy': accuracy, 'num_valid': jnp.sum(valid)}
    return loss, (metrics, mutated['batch_stats'])
  return loss_fn


def make_finetune_train_step(model: nn.Module, tx: optax.GradientTransformation, pos_weight: float = 1.0,
                             label_smoothing: float = 0.0, task: str = 'binary', compute_dtype=jnp.float32,
                             learning_rate_fn: Callable | None = None):
  """fn(state, batch, rng) -> (state, metrics); batch: video (B,T,H,W,C) float, label (B,), optional mask.

  binary: BCE with pos_weight on the single logit (labels 0/1); multiclass: softmax CE (integer labels).
  Rows with label < 0 or mask == 0 are left out of the loss; metrics['num_valid'] counts the rest.
  """
  loss_fn = make_finetune_loss_fn(model, pos_weight, label_smoothing, task, compute_dtype)

  return _train_step_from_loss(loss_fn, tx, learning_rate_fn)


def make_eval_step(model: nn.Module, pos_weight: float = 1.0, task: str = 'binary',
                   compute_dtype=jnp.float32):
  """fn(state, batch) -> {'logits'[, 'loss', 'accuracy', 'num_valid']} in eval mode (running BN stats,
  no dropout).

  batch['video'] is (B,N,T,H,W,C) (N clips per video) or (B,T,H,W,C) (N = 1). Clips run as one B·N batch.
  logits: (B,N) for binary, (B,N,K) for multiclass, float32. With batch['label'] (B,) present, the loss is
  the mean over valid videos' clips of the per-clip loss, each clip carrying its video's label.
  """
  _check_task(task)

  def eval_step(state: TrainState, batch: Mapping[str, jax.Array]):
    video = _float_input(batch['video'], 'video', compute_dtype)
    single_clip = video.ndim == 5
    if single_clip:
      video = video[:, None]
    if video.ndim != 6:
      raise ValueError(f"eval step: batch['video'] must be (B,N,T,H,W,C) or (B,T,H,W,C), got {video.shape}")
    b, n = video.shape[:2]
    logits = model.apply({'params': state.params, 'batch_stats': state.batch_stats},
                            video.reshape((b * n,) + video.shape[2:]), train=False)
    logits = logits.astype(jnp.float32).reshape((b, n) + logits.shape[1:])
    outputs = {'logits': logits[..., 0] if task == 'binary' else logits}
    if single_clip:
      outputs['logits'] = outputs['logits'][:, 0]
    if 'label' in batch:
      labels = batch['label']
      valid = _valid_rows(batch, labels)
      loss, accuracy = _supervised_loss(logits.reshape((b * n,) + logits.shape[2:]),
                                        jnp.repeat(labels, n), jnp.repeat(valid, n), task, pos_weight, 0.0)
      outputs.update(loss=loss, accuracy=accuracy, num_valid=jnp.sum(valid))
    return outputs
  return eval_step
