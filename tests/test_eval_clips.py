"""One eval-clip preparation for every consumer: the clips `predict` and Grad-CAM build from a raw video
(`pipeline.eval_clips_for_video`) equal the eval pipeline's for the same frames, at the native size and
downscaled, with per-clip min–max on and off."""
import numpy as np
import pytest

from echojax.data import pipeline
from tests import tfds_fixtures as fx


@pytest.fixture(scope='module')
def builder(tmp_path_factory):
  return fx.make_tiny_builder(str(tmp_path_factory.mktemp('tfds')), realistic=True)


@pytest.mark.parametrize('image_size', [112, 64])
@pytest.mark.parametrize('minmax', [True, False])
def test_raw_video_clips_equal_the_eval_pipeline(builder, image_size, minmax):
  cfg = pipeline.default_data_config()
  cfg.image_size = image_size
  cfg.augment.minmax = minmax
  cfg.eval_clip_len, cfg.eval_num_clips = 8, 3
  ds = pipeline.make_dataset(builder, 'train', 'eval', batch_size=1, cfg=cfg)
  from_pipeline = {b['video_id'][0].decode() if isinstance(b['video_id'][0], bytes) else str(b['video_id'][0]):
                   b['video'][0] for b in pipeline.as_numpy(ds) if b['mask'][0]}
  raw = {ex['video_id'].decode(): ex['video'][..., 0] for ex in pipeline.as_numpy(builder.as_dataset(split='train'))}
  assert from_pipeline and set(from_pipeline) == set(raw)
  for vid, frames in raw.items():
    clips = pipeline.eval_clips_for_video(frames, cfg)
    assert clips.shape == (3, 8, image_size, image_size, 1) and clips.dtype == np.float32
    np.testing.assert_array_equal(clips, from_pipeline[vid], err_msg=vid)
  some = next(iter(raw.values()))
  scaled = pipeline.eval_clips_for_video(some, cfg)
  valid = scaled[np.abs(scaled).sum(axis=(2, 3, 4)) > 0]
  if minmax:   # min–max gives each clip exactly [0, 1]; without it the raw grey levels stay
    assert valid.min() == 0.0 and valid.max() == 1.0
  else:
    assert valid.max() > 1.0


def test_short_video_is_zero_padded_like_the_pipeline():
  cfg = pipeline.default_data_config()
  cfg.eval_clip_len, cfg.eval_num_clips, cfg.image_size = 16, 2, 112
  frames = (np.arange(5 * 112 * 112) % 251).astype(np.uint8).reshape(5, 112, 112)
  clips = pipeline.eval_clips_for_video(frames, cfg)
  assert clips.shape == (2, 16, 112, 112, 1)
  assert np.all(clips[:, 5:] == 0) and np.all(clips[:, :5].max(axis=(1, 2, 3, 4)) == 1.0)


def test_pipeline_defaults_live_in_one_place():
  from configs import common
  from echojax.data import options, records
  assert options.PIPELINE['image_size'] == records.FRAME_SIZE
  data = common.data_config().to_dict()
  for key, value in options.pipeline_defaults().items():
    assert data[key] == value, key
  assert pipeline.default_data_config().to_dict() == options.pipeline_defaults()
