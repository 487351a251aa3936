"""Raw frames of chosen videos of a split (for Grad-CAM panels and the valve-box score): frames stay encoded
until the study filter has run, so only the chosen studies' PNGs are decoded."""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import tensorflow as tf
import tensorflow_datasets as tfds


def read_study_videos(builder, split: str, study_ids: Optional[Sequence[str]] = None,
                      extra_keys: Sequence[str] = ('valve_box',), limit: Optional[int] = None) -> Iterator[dict]:
  """Yields {'study_id', 'video_id', 'frames' uint8 (T, H, W), and each of `extra_keys` the split has} in
  file order, for the videos of `study_ids` (None: all), at most `limit` of them."""
  features = builder.info.features
  extras = [k for k in extra_keys if k in features]
  keys = ['video', 'video_id', 'study_id'] + extras
  decoders = tfds.decode.PartialDecoding({k: True for k in keys}, decoders={'video': tfds.decode.SkipDecoding()})
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                          read_config=tfds.ReadConfig(try_autocache=False, interleave_cycle_length=1))
  if study_ids is not None:
    wanted = tf.constant(sorted({s.decode() if isinstance(s, bytes) else str(s) for s in study_ids}) or [''])
    ds = ds.filter(lambda r: tf.reduce_any(tf.equal(r['study_id'], wanted)))
  if limit is not None:
    ds = ds.take(limit)
  frame_spec = tf.TensorSpec(features['video'].shape[1:], tf.uint8)
  ds = ds.map(lambda r: {**r, 'video': tf.map_fn(lambda png: tf.io.decode_png(png, channels=1), r['video'],
                                                 fn_output_signature=frame_spec)})
  for ex in tfds.as_numpy(ds):
    out = {'study_id': ex['study_id'].decode(), 'video_id': ex['video_id'].decode(), 'frames': ex['video'][..., 0]}
    out.update({k: ex[k] for k in extras})
    yield out
