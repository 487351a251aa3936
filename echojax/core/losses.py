"""Training objectives and their metrics: NT-Xent over the global batch, frame-order cross entropy,
BCE with `pos_weight` (torch `BCEWithLogitsLoss` semantics) and softmax CE.

Every loss is written on global arrays (no device index, no psum): under `jax.jit` with a batch-sharded
input XLA inserts the collectives, so the value is the global-batch loss. Losses are computed in float32
(float64 inputs stay float64, for exactness tests).
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

# torch.nn.functional.normalize's default eps: keeps an all-zero embedding finite.
_NORMALIZE_EPS = 1e-12


def float32_or_wider(x: jax.Array) -> jax.Array:
  """x in float32, or float64 when it already is (the float64 exactness tests); bf16 is widened."""
  return jnp.asarray(x).astype(jnp.promote_types(jnp.asarray(x).dtype, jnp.float32))


def _l2_normalize(x: jax.Array) -> jax.Array:
  squared_norm = jnp.sum(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(squared_norm, _NORMALIZE_EPS**2))


def _nt_xent_logits(z_a: jax.Array, z_b: jax.Array, temperature: float):
  """(2N, 2N) similarity logits with self-similarity masked out, and each anchor's positive index."""
  if z_a.ndim != 2 or z_a.shape != z_b.shape:
    raise ValueError(f'nt_xent expects two (N, D) arrays of equal shape, got {z_a.shape} and {z_b.shape}')
  if isinstance(temperature, (int, float)) and temperature <= 0:
    raise ValueError(f'nt_xent temperature must be > 0, got {temperature}')
  n = z_a.shape[0]
  z = _l2_normalize(float32_or_wider(jnp.concatenate([z_a, z_b], axis=0)))
  logits = (z @ z.T) / temperature
  # A view is never its own negative; -inf gives it zero softmax mass and zero gradient.
  logits = jnp.where(jnp.eye(2 * n, dtype=bool), -jnp.inf, logits)
  positives = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(n)])
  return logits, positives


def nt_xent_with_metrics(z_a: jax.Array, z_b: jax.Array, temperature: float):
  """NT-Xent loss and `{'contrastive_acc'}`: top-1 accuracy of finding the positive among 2N−1 candidates.

  z_a[i] and z_b[i] are a positive pair; the other 2N−2 views are negatives. Mean over the 2N anchors.
  """
  logits, positives = _nt_xent_logits(z_a, z_b, temperature)
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, positives))
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == positives).astype(jnp.float32))
  return loss, {'contrastive_acc': accuracy}


def nt_xent(z_a: jax.Array, z_b: jax.Array, temperature: float) -> jax.Array:
  """NT-Xent (SimCLR) loss of paired embeddings z_a, z_b (N, D) with cosine similarity; a scalar."""
  return nt_xent_with_metrics(z_a, z_b, temperature)[0]


def frame_order_loss(logits: jax.Array, labels: jax.Array):
  """(mean cross entropy, accuracy) of permutation logits (..., K) against integer labels (...)."""
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f'frame_order_loss: logits {logits.shape} do not match labels {labels.shape}')
  logits = float32_or_wider(logits)
  labels = labels.astype(jnp.int32)
  loss = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  accuracy = jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))
  return loss, accuracy


@functools.lru_cache(maxsize=None)
def _permutations(clip_len: int) -> np.ndarray:
  """(clip_len!, clip_len) int32: every permutation of range(clip_len) in lexicographic order — the data
  pipeline's table (echojax.data.augment.permutation_table; tests/test_order_accuracy.py and
  tests/test_shared_encoder_tasks.py check the two agree)."""
  return np.array(list(itertools.permutations(range(clip_len))), np.int32)


def _reversal_index(num_classes: int) -> np.ndarray:
  """For each permutation index k of range(T) (lexicographic, as the data pipeline's table), the index of
  the same permutation read backwards: the clip shown in reverse time."""
  clip_len = next((t for t in range(1, 9) if math.factorial(t) == num_classes), None)
  if clip_len is None:
    raise ValueError(f'frame order: {num_classes} classes is not T! for T <= 8')
  perms = [tuple(p) for p in _permutations(clip_len)]
  index = {p: i for i, p in enumerate(perms)}
  return np.array([index[p[::-1]] for p in perms], np.int32)


def frames_in_recorded_order(views: jax.Array, order_label: jax.Array) -> jax.Array:
  """Undo the data pipeline's frame shuffle: views (B,2,T,...) whose frames were gathered as
  shuffled[t] = recorded[perm[t]] with perm = row `order_label` (B,2) of the lexicographic permutation table
  (echojax.data.augment.permutation_table) → the same clips in recorded order (ssl.order_input='separate')."""
  # recorded[s] = shuffled[inverse[s]]
  inverse = jnp.asarray(np.argsort(_permutations(views.shape[2]), axis=1).astype(np.int32))
  index = inverse[order_label.astype(jnp.int32)]                        # (B,2,T)
  index = index.reshape(index.shape + (1,) * (views.ndim - 3))
  return jnp.take_along_axis(views, index, axis=2)


def order_accuracy_up_to_reversal(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Accuracy that also counts the time-reversed permutation as right (a clip's order and its reverse look
  alike to anything without an arrow of time, e.g. cardiac motion that is nearly symmetric)."""
  reverse = jnp.asarray(_reversal_index(logits.shape[-1]))
  pred, labels = jnp.argmax(logits, axis=-1), labels.astype(jnp.int32)
  return jnp.mean(((pred == labels) | (pred == reverse[labels])).astype(jnp.float32))


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  if mask is None:
    return jnp.mean(values)
  mask = mask.astype(jnp.float32)
  # An all-masked batch (padding only) contributes 0, not NaN.
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def weighted_bce(logits: jax.Array, labels: jax.Array, pos_weight: float = 1.0,
                 mask: jax.Array | None = None, label_smoothing: float = 0.0) -> jax.Array:
  """Mean over valid rows of torch's BCEWithLogitsLoss(pos_weight=pos_weight).

  loss_i = −[pos_weight·y·log σ(x) + (1−y)·log(1−σ(x))]; label smoothing moves y towards 1/2
  (y·(1−ε) + ε/2, the two-class form of optax.smooth_labels). `mask` (B,) selects the rows that count.
  """
  if logits.shape != labels.shape:
    raise ValueError(f'weighted_bce: logits {logits.shape} and labels {labels.shape} differ')
  if not 0.0 <= label_smoothing < 1.0:
    raise ValueError(f'label_smoothing must be in [0, 1), got {label_smoothing}')
  logits = float32_or_wider(logits)
  labels = labels.astype(logits.dtype)
  if label_smoothing:
    labels = labels * (1.0 - label_smoothing) + 0.5 * label_smoothing
  # log σ(x) = −softplus(−x), log(1 − σ(x)) = −softplus(x): stable for large |x|.
  per_row = pos_weight * labels * jax.nn.softplus(-logits) + (1.0 - labels) * jax.nn.softplus(logits)
  return _masked_mean(per_row, mask)


def softmax_ce(logits: jax.Array, labels: jax.Array, mask: jax.Array | None = None,
               label_smoothing: float = 0.0) -> jax.Array:
  """Mean over valid rows of multi-class cross entropy; logits (B, K), integer labels (B,)."""
  if logits.shape[:-1] != labels.shape:
    raise ValueError(f'softmax_ce: logits {logits.shape} do not match labels {labels.shape}')
  logits = float32_or_wider(logits)
  num_classes = logits.shape[-1]
  # Out-of-range labels (e.g. -1 = unknown) must be masked; clip keeps their one-hot well defined.
  one_hot = jax.nn.one_hot(jnp.clip(labels, 0, num_classes - 1), num_classes)
  if label_smoothing:
    one_hot = optax.smooth_labels(one_hot, label_smoothing)
  return _masked_mean(optax.softmax_cross_entropy(logits, one_hot), mask)


def ssl_loss(outputs: Mapping[str, jax.Array], batch: Mapping[str, Any], temperature: float,
             order_weight: float = 1.0):
  """EchoCLR objective: NT-Xent(view 0, view 1) + order_weight × frame-order CE over both views.

  outputs: the SSL model's dict (`embeddings` (B,2,D), optional `order_logits` (B,2,K)). The frame-order
  term (and the `order_loss`/`order_acc` metrics) exist only when the model returns `order_logits`; then
  `batch['order_label']` (B,2) is required.
  Returns (total, metrics) with metrics loss, nt_xent, contrastive_acc[, order_loss, order_acc].
  """
  embeddings = outputs['embeddings']
  if embeddings.ndim != 3 or embeddings.shape[1] != 2:
    raise ValueError(f'ssl_loss: embeddings must be (B, 2, D), got {embeddings.shape}')
  contrastive, metrics = nt_xent_with_metrics(embeddings[:, 0], embeddings[:, 1], temperature)
  metrics = {'nt_xent': contrastive, **metrics}
  total = contrastive
  order_logits = outputs.get('order_logits')
  if order_logits is not None:
    if 'order_label' not in batch:
      raise KeyError('ssl_loss: the model returns order_logits but the batch has no order_label')
    order_loss, order_metrics = frame_order_objective(order_logits, batch['order_label'])
    total = total + order_weight * order_loss
    metrics.update(order_metrics)
  metrics['loss'] = total
  return total, metrics


def contrastive_encoder_share_at(step, order_only_steps: int = 0, warmup_steps: int = 0):
  """The share of NT-Xent's gradient that reaches the encoder at `step` under the frame-order-first
  curriculum: 0 for the first `order_only_steps` steps (`ssl.order_only_steps`), then a linear ramp to 1 over
  `warmup_steps` (`ssl.contrastive_warmup_steps`); 1 throughout when both are 0 (the paper). The projection
  head always gets NT-Xent's full gradient (models.heads.SSLModel)."""
  step = jnp.asarray(step, jnp.float32) - float(order_only_steps)
  if warmup_steps <= 0:
    return (step >= 0).astype(jnp.float32)
  return jnp.clip((step + 1.0) / float(warmup_steps), 0.0, 1.0)


def frame_order_objective(order_logits: jax.Array, labels: jax.Array):
  """(mean CE, {order_loss, order_acc, order_acc_rev}) of the frame-order head. Every metric is a mean over
  clips, so the means of equal-sized chunks average to the batch's (gradcache.py relies on it)."""
  order_loss, order_acc = frame_order_loss(order_logits, labels)
  return order_loss, {'order_loss': order_loss, 'order_acc': order_acc,
                      'order_acc_rev': order_accuracy_up_to_reversal(order_logits, labels)}
