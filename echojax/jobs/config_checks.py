"""Config validation before any work: every key's type and tuple shape against the config file's own
defaults (the same mode and variant), allowed values and ranges (from the modules that own them), and
cross-key checks; all problems are reported together in one ConfigError line. The dataset-dependent part
(builder name and config, clip lengths vs the videos' frames) runs once the data is known."""
from __future__ import annotations

import difflib
import importlib
import math

import ml_collections

from echojax.jobs.errors import ConfigError

JOBS = ('ssl', 'finetune', 'evaluate', 'demo')


def reference_config(cfg) -> ml_collections.ConfigDict:
  """The unmodified config of cfg's mode and variant (what its types and shapes must match)."""
  mode = cfg.get('mode')
  if mode not in JOBS:
    raise ConfigError(f'unknown config.mode {mode!r}; choose one of {", ".join(JOBS)}')
  module = importlib.import_module(f'configs.{mode}')
  variants = getattr(module, 'VARIANTS', ())
  return module.get_config(cfg.get('variant') if cfg.get('variant') in variants else None)


def _kind(value) -> str:
  return 'bool' if isinstance(value, bool) else type(value).__name__


def _same_type(ref, value) -> bool:
  if isinstance(ref, bool) or isinstance(value, bool):
    return isinstance(ref, bool) and isinstance(value, bool)
  if isinstance(ref, float):
    return isinstance(value, (int, float)) and math.isfinite(value)
  if isinstance(ref, (int, str)):
    return type(value) is type(ref)
  return True


def _optional_keys() -> set[str]:
  """Keys whose shared default (configs/common.py) is None: None stays a valid value wherever a variant
  sets them (e.g. `data.min_plax_prob`, 0.5 in the paper variants)."""
  from configs import common
  blocks = dict(data=common.data_config(), model=common.model_config(), optim=common.optim_config(),
                distributed=common.distributed_config())
  return {f'{b}.{k}' for b, block in blocks.items() for k, v in block.items() if v is None}


def _check_types(ref, cfg, path: str, problems: list) -> None:
  for key in cfg.keys():
    if key not in ref:
      close = difflib.get_close_matches(key, list(ref.keys()), n=1)
      problems.append(f'{path}{key}: unknown key' + (f' (did you mean {path}{close[0]}?)' if close else ''))
  for key, want in ref.items():
    name = f'{path}{key}'
    if key not in cfg:
      problems.append(f'{name}: missing')
      continue
    got = cfg[key]
    if got is None and any(name == k or name.endswith('.' + k) for k in _optional_keys()):
      continue
    if isinstance(want, ml_collections.ConfigDict):
      if isinstance(got, (ml_collections.ConfigDict, dict)):
        _check_types(want, ml_collections.ConfigDict(got) if isinstance(got, dict) else got, name + '.',
                     problems)
      else:
        problems.append(f'{name}: expected a block of keys, got {got!r}')
    elif isinstance(want, (tuple, list)):
      elements = [w for w in want if w is not None]
      if not isinstance(got, (tuple, list)):
        problems.append(f'{name}: expected a tuple, got {got!r}')
      elif elements and not all(_same_type(elements[0], g) for g in got):
        problems.append(f'{name}: expected a tuple of {_kind(elements[0])}, got {tuple(got)!r}')
    elif want is not None and not _same_type(want, got):
      finite = ' (finite)' if isinstance(want, float) else ''
      problems.append(f'{name}: expected {_kind(want)}{finite}, got {got!r}')


def _one_of(allowed):
  return lambda v: None if v in allowed else f'must be one of {", ".join(map(str, allowed))}'


def _at_least(lo):
  return lambda v: None if v >= lo else f'must be ≥ {lo}'


def _between(lo, hi, *, lo_open=False, hi_open=False):
  def check(v):
    ok = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    return None if ok else f'must be in {"(" if lo_open else "["}{lo}, {hi}{")" if hi_open else "]"}'
  return check


def _depths(v):
  return None if len(v) == 4 and all(d >= 1 for d in v) else 'must be 4 positive ints (one per stage)'


def _float_dtype(v):
  import jax.numpy as jnp
  try:
    ok = v == 'auto' or jnp.issubdtype(jnp.dtype(v), jnp.floating)
  except TypeError:
    ok = False
  return None if ok else "must be 'auto' or a floating dtype name (float32, bfloat16, ...)"


def _rules() -> dict:
  """key (relative to a job's config) → check(value) → problem or None; only keys present are checked."""
  from echojax.core import optim, steps
  from echojax.jobs import model_init, tasks
  from echojax.models import conv, gradient_fork, heads
  positive = _at_least(1)
  fraction = _between(0.0, 1.0)
  return {
      'model.width': positive, 'model.stage_depths': _depths, 'model.conv_impl': _one_of(conv.CONV_IMPLS),
      'model.dtype': _float_dtype, 'model.projection': _one_of(heads.PROJECTION_KINDS),
      'model.bn_mode': _one_of(heads.BN_MODES), 'model.proj_hidden': positive, 'model.proj_dim': positive,
      'model.bn_group_size': _at_least(0), 'model.stem_motion_fraction': fraction,
      'data.clip_len': positive, 'data.clip_stride': positive, 'data.finetune_clip_len': positive,
      'data.eval_clip_len': positive, 'data.eval_num_clips': positive, 'data.shuffle_buffer': positive,
      'data.image_size': _between(16, 112), 'data.pairs_per_study': _one_of(('all', 'one')),
      'data.augment.pad': _at_least(0), 'data.augment.flip_prob': fraction,
      'data.augment.rotate_prob': fraction, 'data.augment.max_rotate_deg': _between(0, 180),
      'ssl.pairing': _one_of(('simclr', 'multi_instance')), 'ssl.temperature': _between(0, math.inf, lo_open=True),
      'ssl.order_weight': _at_least(0), 'ssl.contrastive_warmup_steps': _at_least(0),
      'ssl.order_only_steps': _at_least(0),
      'ssl.gradient_balance': _one_of(gradient_fork.GRADIENT_BALANCES),
      'ssl.order_input': _one_of(steps.ORDER_INPUTS),
      'optim.name': _one_of(optim.OPTIMIZERS), 'optim.lr_scaling': _one_of(optim.LR_SCALINGS),
      'optim.schedule': _one_of(optim.SCHEDULES), 'optim.lr': _at_least(0), 'optim.base_batch_size': positive,
      'optim.warmup_steps': _at_least(0), 'optim.warmup_fraction': _between(0, 1, hi_open=True),
      'optim.weight_decay': _at_least(0), 'optim.grad_clip_norm': _at_least(0),
      'optim.end_lr_factor': _at_least(0),
      'train.global_batch_size': positive, 'train.log_every_steps': positive,
      'train.checkpoint_every_steps': positive, 'train.keep_checkpoints': positive, 'train.patience': positive,
      'train.num_epochs': _at_least(0),      # num_steps, steps_per_epoch, stop_after_steps: ≤ 0 = unset
      'train.early_stopping_metric': _one_of(sorted({m for ms in tasks.VALIDATION_METRICS.values()
                                                     for m in ms})),
      'probe.every_steps': _at_least(0), 'probe.max_videos': positive, 'probe.batch_size': positive,
      'init': _one_of(model_init.INIT_KINDS), 'frac': _between(0, 1, lo_open=True),
      'task.dropout': _between(0, 1, hi_open=True), 'task.label_smoothing': _between(0, 1, hi_open=True),
      'task.dropout_on': _one_of(heads.DROPOUT_POSITIONS),
      'eval.batch_size': positive, 'eval.bootstrap_resamples': positive,
      'eval.ci_level': _between(0, 1, lo_open=True, hi_open=True),
      'eval.target_sensitivity': _between(0, 1, lo_open=True),
      'bootstrap_resamples': positive, 'ci_level': _between(0, 1, lo_open=True, hi_open=True),
      'distributed.mode': _one_of(('auto', 'off')), 'distributed.peer_timeout_s': _between(5, 90),
  }


def _get(cfg, dotted: str):
  node = cfg
  for part in dotted.split('.'):
    if not hasattr(node, 'keys') or part not in node:
      return _MISSING
    node = node[part]
  return node


_MISSING = object()


def _check_job(cfg, path: str, rules: dict, problems: list) -> None:
  for key, rule in rules.items():
    value = _get(cfg, key)
    if value is _MISSING:
      continue
    try:
      problem = rule(value)
    except TypeError:  # a type problem, already reported by _check_types
      continue
    if problem:
      problems.append(f'{path}{key}={value!r} {problem}')
  train = cfg.get('train')
  if train is not None and 'num_epochs' in train and train.get('num_steps', -1) <= 0 and train.num_epochs <= 0:
    problems.append(f'{path}train: no duration (num_steps is unset and num_epochs is {train.num_epochs})')
  optim_cfg = cfg.get('optim')
  if optim_cfg is not None and optim_cfg.get('warmup_steps', 0) and optim_cfg.get('warmup_fraction', 0.0):
    problems.append(f'{path}optim: set warmup_steps or warmup_fraction, not both')
  if cfg.get('mode') == 'evaluate' and not cfg.get('checkpoint'):
    problems.append('checkpoint is unset: --config.checkpoint=DIR (a fine-tuning workdir)')
  if cfg.get('init') not in (None, 'random') and not cfg.get('init_path'):
    problems.append(f'{path}init={cfg.init!r} needs init_path (an encoder export or an SSL workdir)')
  data = cfg.get('data')
  if data is not None and data.get('frame_order') and cfg.get('mode') == 'ssl':
    from echojax.data import augment  # TensorFlow: only once the cheap checks passed
    if not 1 <= data.clip_len <= augment.MAX_ORDER_CLIP_LEN:
      problems.append(f'{path}data.clip_len={data.clip_len} with frame_order: at most '
                      f'{augment.MAX_ORDER_CLIP_LEN} frames ({augment.MAX_ORDER_CLIP_LEN}! order classes)')


def _check_dataset(data, path: str, problems: list) -> None:
  """data.name is the project's builder (or a TFDS-registered one) and builder_config is one of its."""
  from echojax.data import pipeline, prepare
  name = data.get('name')
  if name not in pipeline.project_builders():
    import tensorflow_datasets as tfds
    try:
      tfds.builder_cls(name)
    except Exception:  # TFDS's own error lists every registered dataset: name only the project's
      problems.append(f'{path}data.name={name!r} is not a dataset here; the project\'s builders are: '
                      f'{", ".join(pipeline.project_builders())}')
      return
  try:
    prepare.builder_config_for(name, data.get('builder_config', ''))
  except ValueError as e:
    problems.append(f'{path}{e}')


def validate(cfg) -> None:
  """Raises ConfigError listing every problem of `cfg` (types first: they need no imports beyond JAX)."""
  problems: list[str] = []
  _check_types(reference_config(cfg), cfg, '', problems)
  if problems:
    raise ConfigError('config: ' + '; '.join(problems))
  rules = _rules()
  jobs = [(cfg, '')] + [(cfg[k], f'{k}.') for k in ('pretrain', 'finetune') if cfg.get('mode') == 'demo']
  for job, path in jobs:
    _check_job(job, path, rules, problems)
  if cfg.get('mode') == 'demo' and not set(cfg.inits) <= {'ssl', 'random'}:
    problems.append(f'inits={tuple(cfg.inits)!r} must be ssl and/or random (the demo has no Kinetics weights)')
  if not problems:
    for job, path in jobs:
      if job.get('data') is not None:
        _check_dataset(job.data, path, problems)
  if problems:
    raise ConfigError('config: ' + '; '.join(problems))


def check_clips_fit(data, meta: list[dict], split: str, log=print) -> None:
  """Clip spans vs the videos' frame counts: a span longer than every video is an error (all clips would
  be padding); longer than some videos is logged (those clips are zero-padded)."""
  frames = [int(m['num_frames']) for m in meta if 'num_frames' in m]
  if not frames:
    return
  spans = {'clip_len': (data.clip_len - 1) * data.clip_stride + 1, 'finetune_clip_len': data.finetune_clip_len,
           'eval_clip_len': data.eval_clip_len}
  too_long = {k: s for k, s in spans.items() if s > max(frames)}
  if too_long:
    raise ConfigError(f'config: data.{", data.".join(too_long)} span {", ".join(map(str, too_long.values()))} '
                      f'frames, but the longest {split} video has {max(frames)}')
  short = {k: sum(f < s for f in frames) for k, s in spans.items() if s > min(frames)}
  for k, n in short.items():
    log(f'note: data.{k} spans {spans[k]} frames; {n} of {len(frames)} {split} videos are shorter '
        '(their clips are zero-padded)')
