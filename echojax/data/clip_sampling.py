"""Per-element clip construction of the tf.data pipeline (`pipeline.make_dataset`): which encoded frames
each element uses (stateless draws seeded by (seed, process, element index)), SSL views and multi-instance
study pairs, decode -> augment -> resize -> min-max of training clips, and the evenly spaced eval clips.
"""
from __future__ import annotations

import functools

import tensorflow as tf

from echojax.data import augment as augment_lib
from echojax.data import records
from echojax.data.augment import permutation_table

_STUDY_KEY_BASE = records.MAX_VIDEOS_PER_STUDY + 1   # group key = study_index * base + study_num_videos
_ORDER_STREAM = 7                                    # fold-in constant: frame-order draw of a view
_PAIR_STREAM = 2**31 - 1                             # fold-in constant: 'one' pair choice of a study


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


def multi_instance_elements(ds, cfg, base_seed, repeat: bool):
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


def single_clip_elements(ds, mode, cfg, base_seed):
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


def decode_and_augment(element, mode, cfg, frame_size):
  """An element's encoded clips -> decoded, augmented SSL `views` or the finetune `video` (+ its ids, label)."""
  if mode != 'finetune':
    return _ssl_views(element, cfg, frame_size)
  frames = _decode(element['encoded'][0], element['encoded'].shape[1], frame_size, frame_size)
  video = _finish_clip(frames, element['valid'][0], element['view_seeds'][0], cfg, augment=True)
  return dict(video=video, label=element['label'], study_id=element['study_id'], video_id=element['video_id'])


def _eval_clip_index(num_frames, cfg):
  """Frame indices (N, L) of the eval clips (starts k*max((T-L)//N, 0)), their validity, and how many
  leading frames they use."""
  n, length = cfg.eval_num_clips, cfg.eval_clip_len
  step = tf.maximum((num_frames - length) // n, 0)
  idx = (tf.range(n)[:, None] * step + tf.range(length)[None, :])
  return idx, idx < num_frames, tf.minimum(num_frames, (n - 1) * step + length)


def _finish_eval_clips(frames, idx, valid, used, cfg):
  """Decoded uint8 frames [0, used) → the (N, L, S, S, 1) eval clips: one implementation for records
  (`eval_clips`) and raw videos (`eval_clips_of_frames`)."""
  frames = tf.gather(frames, tf.minimum(idx, used - 1))
  return tf.stack([_finish_clip(frames[k], valid[k], None, cfg, augment=False)
                   for k in range(cfg.eval_num_clips)])


def eval_clips(r, cfg, frame_size):
  """eval_num_clips evenly spaced clips, resized then (optionally) min-maxed per clip, zero-padded tails."""
  idx, valid, used = _eval_clip_index(r['num_frames'], cfg)
  # Clips overlap when T < N*L: decode each needed frame once (frames [0, used)), then gather the clips.
  decoded = tf.map_fn(lambda png: tf.io.decode_png(png, channels=1), r['video'][:used],
                      fn_output_signature=tf.TensorSpec([frame_size, frame_size, 1], tf.uint8))
  clips = _finish_eval_clips(decoded, idx, valid, used, cfg)
  return dict(video=clips, label=r['label'], study_id=r['study_id'], video_id=r['video_id'],
              mask=tf.constant(True))


def eval_clips_of_frames(frames, cfg):
  """uint8 frames (T, S, S[, 1]) of a raw video → float32 (N, L, image_size, image_size, 1), exactly as the
  eval pipeline prepares a record's video (same indices, resize, min-max and padding)."""
  frames = tf.convert_to_tensor(frames, tf.uint8)
  if frames.shape.rank == 3:
    frames = frames[..., None]
  idx, valid, used = _eval_clip_index(tf.shape(frames)[0], cfg)
  return _finish_eval_clips(frames[:used], idx, valid, used, cfg).numpy()
