"""Tests of echojax.data.augment: one draw per clip, pad/crop/flip/rotation geometry, min-max, seeding."""
import numpy as np
import pytest
import scipy.ndimage
import tensorflow as tf

from echojax.data import augment


def _smooth_image(h=64, w=48):
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  return (200 * np.exp(-((yy - 20) ** 2 / 60 + (xx - 15) ** 2 / 30)) + 20 * np.sin(xx / 7.0) + 30)


def _seed(i):
  return tf.constant([i, 17], tf.int64)


def test_one_draw_per_clip_identical_frames():
  frame = _smooth_image()[None, :, :, None]
  clip = np.repeat(frame, 5, axis=0)
  for i in range(6):
    out = augment.augment_clip(tf.constant(clip), _seed(i)).numpy()
    assert out.dtype == np.float32 and out.shape == clip.shape
    np.testing.assert_array_equal(out, np.repeat(out[:1], 5, axis=0))


def test_one_draw_per_clip_distinct_frames():
  # The resampling is linear, so frame t = (t+1)*image must come out as (t+1)*the same augmented image.
  base = _smooth_image()
  clip = np.stack([(t + 1) * base for t in range(4)])[..., None]
  cfg = dict(rotate_prob=1.0, flip_prob=1.0)
  out = augment.augment_clip(tf.constant(clip), _seed(3), cfg).numpy()
  assert not np.allclose(out[0], clip[0])  # something happened
  for t in range(4):
    np.testing.assert_allclose(out[t] / (t + 1), out[0], rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize('flip_prob', [0.0, 1.0])
def test_pad_crop_flip_matches_numpy(flip_prob):
  img = np.arange(64 * 48, dtype=np.float32).reshape(64, 48) % 251 + 1
  cfg = dict(rotate_prob=0.0, flip_prob=flip_prob)
  shifts = set()
  for i in range(12):
    params = augment.sample_spatial_params(_seed(i), cfg)
    dx, dy = params['shift'].numpy()
    shifts.update([dx, dy])
    assert bool(params['flip']) == (flip_prob == 1.0) and int(params['angle_deg']) == 0
    out = augment.augment_clip(tf.constant(img[None, :, :, None]), _seed(i), cfg).numpy()[0, :, :, 0]
    padded = np.pad(img, 8)
    expected = padded[8 + dy:8 + dy + 64, 8 + dx:8 + dx + 48]  # crop offset (dx+8, dy+8) in [0, 16)
    if flip_prob:
      expected = expected[:, ::-1]
    np.testing.assert_allclose(out, expected, atol=1e-3)
    # The slicing fast path (angle 0) and the fused resampling agree exactly at integer shifts.
    matrix = augment.spatial_transform_matrix(64, 48, **params)
    fused = augment.apply_spatial(tf.constant(img[None, :, :, None]), matrix).numpy()[0, :, :, 0]
    np.testing.assert_allclose(fused, expected, atol=1e-3)
  assert min(shifts) >= -8 and max(shifts) <= 7 and len(shifts) > 4


@pytest.mark.parametrize('angle', [7, -10, 3])
def test_rotation_matches_scipy(angle):
  img = _smooth_image()
  matrix = augment.spatial_transform_matrix(64, 48, tf.constant([0, 0]), tf.constant(False),
                                            tf.constant(angle))
  out = augment.apply_spatial(tf.constant(img[None, :, :, None]), matrix).numpy()[0, :, :, 0]
  ref = scipy.ndimage.rotate(img, angle, reshape=False, order=1, mode='constant', cval=0.0)
  # Interior (away from the zero-filled corners, where boundary handling differs) agrees to float precision.
  np.testing.assert_allclose(out[8:-8, 8:-8], ref[8:-8, 8:-8], atol=1e-2)
  assert np.abs(out - ref).mean() < 0.01 * ref.max()  # whole frame, borders included


def test_parameter_distribution():
  draws = [augment.sample_spatial_params(_seed(i)) for i in range(300)]
  flips = np.mean([bool(d['flip']) for d in draws])
  angles = np.array([int(d['angle_deg']) for d in draws])
  assert 0.4 < flips < 0.6
  assert 0.3 < np.mean(angles == 0) < 0.6  # p=0.5 of no rotation (+ 1/21 of drawing 0)
  assert angles.min() >= -10 and angles.max() <= 10 and len(set(angles)) > 15


def test_minmax_scale():
  clip = tf.constant(np.random.default_rng(0).uniform(3, 9, (4, 8, 8, 1)), tf.float32)
  out = augment.minmax_scale(clip).numpy()
  assert out.min() == 0.0 and out.max() == pytest.approx(1.0)
  const = augment.minmax_scale(tf.fill([4, 8, 8, 1], 5.0)).numpy()
  assert np.all(const == 0) and not np.isnan(const).any()


def test_seeded_and_switchable():
  clip = tf.constant(_smooth_image()[None, :, :, None].repeat(2, 0))
  a = augment.augment_clip(clip, _seed(1)).numpy()
  np.testing.assert_array_equal(a, augment.augment_clip(clip, _seed(1)).numpy())
  assert any(not np.array_equal(a, augment.augment_clip(clip, _seed(i)).numpy()) for i in range(2, 6))
  off = augment.augment_clip(clip, _seed(1), dict(enabled=False)).numpy()
  np.testing.assert_array_equal(off, clip.numpy())
