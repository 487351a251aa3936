"""Chunked gradients on bounded memory: gradient-cached NT-Xent (GradCache, Gao et al. 2021) for the SSL
step, and gradient accumulation for fine-tuning. Both split the global batch into chunks that stay sharded
like the batch (each device works through its own rows) and return exactly the full-batch loss, gradients
and BatchNorm running statistics when BatchNorm statistics are per chunk (ghost BN, `bn_group_size`).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from echojax.core import losses

# apply_fn(params, batch_stats, views, rng) -> (float32 outputs dict, new batch_stats), train mode.
ApplyFn = Callable


def num_chunks(global_batch: int, microbatch_size: int, num_shards: int) -> int:
  """Chunks of `microbatch_size` rows per device in a global batch split over `num_shards` devices."""
  per_device, rest = divmod(global_batch, num_shards)
  if rest or microbatch_size <= 0 or per_device % microbatch_size:
    raise ValueError(f'microbatching: the per-device batch ({global_batch} over {num_shards} device(s)) '
                     f'must be a positive multiple of microbatch_size {microbatch_size}')
  return per_device // microbatch_size


def chunk_rows(x: jax.Array, chunks: int, num_shards: int) -> jax.Array:
  """(B, ...) → (chunks, B/chunks, ...). Chunk c holds rows [c·m, (c+1)·m) of every device's block of B/S
  consecutive rows (m = B/(S·chunks)), so a chunk is sharded like the batch and no row leaves its device;
  with a ghost-BN group size dividing m, every BatchNorm group lies inside one device's part of a chunk."""
  m = x.shape[0] // (num_shards * chunks)
  x = x.reshape((num_shards, chunks, m) + x.shape[1:]).swapaxes(0, 1)
  return x.reshape((chunks, num_shards * m) + x.shape[3:])


def _mean_over_chunks(stacked):
  # Equal-sized chunks: the mean of the per-chunk running-stat updates (all from the same old stats) is the
  # single update of the unchunked step, because the update is linear in the batch statistics.
  return jax.tree_util.tree_map(lambda s: jnp.mean(s, axis=0), stacked)


def _tree_add(a, b):
  return jax.tree_util.tree_map(jnp.add, a, b)


def ssl_value_and_grad(apply_fn: ApplyFn, params, batch_stats, batch: Mapping[str, jax.Array],
                       rng: jax.Array, *, temperature: float, order_weight: float, microbatch_size: int,
                       num_shards: int = 1, contrastive_encoder_share: Any = None):
  """GradCache for the EchoCLR objective → ((loss, (metrics, new_batch_stats)), grads), the signature of
  `jax.value_and_grad(loss_fn, has_aux=True)` on the unchunked loss.

  Pass 1 embeds the chunks one after another (forward only, nothing kept but the embeddings); NT-Xent and
  its gradient w.r.t. every embedding are taken on the full global batch; pass 2 re-runs each chunk under
  `jax.vjp`, pulls back the cached embedding gradient plus the frame-order CE (per example, so it needs no
  cache) and sums the parameter gradients. Peak activation memory is that of one chunk, at the price of
  one extra forward pass. NT-Xent is invariant to the order of the pairs, so the loss is taken on the
  chunk-ordered embeddings. Chunk c uses rng fold_in(rng, c) in both passes.
  """
  views = batch['views']
  chunks = num_chunks(views.shape[0], microbatch_size, num_shards)
  split = lambda x: chunk_rows(x, chunks, num_shards)
  chunk_views = split(views)
  rngs = jax.vmap(lambda c: jax.random.fold_in(rng, c))(jnp.arange(chunks))
  has_order = jax.eval_shape(  # from shapes only: does the model have a frame-order head?
      lambda: apply_fn(params, batch_stats, chunk_views[0], rngs[0])[0]).get('order_logits') is not None
  if has_order and 'order_label' not in batch:
    raise KeyError('ssl_loss: the model returns order_logits but the batch has no order_label')

  def embed(args):
    x, r = args
    outputs, new_stats = apply_fn(params, batch_stats, x, r)
    return outputs['embeddings'], new_stats

  embeddings, stacked_stats = jax.lax.map(embed, (chunk_views, rngs))
  flat = embeddings.reshape((-1,) + embeddings.shape[2:])
  (contrastive, metrics), d_embeddings = jax.value_and_grad(
      lambda z: losses.nt_xent_with_metrics(z[:, 0], z[:, 1], temperature), has_aux=True)(flat)
  d_embeddings = d_embeddings.reshape(embeddings.shape)
  extra = {} if contrastive_encoder_share is None else {'contrastive_encoder_share': contrastive_encoder_share}

  def chunk_grads(grads, args):
    x, r, d_z = args[:3]
    def forward(p):
      outputs = apply_fn(p, batch_stats, x, r, **extra)[0]
      return (outputs['embeddings'], outputs['order_logits']) if has_order else outputs['embeddings']
    outputs, pullback = jax.vjp(forward, params)
    if not has_order:
      return _tree_add(grads, pullback(d_z)[0]), ()
    # The global frame-order CE (and each order metric) is the mean of the equal-sized chunks' means.
    (_, order_metrics), d_logits = jax.value_and_grad(
        lambda logits: losses.frame_order_objective(logits, args[3]), has_aux=True)(outputs[1])
    chunk = pullback((d_z, d_logits * (order_weight / chunks)))[0]
    return _tree_add(grads, chunk), {k: v / chunks for k, v in order_metrics.items()}

  xs = (chunk_views, rngs, d_embeddings) + ((split(batch['order_label']),) if has_order else ())
  grads, order = jax.lax.scan(chunk_grads, jax.tree_util.tree_map(jnp.zeros_like, params), xs)
  metrics = {'nt_xent': contrastive, **metrics}
  loss = contrastive
  if has_order:
    metrics.update({k: jnp.sum(v) for k, v in order.items()})
    loss = loss + order_weight * metrics['order_loss']
  metrics['loss'] = loss
  return (loss, (metrics, _mean_over_chunks(stacked_stats))), grads


def accumulated_value_and_grad(loss_fn: Callable, params, batch_stats, batch: Mapping[str, jax.Array],
                               rng: jax.Array, *, accumulate_steps: int, num_shards: int = 1,
                               weight_key: str = 'num_valid'):
  """Gradient accumulation over `accumulate_steps` chunks of the global batch, inside one step →
  ((loss, (metrics, new_batch_stats)), grads) like `jax.value_and_grad(loss_fn, has_aux=True)`.

  loss_fn(params, batch_stats, batch, rng) -> (loss, (metrics, new_batch_stats)) must be a mean over the
  rows counted by metrics[weight_key] (fine-tuning: valid rows); chunks are weighted by that count, so the
  result is the large-batch mean even when padding or unknown labels fall unevenly. Other metrics are
  weighted the same way; weight_key itself is summed. Chunk c uses rng fold_in(rng, c) (dropout masks
  differ from the unchunked step's; everything else is equal).
  """
  leading = next(iter(batch.values())).shape[0]
  per_device = leading // num_shards
  if leading % num_shards or accumulate_steps <= 0 or per_device % accumulate_steps:
    raise ValueError(f'accumulate_steps={accumulate_steps} must divide the per-device batch '
                     f'({leading} over {num_shards} device(s))')
  chunked = {k: chunk_rows(v, accumulate_steps, num_shards) for k, v in batch.items()}
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def body(grads_sum, args):
    chunk, c = args
    (_, (metrics, new_stats)), grads = grad_fn(params, batch_stats, chunk, jax.random.fold_in(rng, c))
    weight = metrics[weight_key]
    weighted = {k: v * weight for k, v in metrics.items() if k != weight_key}
    return _tree_add(grads_sum, jax.tree_util.tree_map(lambda g: g * weight, grads)), (weighted, weight,
                                                                                       new_stats)

  grads, (weighted, weights, stacked_stats) = jax.lax.scan(
      body, jax.tree_util.tree_map(jnp.zeros_like, params), (chunked, jnp.arange(accumulate_steps)))
  total = jnp.sum(weights)
  denominator = jnp.maximum(total, 1.0)
  grads = jax.tree_util.tree_map(lambda g: g / denominator, grads)
  metrics = {k: jnp.sum(v) / denominator for k, v in weighted.items()}
  metrics[weight_key] = total
  return (metrics['loss'], (metrics, _mean_over_chunks(stacked_stats))), grads
