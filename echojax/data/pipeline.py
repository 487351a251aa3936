"""tf.data input pipelines over echojax TFDS records: SSL pairs (SimCLR / multi-instance, optional frame order),
fine-tuning clips and multi-clip evaluation, sharded per JAX process.

Frames are read encoded (one PNG per frame); each element picks its clip's frame strings BEFORE the shuffle
buffer and decodes only those. All randomness is stateless, seeded per element from (seed, process, element
index), so a run is reproducible and independent of parallelism.
"""
from __future__ import annotations

import functools
import importlib
import os
import logging
from typing import Any, Optional, Sequence

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from echojax.data import augment as augment_lib
from echojax.data import options as data_options
from echojax.data import records
from echojax.data.augment import permutation_index, permutation_table  # noqa: F401 (public API)
from echojax.data.clip_sampling import (decode_and_augment, eval_clips, eval_clips_of_frames,
                                        multi_instance_elements, single_clip_elements)

MODES = ('simclr', 'multi_instance', 'finetune', 'eval')
_TRAIN_CYCLE_LENGTH = 4                              # files read at once when training (mixes studies)
_log = logging.getLogger(__name__)


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults of every key `make_dataset` reads from `cfg`."""
  return ml_collections.ConfigDict(data_options.pipeline_defaults())


def _as_dict(cfg) -> dict:
  return {} if cfg is None else (cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg))


def _resolve_config(cfg: Any) -> ml_collections.ConfigDict:
  """Defaults overlaid with `cfg` (ConfigDict or mapping; keys it does not know are ignored)."""
  out = default_data_config()
  for key, value in _as_dict(cfg).items():
    if key == 'augment':
      out.augment.update(_as_dict(value))
    elif key in out:
      out[key] = value
  if out.pairs_per_study not in ('all', 'one'):
    raise ValueError(f"cfg.pairs_per_study must be 'all' or 'one', got {out.pairs_per_study!r}")
  return out


def project_builders() -> list[str]:
  """Names of the TFDS builders under data_builders/ (one folder each)."""
  import data_builders
  root = os.path.dirname(data_builders.__file__)
  return sorted(d for d in os.listdir(root)
                if os.path.isfile(os.path.join(root, d, f'{d}_dataset_builder.py')))


def _builder_module(name: str):
  """`data_builders.<name>.<name>_dataset_builder`, or None when `name` is not one of the project's."""
  if not name.isidentifier():
    return None
  module_name = f'data_builders.{name}.{name}_dataset_builder'
  try:
    return importlib.import_module(module_name)
  except ModuleNotFoundError as e:  # not one of ours: fall back to a registered name
    if e.name not in (module_name, f'data_builders.{name}'):
      raise
    return None


def builder_config_names(name: str) -> list[str]:
  module = _builder_module(name)
  configs = getattr(getattr(module, 'Builder', None), 'BUILDER_CONFIGS', None) or []
  return list(dict.fromkeys(c.name for c in configs))   # a config may be registered once per version


def run_option_names(name: str) -> tuple[str, ...]:
  """Data-config keys a run hands the project's builder `name` as `Builder(options=...)` (view filters)."""
  return tuple(getattr(getattr(_builder_module(name), 'Builder', None), 'RUN_OPTIONS', ()))


def get_builder(name: str, builder_config: Optional[str] = None, data_dir: Optional[str] = None,
                **builder_kwargs):
  """The project's builder `name` (data_builders/<name>), else a TFDS-registered one."""
  kwargs = dict(data_dir=data_dir, **builder_kwargs)
  if builder_config:
    kwargs['config'] = builder_config
  module = _builder_module(name)
  if module is not None and hasattr(module, 'Builder'):
    return module.Builder(**kwargs)
  try:
    return tfds.builder(name, **kwargs)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f'unknown dataset {name!r}; the project\'s builders are: '
                     f'{", ".join(project_builders())} (or any dataset registered with TFDS)') from None


def _process_split(split: str, process_index: Optional[int], process_count: Optional[int]):
  if process_index is None or process_count is None:
    import jax  # lazily: only the data layer's default needs it
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  if process_count == 1:
    return split, 0, 1
  return (tfds.split_for_jax_process(split, process_index=process_index, process_count=process_count),
          process_index, process_count)


class _EncodedFrames(tfds.decode.SkipDecoding):
  """SkipDecoding for a frame sequence without TFDS' per-frame identity `tf.map_fn` (3x faster reads)."""

  def decode_batch_example(self, serialized_example):
    return serialized_example

  def decode_ragged_example(self, serialized_example):
    return serialized_example


def _read(builder, split, keys: Sequence[str], *, shuffle_files: bool, seed: int) -> tf.data.Dataset:
  """Records with only `keys` parsed; `video` stays a 1-D tensor of encoded frames."""
  features = builder.info.features
  missing = [k for k in keys if k not in features]
  if missing:
    raise ValueError(f'{builder.info.full_name}: no feature(s) {missing}; has {sorted(features.keys())}')
  decoders = tfds.decode.PartialDecoding(
      {k: True for k in keys}, decoders={'video': _EncodedFrames()} if 'video' in keys else None)
  read_config = tfds.ReadConfig(
      shuffle_seed=seed, try_autocache=False, add_tfds_id=False,
      # Study contiguity is not needed for correctness (grouping is by key), so training may interleave files.
      enable_ordering_guard=False, interleave_cycle_length=_TRAIN_CYCLE_LENGTH if shuffle_files else 1)
  return builder.as_dataset(split=split, shuffle_files=shuffle_files, decoders=decoders,
                            read_config=read_config)


def _filter_studies(ds: tf.data.Dataset, study_ids: Optional[Sequence[str]]) -> tf.data.Dataset:
  if study_ids is None:
    return ds
  study_ids = [s.decode() if isinstance(s, bytes) else str(s) for s in study_ids]
  if not study_ids:
    raise ValueError('study_ids is empty: the dataset would have no examples')
  table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
      tf.constant(study_ids), tf.ones([len(study_ids)], tf.int32)), default_value=0)
  return ds.filter(lambda r: table.lookup(r['study_id']) > 0)


def _slim(r, label_key: Optional[str]):
  out = dict(video=r['video'], num_frames=tf.shape(r['video'])[0], video_id=r['video_id'],
             study_id=r['study_id'])
  for k in ('study_index', 'study_num_videos'):
    if k in r:
      out[k] = r[k]
  if label_key is not None:
    out['label'] = tf.cast(r[label_key], tf.float32)
  return out


def _shard_sizes(builder, split, process_count, study_ids):
  """Videos per process shard (from split metadata; with study_ids from the cached per-video metadata)."""
  if study_ids is None:
    return [builder.info.splits[tfds.split_for_jax_process(split, process_index=p, process_count=process_count)]
            .num_examples for p in range(process_count)]
  keep = {s.decode() if isinstance(s, bytes) else str(s) for s in study_ids}
  return [sum(r['study_id'] in keep for r in read_video_metadata(builder, split, p, process_count))
          for p in range(process_count)]


def _pad_batch(batch, batch_size: int):
  """Pads a (possibly short) last batch to `batch_size` with zeros / b'' / mask False."""
  def pad(x):
    missing = batch_size - tf.shape(x)[0]
    filler = tf.zeros(tf.concat([[missing], tf.shape(x)[1:]], 0), x.dtype)
    out = tf.concat([x, filler], 0)
    out.set_shape([batch_size] + x.shape[1:].as_list())
    return out
  return tf.nest.map_structure(pad, batch)


def make_dataset(builder, split: str, mode: str, *, batch_size: int, cfg=None, seed: int = 0,
                 process_index: Optional[int] = None, process_count: Optional[int] = None,
                 repeat: Optional[bool] = None, study_ids: Optional[Sequence[str]] = None,
                 label_key: str = 'severe_as', deterministic: bool = True) -> tf.data.Dataset:
  """Batched dict dataset for `mode`; `batch_size` is per process. Videos float32 in [0,1], S = image_size.

  simclr / multi_instance: views (B,2,T,S,S,1) with T = clip_len, views_study_id (B,), views_video_id (B,2)
    bytes, and order_label (B,2) int32 when cfg.frame_order. simclr: two augmentations of one clip;
    multi_instance: one clip of each of two distinct videos of a study (every pair, or one per study, per
    epoch); a lone video pairs with itself (two independent clips).
  finetune: video (B,L,S,S,1) with L = finetune_clip_len, label (B,) float32 (unknown/negative labels
    filtered out and counted), study_id, video_id.
  eval: video (B,N,L,S,S,1), N evenly spaced eval clips, label (B,) (-1 kept), study_id, video_id, mask (B,);
    file order, no shuffle; the last batch is padded (mask False), never dropped; with several processes
    every process yields the same number of batches (shards padded to the largest).
  Training modes shuffle files and a buffer of encoded clips, repeat by default and drop the remainder.
  """
  if mode not in MODES:
    raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  cfg = _resolve_config(cfg)
  frame_size = builder.info.features['video'].shape[1]
  if not 1 <= cfg.image_size <= frame_size:
    raise ValueError(f'cfg.image_size {cfg.image_size} must be in [1, {frame_size}] (frames are {frame_size}²)')
  if cfg.frame_order:
    permutation_table(cfg.clip_len)  # validates clip_len early
  training = mode != 'eval'
  repeat = training if repeat is None else repeat
  shard, process_index, process_count = _process_split(split, process_index, process_count)
  base_seed = tf.constant([seed, process_index], tf.int64)
  parallel = cfg.num_parallel_calls
  needs_label = mode in ('finetune', 'eval')
  keys = ['video', 'video_id', 'study_id', 'study_index', 'study_num_videos'] + ([label_key] if needs_label else [])
  ds = _read(builder, shard, keys, shuffle_files=training, seed=seed)
  ds = _filter_studies(ds, study_ids)
  ds = ds.map(functools.partial(_slim, label_key=label_key if needs_label else None))

  if mode == 'eval':
    ds = ds.map(functools.partial(eval_clips, cfg=cfg, frame_size=frame_size), num_parallel_calls=parallel,
                deterministic=True)
    if process_count > 1:  # every process must run the same number of eval steps: pad to the largest shard
      sizes = _shard_sizes(builder, split, process_count, study_ids)
      filler = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype), ds.element_spec)
      padding = -(-max(sizes) // batch_size) * batch_size - sizes[process_index]
      ds = ds.concatenate(tf.data.Dataset.from_tensors(filler).repeat(padding))
    ds = ds.batch(batch_size).map(functools.partial(_pad_batch, batch_size=batch_size))
    if repeat:
      ds = ds.repeat()
  else:
    if mode == 'finetune':
      _log_unknown_labels(builder, split, process_index, process_count, study_ids, label_key)
      ds = ds.filter(lambda r: r['label'] >= 0)  # NaN compares False too
    if mode == 'multi_instance':
      ds = multi_instance_elements(ds, cfg, base_seed, repeat)
    else:
      ds = single_clip_elements(ds.repeat() if repeat else ds, mode, cfg, base_seed)
    ds = ds.shuffle(cfg.shuffle_buffer, seed=seed)
    ds = ds.map(functools.partial(decode_and_augment, mode=mode, cfg=cfg, frame_size=frame_size),
                num_parallel_calls=parallel, deterministic=deterministic)
    ds = ds.batch(batch_size, drop_remainder=True)

  options = tf.data.Options()
  options.deterministic = deterministic or mode == 'eval'
  return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def as_numpy(ds: tf.data.Dataset):
  """Iterator of dicts of numpy arrays (strings as bytes)."""
  return iter(tfds.as_numpy(ds))


_METADATA_CACHE = {}
_LOGGED_UNKNOWN = set()
UNKNOWN_LABEL_COUNTS = {}  # (builder, split, shard, study_ids, label_key) -> (dropped, seen); for logs/tests


def _read_metadata(builder, split):
  features = builder.info.features
  keys = [k for k, f in features.items() if k != 'video' and tuple(f.shape) == ()]
  ds = builder.as_dataset(split=split, shuffle_files=False,
                          decoders=tfds.decode.PartialDecoding({k: True for k in keys}),
                          read_config=tfds.ReadConfig(try_autocache=False, interleave_cycle_length=1))

  def convert(key, value):
    if isinstance(features[key], tfds.features.ClassLabel):
      return features[key].int2str(int(value))
    return value.decode('utf-8') if isinstance(value, bytes) else getattr(value, 'item', lambda: value)()
  return tuple({k: convert(k, r[k]) for k in keys} for r in tfds.as_numpy(ds))


def read_video_metadata(builder, split: str, process_index: Optional[int] = None,
                        process_count: Optional[int] = None) -> list:
  """One dict per video of this process's shard, every scalar feature (no video decoded or even parsed).

  Text -> str, ClassLabel (av_stenosis) -> its name, numbers -> Python scalars. Cached per shard.
  """
  shard, process_index, process_count = _process_split(split, process_index, process_count)
  key = (builder.info.full_name, str(builder.data_dir), str(shard))
  if key not in _METADATA_CACHE:
    _METADATA_CACHE[key] = _read_metadata(builder, shard)
  return [dict(r) for r in _METADATA_CACHE[key]]


def _log_unknown_labels(builder, split, process_index, process_count, study_ids, label_key):
  """Counts (once per builder/split/label) the videos the finetune filter drops for an unknown label."""
  key = (builder.info.full_name, str(builder.data_dir), split, process_index, process_count,
         None if study_ids is None else tuple(sorted(map(str, study_ids))), label_key)
  if key in _LOGGED_UNKNOWN:
    return
  _LOGGED_UNKNOWN.add(key)
  rows = read_video_metadata(builder, split, process_index, process_count)
  if study_ids is not None:
    keep = {s.decode() if isinstance(s, bytes) else str(s) for s in study_ids}
    rows = [r for r in rows if r['study_id'] in keep]
  unknown = sum(1 for r in rows if not (isinstance(r.get(label_key), (int, float)) and r[label_key] >= 0))
  _log.warning('finetune %s[%s] (process %d/%d): dropping %d of %d videos with unknown %r',
               builder.info.full_name, split, process_index, process_count, unknown, len(rows), label_key)
  UNKNOWN_LABEL_COUNTS[key] = (unknown, len(rows))


def eval_clips_for_video(frames, cfg=None):
  """The eval clips of one raw uint8 video (T, S, S) under data config `cfg` (what predict and saliency feed
  the model; identical to `make_dataset(..., 'eval')` for the same frames)."""
  return eval_clips_of_frames(frames, _resolve_config(cfg))
