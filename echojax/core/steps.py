"""Pure train/eval step functions and the TrainState they update (SSL pretraining, fine-tuning, evaluation).

The trainer jit-compiles these with in/out shardings and donate_argnums; nothing here knows about devices,
so a step gives the same result on one device or sharded over many. A step whose loss, gradients or update
are not finite returns the state unchanged and metrics['finite'] = 0.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from echojax.core import gradcache, losses

TASKS = ('binary', 'multiclass', 'regression')
Metrics = dict[str, jax.Array]
# Keys every SSL / fine-tune train step returns (besides 'finite', and 'learning_rate' when asked for).
SSL_METRIC_NAMES = ('loss', 'nt_xent', 'contrastive_acc', 'grad_norm')
SSL_ORDER_METRIC_NAMES = ('order_loss', 'order_acc', 'order_acc_rev')  # only when the model has a frame-order head
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
  return jax.tree_util.tree_map(losses.float32_or_wider, tree)


def _guarded_update(state: TrainState, tx: optax.GradientTransformation, grads, new_batch_stats, loss,
                    metrics: Metrics, learning_rate_fn: Callable | None):
  """Apply the update only if loss, gradients and the update itself are finite (a bad learning rate or
  optimiser moment can turn finite gradients into NaN parameters); otherwise keep every field of the old
  state. metrics['finite'] stays on device: the trainer accumulates it and checks at log steps."""
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  finite = _all_finite(loss, grads, updates)
  updated = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                          opt_state=new_opt_state, batch_stats=new_batch_stats)
  new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), updated, state)
  metrics = dict(metrics, finite=finite.astype(jnp.float32), grad_norm=optax.global_norm(grads))
  if learning_rate_fn is not None:
    metrics['learning_rate'] = jnp.asarray(learning_rate_fn(state.step), jnp.float32)
  return new_state, metrics


def _train_step_from_loss(loss_fn, tx: optax.GradientTransformation, learning_rate_fn: Callable | None,
                          value_and_grad: Callable | None = None):
  """fn(state, batch, rng) -> (state, metrics): one guarded optimiser step on `loss_fn`'s gradients.

  value_and_grad(params, batch_stats, batch, rng) -> ((loss, (metrics, new_batch_stats)), grads) replaces
  `jax.value_and_grad(loss_fn, has_aux=True)` (the chunked steps of gradcache.py)."""
  value_and_grad = value_and_grad or jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array):
    dropout_rng = jax.random.fold_in(rng, state.step)
    (loss, (metrics, new_batch_stats)), grads = value_and_grad(
        state.params, state.batch_stats, batch, dropout_rng)
    return _guarded_update(state, tx, grads, new_batch_stats, loss, metrics, learning_rate_fn)
  return train_step


def _check_bn_groups(model: nn.Module, rows_per_chunk: int, option: str) -> None:
  """A chunked step equals the unchunked one only if no BatchNorm group spans two chunks."""
  group = getattr(model, 'bn_group_size', None)
  if group is None:  # a model without the knob (tests' stand-ins): the caller vouches for its BN
    return
  if not group or rows_per_chunk % group:
    raise ValueError(f'{option}: BatchNorm statistics cannot span chunks; set model.bn_group_size to a '
                     f'divisor of the per-device chunk ({rows_per_chunk}), e.g. {rows_per_chunk} '
                     f'(got bn_group_size={group}; 0 = whole batch)')


def _ssl_apply(model: nn.Module, compute_dtype):
  """apply(params, batch_stats, views, rng) -> (float32 outputs, new batch_stats), in train mode."""
  def apply(params, batch_stats, views, dropout_rng, contrastive_encoder_share=None, order_views=None):
    views = _float_input(views, 'views', compute_dtype)
    extra = {} if contrastive_encoder_share is None else {'contrastive_encoder_share': contrastive_encoder_share}
    if order_views is not None:
      extra['order_views'] = _float_input(order_views, 'order_views', compute_dtype)
    outputs, mutated = model.apply({'params': params, 'batch_stats': batch_stats}, views, train=True,
                                   mutable=['batch_stats'], rngs={'dropout': dropout_rng}, **extra)
    return _to_float32(outputs), mutated['batch_stats']
  return apply


ORDER_INPUTS = ('shared', 'separate')


def _ssl_inputs(model: nn.Module, batch: Mapping[str, jax.Array], order_input: str):
  """(views, order_views) for the model: the batch's views and None ('shared'), or the clips put back in
  recorded order and the shuffled ones ('separate'; without an order head, NT-Xent alone on the former)."""
  views = batch['views']
  if order_input != 'separate' or 'order_label' not in batch:
    return views, None
  recorded = losses.frames_in_recorded_order(views, batch['order_label'])
  return recorded, (views if getattr(model, 'num_order_classes', 0) else None)


def make_ssl_loss_fn(model: nn.Module, temperature: float, order_weight: float = 1.0,
                     compute_dtype=jnp.float32, order_input: str = 'shared'):
  """loss_fn(params, batch_stats, batch, dropout_rng) -> (loss, (metrics, new_batch_stats)), in train mode.
  An optional scalar batch['contrastive_encoder_share'] (set by the train step during the frame-order-first
  curriculum) scales the NT-Xent gradient that reaches the encoder. order_input 'shared' (the paper): both
  losses read the shuffled views; 'separate': NT-Xent reads the same clips put back in recorded order
  (losses.frames_in_recorded_order) and only the order head reads the shuffled ones — one encoder pass
  over twice the clips."""
  if order_input not in ORDER_INPUTS:
    raise ValueError(f'ssl.order_input must be one of {ORDER_INPUTS}, got {order_input!r}')
  apply = _ssl_apply(model, compute_dtype)

  def loss_fn(params, batch_stats, batch, dropout_rng):
    views, order_views = _ssl_inputs(model, batch, order_input)
    outputs, new_batch_stats = apply(params, batch_stats, views, dropout_rng,
                                     batch.get('contrastive_encoder_share'), order_views)
    loss, metrics = losses.ssl_loss(outputs, batch, temperature, order_weight)
    return loss, (metrics, new_batch_stats)
  return loss_fn


def make_ssl_train_step(model: nn.Module, tx: optax.GradientTransformation, temperature: float,
                        order_weight: float = 1.0, compute_dtype=jnp.float32,
                        learning_rate_fn: Callable | None = None, microbatch_size: int = 0,
                        num_shards: int = 1, order_only_steps: int = 0, contrastive_warmup_steps: int = 0,
                        order_input: str = 'shared'):
  """fn(state, batch, rng) -> (state, metrics); batch: views (B,2,T,H,W,C) float, optional order_label (B,2).

  Inputs are cast to compute_dtype (the model's own `dtype` sets its compute precision); params, the loss
  and the optimizer stay float32. `tx` must be the transformation the state's opt_state was made by.
  microbatch_size > 0: gradient-cached NT-Xent (gradcache.ssl_value_and_grad) over chunks of that many
  pairs per device (num_shards = devices the batch is split over), exactly the full-batch gradient; the
  model's ghost-BN group (bn_group_size, pairs) must divide microbatch_size, and its gradient_balance must be
  'none'.
  order_only_steps / contrastive_warmup_steps > 0: the frame-order-first curriculum — the share of NT-Xent's
  gradient reaching the encoder is 0 for order_only_steps steps, then ramps to 1 over
  contrastive_warmup_steps (losses.contrastive_encoder_share_at, from state.step, so a resumed run continues
  it); the projection head learns NT-Xent throughout, so it is not stale when the encoder joins.
  order_input: which clips each loss reads (make_ssl_loss_fn); 'separate' needs microbatch_size=0.
  """
  loss_fn = make_ssl_loss_fn(model, temperature, order_weight, compute_dtype, order_input)
  if not microbatch_size:
    step = _train_step_from_loss(loss_fn, tx, learning_rate_fn)
  else:
    _check_bn_groups(model, microbatch_size, f'train.microbatch_size={microbatch_size}')
    if order_input != 'shared':
      raise ValueError(f'ssl.order_input={order_input!r} needs train.microbatch_size=0 (GradCache chunks '
                       f'the shared views only)')
    if getattr(model, 'gradient_balance', 'none') != 'none':
      # the balance needs each task's gradient norm over the whole batch; GradCache sees one chunk at a time
      raise ValueError(f'ssl.gradient_balance={model.gradient_balance!r} needs train.microbatch_size=0 '
                       f'(the balance is over the whole batch; GradCache computes per chunk)')
    apply = _ssl_apply(model, compute_dtype)

    def value_and_grad(params, batch_stats, batch, rng):
      return gradcache.ssl_value_and_grad(apply, params, batch_stats, batch, rng, temperature=temperature,
                                          order_weight=order_weight, microbatch_size=microbatch_size,
                                          num_shards=num_shards,
                                          contrastive_encoder_share=batch.get('contrastive_encoder_share'))
    step = _train_step_from_loss(loss_fn, tx, learning_rate_fn, value_and_grad)
  if not (order_only_steps or contrastive_warmup_steps):
    return step

  def warmed_up_step(state: TrainState, batch: Mapping[str, jax.Array], rng: jax.Array):
    share = losses.contrastive_encoder_share_at(state.step, order_only_steps, contrastive_warmup_steps)
    state, metrics = step(state, {**batch, 'contrastive_encoder_share': share}, rng)
    return state, {**metrics, 'contrastive_encoder_share': share}
  return warmed_up_step


def _valid_rows(batch: Mapping[str, jax.Array], labels: jax.Array, task: str = 'binary') -> jax.Array:
  """Rows that count: label >= 0 (−1 = unknown in the record schema; regression: a finite target, NaN =
  unknown, since standardised targets are negative too) and batch['mask'] when given."""
  valid = jnp.isfinite(labels) if task == 'regression' else labels >= 0
  if 'mask' in batch:
    valid = valid & (batch['mask'].reshape(labels.shape) > 0)
  return valid.astype(jnp.float32)


def _supervised_loss(logits: jax.Array, labels: jax.Array, valid: jax.Array, task: str, pos_weight: float,
                     label_smoothing: float):
  """(loss, accuracy) of logits (R, num_outputs) against labels (R,) over valid rows; regression:
  (mean squared error, mean absolute error) of the single output."""
  logits = losses.float32_or_wider(logits)
  if task == 'regression':
    error = jnp.where(valid > 0, logits[..., 0] - labels, 0.0)   # NaN targets must not reach the sum
    count = jnp.maximum(jnp.sum(valid), 1.0)
    return jnp.sum(error ** 2) / count, jnp.sum(jnp.abs(error)) / count
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


def _second_metric(task: str) -> str:
  return 'mae' if task == 'regression' else 'accuracy'


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
    valid = _valid_rows(batch, labels, task)
    loss, accuracy = _supervised_loss(logits, labels, valid, task, pos_weight, label_smoothing)
    metrics = {'loss': loss, _second_metric(task): accuracy, 'num_valid': jnp.sum(valid)}
    return loss, (metrics, mutated['batch_stats'])
  return loss_fn


def make_finetune_train_step(model: nn.Module, tx: optax.GradientTransformation, pos_weight: float = 1.0,
                             label_smoothing: float = 0.0, task: str = 'binary', compute_dtype=jnp.float32,
                             learning_rate_fn: Callable | None = None, accumulate_steps: int = 1,
                             num_shards: int = 1):
  """fn(state, batch, rng) -> (state, metrics); batch: video (B,T,H,W,C) float, label (B,), optional mask.

  binary: BCE with pos_weight on the single logit (labels 0/1); multiclass: softmax CE (integer labels).
  Rows with label < 0 or mask == 0 are left out of the loss; metrics['num_valid'] counts the rest.
  accumulate_steps k > 1: the global batch is processed as k chunks per device, one at a time, and their
  valid-row-weighted gradients summed before the one optimiser update (gradcache.accumulated_value_and_grad:
  the large-batch gradient on the memory of B/k); the model's bn_group_size must divide each chunk.
  """
  loss_fn = make_finetune_loss_fn(model, pos_weight, label_smoothing, task, compute_dtype)
  if accumulate_steps == 1:
    return _train_step_from_loss(loss_fn, tx, learning_rate_fn)

  def value_and_grad(params, batch_stats, batch, rng):
    rows = batch['video'].shape[0] // (num_shards * accumulate_steps)
    _check_bn_groups(model, rows, f'train.accumulate_steps={accumulate_steps}')
    return gradcache.accumulated_value_and_grad(loss_fn, params, batch_stats, batch, rng,
                                                accumulate_steps=accumulate_steps, num_shards=num_shards)
  return _train_step_from_loss(loss_fn, tx, learning_rate_fn, value_and_grad)


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
    outputs = {'logits': logits[..., 0] if task in ('binary', 'regression') else logits}
    if single_clip:
      outputs['logits'] = outputs['logits'][:, 0]
    if 'label' in batch:
      labels = batch['label']
      valid = _valid_rows(batch, labels, task)
      loss, accuracy = _supervised_loss(logits.reshape((b * n,) + logits.shape[2:]),
                                        jnp.repeat(labels, n), jnp.repeat(valid, n), task, pos_weight, 0.0)
      outputs.update({'loss': loss, _second_metric(task): accuracy, 'num_valid': jnp.sum(valid)})
    return outputs
  return eval_step
