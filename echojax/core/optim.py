"""Optax optimisers and learning-rate schedules built from the `optimizer` config block.

Keys: name (adam|adamw|lars|sgd), lr, lr_scaling (none|linear|sqrt) with base_batch_size, schedule
(constant|warmup_cosine) with warmup_steps or warmup_fraction and end_lr_factor, weight_decay, b1, b2, eps,
momentum, nesterov, grad_clip_norm (0 = off), trust_coefficient. Weight decay and the LARS trust ratio touch
only parameters named 'kernel' (never biases or BatchNorm scale/bias).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import jax
import optax

OPTIMIZERS = ('adam', 'adamw', 'lars', 'sgd')
LR_SCALINGS = ('none', 'linear', 'sqrt')
SCHEDULES = ('constant', 'warmup_cosine')
KNOWN_KEYS = frozenset({
    'name', 'lr', 'lr_scaling', 'base_batch_size', 'schedule', 'warmup_steps', 'warmup_fraction',
    'end_lr_factor', 'weight_decay', 'b1', 'b2', 'eps', 'momentum', 'nesterov', 'grad_clip_norm',
    'trust_coefficient'})


def _get(cfg: Any, key: str, default: Any = None) -> Any:
  """Works for dicts and ml_collections.ConfigDict (both have .get)."""
  value = cfg.get(key, default)
  return default if value is None else value


def _check_keys(cfg: Any) -> None:
  unknown = set(cfg.keys()) - KNOWN_KEYS
  if unknown:
    raise ValueError(f'optimizer config: unknown keys {sorted(unknown)}; known: {sorted(KNOWN_KEYS)}')


def _choice(cfg: Any, key: str, default: str, allowed: tuple[str, ...]) -> str:
  value = _get(cfg, key, default)
  if value not in allowed:
    raise ValueError(f'optimizer config: {key}={value!r} is not one of {allowed}')
  return value


def scaled_learning_rate(cfg: Any, global_batch_size: int) -> float:
  """Base lr × B/base_batch_size (linear) or × sqrt(B/base_batch_size) (sqrt), or unchanged (none)."""
  if _get(cfg, 'lr') is None:
    raise ValueError('optimizer config: lr (base learning rate) is required')
  lr = float(_get(cfg, 'lr'))
  scaling = _choice(cfg, 'lr_scaling', 'none', LR_SCALINGS)
  if scaling == 'none':
    return lr
  base = _get(cfg, 'base_batch_size')
  if not base or base <= 0 or global_batch_size <= 0:
    raise ValueError(f'optimizer config: lr_scaling={scaling!r} needs base_batch_size > 0 and a positive '
                     f'global batch size, got base_batch_size={base}, global_batch_size={global_batch_size}')
  ratio = global_batch_size / base
  return lr * (ratio if scaling == 'linear' else math.sqrt(ratio))


def warmup_steps_of(cfg: Any, total_steps: int) -> int:
  """warmup_steps, or round(warmup_fraction × total_steps); 0/unset means none; setting both is an error."""
  steps = int(_get(cfg, 'warmup_steps', 0))
  fraction = float(_get(cfg, 'warmup_fraction', 0.0))
  if steps < 0 or not 0.0 <= fraction < 1.0:
    raise ValueError(f'optimizer config: need warmup_steps >= 0 and 0 <= warmup_fraction < 1, got '
                     f'warmup_steps={steps}, warmup_fraction={fraction}')
  if steps and fraction:
    raise ValueError(f'optimizer config: set warmup_steps ({steps}) or warmup_fraction ({fraction}), not both')
  return steps or round(fraction * total_steps)


def make_schedule(cfg: Any, total_steps: int, global_batch_size: int) -> optax.Schedule:
  """Learning rate per step. constant: linear warm-up (if any) then the scaled lr; warmup_cosine: linear
  warm-up from 0 to the scaled lr, cosine decay to lr × end_lr_factor at total_steps."""
  lr = scaled_learning_rate(cfg, global_batch_size)
  schedule = _choice(cfg, 'schedule', 'constant', SCHEDULES)
  warmup = warmup_steps_of(cfg, total_steps)
  if schedule == 'constant':
    if warmup == 0:
      return optax.constant_schedule(lr)
    return optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  if total_steps <= warmup:
    raise ValueError(f'optimizer config: warmup_cosine needs total_steps ({total_steps}) > warmup steps '
                     f'({warmup})')
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup, decay_steps=total_steps,
      end_value=lr * float(_get(cfg, 'end_lr_factor', 0.0)))


def kernel_mask(params: Any) -> Any:
  """True for leaves named 'kernel' (conv/dense weights), False for biases, BN scale/bias and the rest."""
  def is_kernel(path, _):
    last = path[-1] if path else None
    name = getattr(last, 'key', getattr(last, 'name', None))
    return name == 'kernel'
  mask = jax.tree_util.tree_map_with_path(is_kernel, params)
  if not any(jax.tree_util.tree_leaves(mask)):
    raise ValueError('kernel-only weight decay / trust ratio found no parameter named "kernel" in params')
  return mask


def make_optimizer(cfg: Any, *, total_steps: int, global_batch_size: int) -> optax.GradientTransformation:
  """The optimiser named by cfg.name on the schedule from `make_schedule`, after optional global-norm
  clipping. adam/sgd apply weight decay as L2 on the gradient (torch semantics), adamw decoupled."""
  if isinstance(cfg, Mapping) or hasattr(cfg, 'keys'):
    _check_keys(cfg)
  name = _choice(cfg, 'name', 'adam', OPTIMIZERS)
  schedule = make_schedule(cfg, total_steps, global_batch_size)
  weight_decay = float(_get(cfg, 'weight_decay', 0.0))
  b1, b2, eps = float(_get(cfg, 'b1', 0.9)), float(_get(cfg, 'b2', 0.999)), float(_get(cfg, 'eps', 1e-8))
  momentum = float(_get(cfg, 'momentum', 0.9))
  nesterov = bool(_get(cfg, 'nesterov', False))
  l2 = [optax.add_decayed_weights(weight_decay, mask=kernel_mask)] if weight_decay else []

  if name == 'adam':
    core = optax.chain(*l2, optax.adam(schedule, b1=b1, b2=b2, eps=eps))
  elif name == 'adamw':
    core = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=kernel_mask)
  elif name == 'sgd':
    core = optax.chain(*l2, optax.sgd(schedule, momentum=momentum or None, nesterov=nesterov))
  else:
    core = optax.lars(schedule, weight_decay=weight_decay, weight_decay_mask=kernel_mask,
                      trust_coefficient=float(_get(cfg, 'trust_coefficient', 0.001)),
                      trust_ratio_mask=kernel_mask, momentum=momentum, nesterov=nesterov)

  clip_norm = float(_get(cfg, 'grad_clip_norm', 0.0))
  if clip_norm < 0:
    raise ValueError(f'optimizer config: grad_clip_norm must be >= 0 (0 = off), got {clip_norm}')
  if clip_norm:
    return optax.chain(optax.clip_by_global_norm(clip_norm), core)
  return core


def freeze_subtree(tx: optax.GradientTransformation, name: str) -> optax.GradientTransformation:
  """`tx` for every parameter except those under a module called `name` (e.g. 'encoder'), which get zero
  updates (and no optimizer state, weight decay or momentum)."""
  def labels(params):
    def label(path, _):
      keys = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
      return 'frozen' if name in keys else 'trained'
    tree = jax.tree_util.tree_map_with_path(label, params)
    if 'frozen' not in jax.tree_util.tree_leaves(tree):
      raise ValueError(f'freeze_subtree: no parameter lies under a module named {name!r}')
    return tree
  return optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)
