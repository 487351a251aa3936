"""tf.data input pipelines over echojax TFDS records: SSL pairs (SimCLR / multi-instance, optional frame order),
fine-tuning clips and multi-clip evaluation, sharded per JAX process.

Frames are read encoded (one PNG per frame); each element picks its clip's frame strings BEFORE the shuffle
buffer and decodes only those. All randomness is stateless, seeded per element from (seed, process, element
index), so a run is reproducible and independent of parallelism.
"""
from __future__ import annotations

import functools
import importlib
import logging
from typing import Any, Optional, Sequence

import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from echojax.data import augment as augment_lib
from echojax.data import records
from echojax.data.augment import permutation_index, permutation_table  # noqa: F401 (public API)

MODES = ('simclr', 'multi_instance', 'finetune', 'eval')
_STUDY_KEY_BASE = records.MAX_VIDEOS_PER_STUDY + 1   # group key = study_index * base + study_num_videos
_TRAIN_CYCLE_LENGTH = 4                              # files read at once when training (mixes studies)
_ORDER_STREAM = 7                                    # fold-in constant: frame-order draw of a view
_PAIR_STREAM = 2**31 - 1                             # fold-in constant: 'one' pair choice of a study
_log = logging.getLogger(__name__)


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults of every key `make_dataset` reads from `cfg`."""
  return ml_collections.ConfigDict(dict(
      clip_len=4, clip_stride=1, finetune_clip_len=16, eval_num_clips=4, eval_clip_len=16,
      frame_order=False, pairs_per_study='all', image_size=records.FRAME_SIZE,
      augment=dict(augment_lib.DEFAULT_AUGMENT), shuffle_buffer=1024,
      num_parallel_calls=tf.data.AUTOTUNE))


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


def get_builder(name: str, builder_config: Optional[str] = None, data_dir: Optional[str] = None):
  """Imports `data_builders.<name>.<name>_dataset_builder` when it exists and returns the TFDS builder."""
  kwargs = dict(data_dir=data_dir)
  if builder_config:
    kwargs['config'] = builder_config
  module = None
  if name.isidentifier():
    module_name = f'data_builders.{name}.{name}_dataset_builder'
    try:
      module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:  # not one of ours: fall back to a registered name
      if e.name not in (module_name, f'data_builders.{name}'):
        raise
  if module is not None and hasattr(module, 'Builder'):
    return module.Builder(**kwargs)
  return tfds.builder(name, **kwargs)


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


def _draw_clips(video, num_frames, count, clip_len: int, stride: int, seed):
  """`count` random-start clips of a video's ENCODED frames: (count, L) strings + validity (False = padding)."""
  max_start = tf.maximum(num_frames - (clip_len - 1) * stride - 1, 0)
  starts = tf.random.stateless_uniform([count], seed, minval=0, maxval=max_start + 1, dtype=tf.int32)
  idx = starts[:, None] + tf.range(clip_len, dtype=tf.int32)[None, :] * stride
  return tf.gather(video, tf.minimum(idx, num_frames - 1)), idx < num_frames


def _decode(encoded: tf.Tensor, count: int, height: int, width: int) -> tf.Tensor:
  """Decodes `count` PNG strings (static) into uint8 (count, H, W, 1); unrolled, no map_fn overhead."""
  frames = tf.stack([tf.io.decode_png(encoded[i], channels=1) for i in range(count)])
  return tf.ensure_shape(frames, [count, height, width, 1])


def _finish_clip(clip, valid, seed, cfg, augment: bool):
  """Augment (optional) -> area-resize to cfg.image_size -> per-clip min-max -> zero the padded frames."""
  clip = augment_lib.augment_clip(clip, seed, cfg.augment) if augment else tf.cast(clip, tf.float32)
  if cfg.image_size != clip.shape[1]:
    clip = tf.image.resize(clip, [cfg.image_size, cfg.image_size], method='area')
  if cfg.augment.minmax:
    clip = augment_lib.minmax_scale(clip)
  return clip * tf.cast(valid, tf.float32)[:, None, None, None]


def _element_seed(base_seed, index):
  return tf.random.experimental.stateless_fold_in(base_seed, tf.cast(index, tf.int64))


def _ssl_views(element, cfg, frame_size):
  """K (1 or 2) clips of encoded frames -> `views` (2, T, S, S, 1) [+ `order_label` (2,)].

  View v shows clip min(v, K-1), augmented with element['view_seeds'][v].
  """
  enc, valid = element['encoded'], element['valid']
  num_clips, clip_len = enc.shape[0], enc.shape[1]
  frames = _decode(tf.reshape(enc, [-1]), num_clips * clip_len, frame_size, frame_size)
  frames = tf.reshape(frames, [num_clips, clip_len, frame_size, frame_size, 1])
  views, orders = [], []
  for v in range(2):
    clip_id = min(v, num_clips - 1)
    view_seed = element['view_seeds'][v]
    view = _finish_clip(frames[clip_id], valid[clip_id], view_seed, cfg, augment=True)
    if cfg.frame_order:
      table = tf.constant(permutation_table(clip_len))
      order = tf.random.stateless_uniform([], _element_seed(view_seed, _ORDER_STREAM), minval=0,
                                          maxval=table.shape[0], dtype=tf.int32)
      view = tf.gather(view, table[order])
      orders.append(order)
    views.append(view)
  out = dict(views=tf.stack(views), views_study_id=element['study_id'], views_video_id=element['video_id'])
  if cfg.frame_order:
    out['order_label'] = tf.stack(orders)
  return out


def _study_pairs(num_videos, one_pair: bool, seed):
  """(pairs, clips), (P, 2) int32 each: the videos of each pair and which of their pre-drawn clips it uses.

  In 'all', video i's clip k goes to its pair with its k-th partner; a lone video pairs with itself using
  two independent clips (as the seed code, which loaded the same video twice).
  """
  if one_pair:
    seeds = tf.random.experimental.stateless_split(seed, num=2)
    i = tf.random.stateless_uniform([], seeds[0], minval=0, maxval=num_videos, dtype=tf.int32)
    j = tf.random.stateless_uniform([], seeds[1], minval=0, maxval=tf.maximum(num_videos - 1, 1),
                                    dtype=tf.int32)
    j = tf.where(num_videos > 1, j + tf.cast(j >= i, tf.int32), i)
    pairs, clips = tf.stack([i, j])[None], tf.zeros([1, 2], tf.int32)
  else:
    ii, jj = tf.meshgrid(tf.range(num_videos), tf.range(num_videos), indexing='ij')
    upper = ii < jj
    i, j = tf.boolean_mask(ii, upper), tf.boolean_mask(jj, upper)
    pairs, clips = tf.stack([i, j], axis=1), tf.stack([j - 1, i], axis=1)  # partner rank of j for i / i for j
  lone = tf.equal(num_videos, 1)
  return (tf.cond(lone, lambda: tf.zeros([1, 2], tf.int32), lambda: pairs),
          tf.cond(lone, lambda: tf.constant([[0, 1]], tf.int32), lambda: clips))


def _multi_instance_elements(ds, cfg, base_seed, repeat: bool):
  """Per-video records -> one element per pair of videos of a study, clip frames already chosen (encoded).

  Each video first draws the clips it will contribute (only their encoded frames are kept), so grouping a
  study holds a few frame strings per video, not whole videos. Epochs are explicit so a study window never
  spans two passes, and every draw is seeded by (seed, process, epoch, record index).
  """
  one_pair = cfg.pairs_per_study == 'one'

  def pick_clips(epoch_seed, index, r):
    seeds = tf.random.experimental.stateless_split(_element_seed(epoch_seed, index), num=3)
    n = tf.cast(r['study_num_videos'], tf.int32)
    count = tf.where(n == 1, 2, 1 if one_pair else n - 1)
    encoded, valid = _draw_clips(r['video'], r['num_frames'], count, cfg.clip_len, cfg.clip_stride, seeds[0])
    return dict(encoded=encoded, valid=valid,
                view_seeds=tf.random.experimental.stateless_split(seeds[1], num=count),
                pair_seed=seeds[2], video_id=r['video_id'], study_id=r['study_id'],
                study_index=r['study_index'], study_num_videos=r['study_num_videos'])

  def key_fn(r):
    return r['study_index'] * _STUDY_KEY_BASE + tf.cast(r['study_num_videos'], tf.int64)

  def window_to_study(key, window):
    del key
    return window.padded_batch(_STUDY_KEY_BASE)

  def study_to_pairs(study):
    num_videos = tf.shape(study['video_id'])[0]
    pairs, clips = _study_pairs(num_videos, one_pair,
                                _element_seed(study['pair_seed'][0], _PAIR_STREAM))
    at = tf.stack([pairs, clips], axis=-1)  # (P, 2, 2): (video, clip) of each view
    return dict(encoded=tf.gather_nd(study['encoded'], at), valid=tf.gather_nd(study['valid'], at),
                view_seeds=tf.gather_nd(study['view_seeds'], at),
                study_id=tf.fill([tf.shape(pairs)[0]], study['study_id'][0]),
                video_id=tf.gather(study['video_id'], pairs))

  def one_epoch(epoch):
    epoch_seed = _element_seed(base_seed, epoch)
    videos = ds.enumerate().map(functools.partial(pick_clips, epoch_seed))
    # A study's window closes once its study_num_videos records arrived; the rest of a study that a process
    # shard boundary cut is flushed at the end of the pass (pairs then come from the videos present here).
    studies = videos.group_by_window(key_fn, window_to_study,
                                     window_size_func=lambda key: key % _STUDY_KEY_BASE)
    return studies.map(study_to_pairs).unbatch()

  epochs = tf.data.Dataset.counter() if repeat else tf.data.Dataset.range(1)
  return epochs.flat_map(one_epoch)


def _single_clip_elements(ds, mode, cfg, base_seed):
  """simclr / finetune: one random clip per record (encoded frames), seeded by (seed, process, index)."""
  clip_len, stride = (cfg.finetune_clip_len, 1) if mode == 'finetune' else (cfg.clip_len, cfg.clip_stride)

  def pick_clip(index, r):
    seeds = tf.random.experimental.stateless_split(_element_seed(base_seed, index), num=3)
    encoded, valid = _draw_clips(r['video'], r['num_frames'], 1, clip_len, stride, seeds[0])
    out = dict(encoded=encoded, valid=valid, view_seeds=seeds[1:], study_id=r['study_id'],
               video_id=tf.stack([r['video_id']] * 2))
    if mode == 'finetune':
      out.update(label=r['label'], video_id=r['video_id'])
    return out

  return ds.enumerate().map(pick_clip)


def _decode_and_augment(element, mode, cfg, frame_size):
  if mode != 'finetune':
    return _ssl_views(element, cfg, frame_size)
  frames = _decode(element['encoded'][0], element['encoded'].shape[1], frame_size, frame_size)
  video = _finish_clip(frames, element['valid'][0], element['view_seeds'][0], cfg, augment=True)
  return dict(video=video, label=element['label'], study_id=element['study_id'], video_id=element['video_id'])


def _slim(r, label_key: Optional[str]):
  out = dict(video=r['video'], num_frames=tf.shape(r['video'])[0], video_id=r['video_id'],
             study_id=r['study_id'])
  for k in ('study_index', 'study_num_videos'):
    if k in r:
      out[k] = r[k]
  if label_key is not None:
    out['label'] = tf.cast(r[label_key], tf.float32)
  return out


def _eval_clips(r, cfg, frame_size):
  """eval_num_clips evenly spaced clips (starts k*max((T-L)//N, 0)), per-clip min-max, zero-padded tails."""
  n, length = cfg.eval_num_clips, cfg.eval_clip_len
  num_frames = r['num_frames']
  step = tf.maximum((num_frames - length) // n, 0)
  idx = (tf.range(n)[:, None] * step + tf.range(length)[None, :])
  valid = idx < num_frames
  # Clips overlap when T < N*L: decode each needed frame once (frames [0, used)), then gather the clips.
  used = tf.minimum(num_frames, (n - 1) * step + length)
  decoded = tf.map_fn(lambda png: tf.io.decode_png(png, channels=1), r['video'][:used],
                      fn_output_signature=tf.TensorSpec([frame_size, frame_size, 1], tf.uint8))
  frames = tf.gather(decoded, tf.minimum(idx, used - 1))
  clips = tf.stack([_finish_clip(frames[k], valid[k], None, cfg, augment=False) for k in range(n)])
  return dict(video=clips, label=r['label'], study_id=r['study_id'], video_id=r['video_id'],
              mask=tf.constant(True))


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
    ds = ds.map(functools.partial(_eval_clips, cfg=cfg, frame_size=frame_size), num_parallel_calls=parallel,
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
      ds = _multi_instance_elements(ds, cfg, base_seed, repeat)
    else:
      ds = _single_clip_elements(ds.repeat() if repeat else ds, mode, cfg, base_seed)
    ds = ds.shuffle(cfg.shuffle_buffer, seed=seed)
    ds = ds.map(functools.partial(_decode_and_augment, mode=mode, cfg=cfg, frame_size=frame_size),
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
