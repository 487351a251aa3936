"""Defaults of the input pipeline's options, in one place and free of TensorFlow: `configs/common.py`
builds its `data` block from them and the pipeline fills any option a caller leaves out from them."""
from __future__ import annotations

AUGMENT = dict(
    enabled=True, pad=8, flip_prob=0.5, rotate_prob=0.5, max_rotate_deg=10,
    minmax=True,                     # per-clip min–max to [0, 1] after augmentation/resizing
)

PIPELINE = dict(
    clip_len=4, clip_stride=1,       # SSL clips: frames, temporal stride
    finetune_clip_len=16, eval_num_clips=4, eval_clip_len=16,
    frame_order=False,               # EchoCLR: shuffle each view's frames, label = permutation index
    pairs_per_study='all',           # 'all' unordered pairs of a study's videos per epoch (paper) | 'one'
    image_size=112,                  # = records.FRAME_SIZE; < 112 resizes clips after augmentation (CPU presets only)
    shuffle_buffer=1024,
    num_parallel_calls=-1,           # tf.data map parallelism; -1 = tf.data.AUTOTUNE
)


def pipeline_defaults() -> dict:
  """A fresh copy of every pipeline option with its default (`augment` included)."""
  return dict(PIPELINE, augment=dict(AUGMENT))
