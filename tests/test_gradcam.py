"""Grad-CAM on layer4: shapes, the clip → video-frame placement (averaged over the clips that cover a frame),
the sector mask, the study figure (>= 224 px panels, one scale, colour bar), and that the map follows a local
cue — a tiny classifier is trained here to detect a small bright blob (a stand-in for the valve): moving
the blob moves the map, and the blob-box energy / pointing game beat random maps."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from echojax.core import steps
from echojax.evaluation import gradcam
from echojax.models import Classifier

T, S = 4, 32


def _clip(rng, blob_at=None):
  clip = rng.uniform(0, 0.3, (T, S, S, 1)).astype(np.float32)
  if blob_at is not None:
    y, x = blob_at
    clip[:, y:y + 6, x:x + 6] = 1.0
  return clip


@pytest.fixture(scope='module')
def blob_model():
  rng = np.random.default_rng(0)
  model = Classifier(encoder_kwargs=dict(width=4, stage_depths=(1, 1, 1, 1), conv_impl='xla'),
                     dropout_rate=0.0)
  tx = optax.adam(3e-3)
  state = steps.create_train_state(model, tx, jax.random.key(0, impl='rbg'), jnp.zeros((2, T, S, S, 1)))
  step = jax.jit(steps.make_finetune_train_step(model, tx))
  for i in range(150):
    labels = rng.integers(0, 2, 16)
    videos = np.stack([_clip(rng, tuple(rng.integers(0, S - 6, 2)) if y else None) for y in labels])
    state, metrics = step(state, {'video': videos, 'label': labels.astype(np.float32)}, jax.random.key(i))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  return model, variables, float(metrics['accuracy'])


def _video_cam(model, variables, clip):
  _, cams = gradcam.clip_cams(model, variables, jnp.asarray(clip[None]))
  return gradcam.video_cam(np.asarray(cams), T, T, S)


def test_clip_cams_shapes_and_sign(blob_model):
  model, variables, _ = blob_model
  clips = np.stack([_clip(np.random.default_rng(1), (4, 4)), _clip(np.random.default_rng(2))])
  logits, cams = gradcam.clip_cams(model, variables, jnp.asarray(clips))
  assert logits.shape == (2, 1) and cams.ndim == 4 and cams.shape[0] == 2
  assert float(cams.min()) >= 0
  # Each clip's map is its own (eval mode: clips are independent).
  _, alone = gradcam.clip_cams(model, variables, jnp.asarray(clips[:1]))
  np.testing.assert_allclose(np.asarray(cams[0]), np.asarray(alone[0]), rtol=1e-4, atol=1e-7)


def test_video_cam_averages_the_clips_covering_each_frame():
  from echojax.data import pipeline
  # 10 frames, 2 clips of 6: starts 0 and 2 (as the eval pipeline), frames 2..5 covered twice.
  np.testing.assert_array_equal(gradcam.eval_clip_starts(10, 2, 6), [0, 2])
  frames = np.tile(np.arange(10, dtype=np.uint8)[:, None, None] * 20, (1, 8, 8))
  clips = pipeline.eval_clips_for_video(frames, dict(eval_num_clips=2, eval_clip_len=6, image_size=8,
                                                    augment=dict(minmax=False)))
  assert clips[1, 0, 0, 0, 0] == clips[0, 2, 0, 0, 0] != clips[0, 0, 0, 0, 0]  # clip 1 starts at frame 2
  cams = np.stack([np.full((3, 2, 2), 1.0), np.full((3, 2, 2), 3.0)])
  video = gradcam.video_cam(cams, 10, 6, 8)
  assert video.shape == (10, 8, 8)
  np.testing.assert_allclose(video[:2], 1.0)
  np.testing.assert_allclose(video[2:6], 2.0)
  np.testing.assert_allclose(video[6:8], 3.0)
  assert np.isnan(video[8:]).all()     # no clip covers the last frames
  # Short video (zero-padded clips): only real frames are placed.
  assert gradcam.video_cam(cams, 4, 6, 8).shape == (4, 8, 8)


def test_sector_mask_is_the_hull_of_ever_lit_pixels():
  frames = np.zeros((3, 20, 20), np.uint8)
  yy, xx = np.mgrid[:20, :20]
  fan = (np.abs(xx - 10) <= yy * 0.6) & (yy < 18)
  frames[:, fan] = 40
  frames[1, 10, 10] = 0                       # a dark pixel inside the fan stays inside the mask
  mask = gradcam.sector_mask(frames)
  assert mask[10, 10] and not mask[0, 0] and not mask[19, 19]
  assert abs(int(mask.sum()) - int(fan.sum())) <= 0.15 * fan.sum()


def test_map_moves_with_the_local_cue_and_beats_random_maps_in_the_box(blob_model):
  model, variables, accuracy = blob_model
  assert accuracy > 0.8, 'the blob detector did not train'
  rng = np.random.default_rng(2)
  mask = np.ones((S, S), bool)
  peaks, energies, random_energies = {}, [], []
  for where in [(3, 3), (23, 23), (3, 23), (23, 3)]:
    cam = _video_cam(model, variables, _clip(rng, where))
    proj = np.nanmax(cam, axis=0)
    peaks[where] = np.unravel_index(np.argmax(proj), proj.shape)
    centre = (where[0] + 3, where[1] + 3)
    assert np.hypot(peaks[where][0] - centre[0], peaks[where][1] - centre[1]) < 10, (where, peaks[where])
    box = (where[1] - 2, where[0] - 2, where[1] + 8, where[0] + 8)    # (x0, y0, x1, y1) around the blob
    scores = gradcam.box_scores(cam, box, mask)
    baseline = gradcam.random_box_scores((1, 1, 2, 2), box, mask, T, T, n_maps=10, seed=1)
    energies.append(scores['energy'])
    random_energies.append(baseline['energy'])
    assert scores['area'] == pytest.approx(100 / S ** 2)
  assert len(set(peaks.values())) == 4
  # (The pointing game is too coarse for a 2×2 layer4 grid here: a plateau's first pixel is its peak.)
  assert np.mean(energies) > np.mean(random_energies) + 0.05


def test_box_scores_by_hand():
  cam = np.zeros((2, 10, 10), np.float32)
  cam[:, 2, 3] = 3.0
  cam[:, 8, 8] = 1.0
  mask = np.ones((10, 10), bool)
  scores = gradcam.box_scores(cam, (2, 1, 5, 4), mask)       # x 2..4, y 1..3 holds (y=2, x=3)
  assert scores == {'energy': pytest.approx(0.75), 'hit': 1.0, 'area': pytest.approx(0.09)}
  per_frame = gradcam.box_scores(cam, [(2, 1, 5, 4), (7, 7, 10, 10)], mask)
  assert per_frame['energy'] == pytest.approx((3 + 1) / 8)
  mask[:, 5:] = False                                          # outside the sector counts for nothing
  assert gradcam.box_scores(cam, (7, 7, 10, 10), mask)['energy'] == 0.0


def test_study_figure_panels_are_large_with_one_scale(blob_model, tmp_path):
  from PIL import Image
  model, variables, _ = blob_model
  rng = np.random.default_rng(3)
  videos = []
  for k in range(2):
    frames = (np.clip(_clip(rng, (10, 10))[..., 0], 0, 1) * 255).astype(np.uint8)
    videos.append({'video_id': f'v{k}', 'frames': frames, 'clips': _clip(rng, (10, 10))[None]})
  result = gradcam.study_saliency(model, variables, 'S1', videos, str(tmp_path), clip_len=T,
                                  caption='Study S1 · severe AS: score 0.9, threshold 0.4 → positive')
  image = Image.open(result['png'])
  width, height = image.size
  assert width >= 2 * 224 + 60 and height >= 2 * 224        # two panels per row, two rows
  assert result['vmax'] > 0 and len(result['peaks']) == 2
  assert all(0 <= p < T for p in result['peaks'])
