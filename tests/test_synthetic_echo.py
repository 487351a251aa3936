"""Tests of the synthetic_echo generator (`echojax.data.synthetic`) and its TFDS builder: both generator
versions (1.0.0 kept pixel-identical, 2.0.0 with tissue-locked speckle and its temporal statistics)."""
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from data_builders.synthetic_echo import synthetic_echo_dataset_builder as sb
from echojax.data import records, synthetic
from scripts import temporal_stats

MINI = dict(num_train=4, num_val=2, num_test=2, seed=5, difficulty=0.5, min_frames=32, max_frames=34)


def _mini_config(name='test_mini', **overrides):
  return sb.SyntheticEchoConfig(name=name, **{**MINI, **overrides})


def _read_split(builder, split):
  return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


@pytest.fixture(scope='module')
def mini(tmp_path_factory):
  builder = sb.Builder(config=_mini_config(), data_dir=str(tmp_path_factory.mktemp('syn')), num_workers=0)
  builder.download_and_prepare()
  return builder, {split: _read_split(builder, split) for split in sb.SPLITS}


# sha256 of the pixels of every video of study ('train', 3), seed 0, max_frames 40, rendered by the 1.0.0
# generator before 2.0.0 existed (commit bde195e): 1.x must stay buildable pixel for pixel.
V1_STUDY_SHA256 = '12e6685313912eed2ff46aaaa687de546f7247601b4d9ab2864e42e6dc7a9bfe'


def test_builds_expected_counts_and_schema(mini):
  builder, data = mini
  for split in sb.SPLITS:
    n_studies = MINI[f'num_{split}']
    latents = [synthetic.sample_study(synthetic.study_seed(MINI['seed'], split, i), difficulty=0.5)
               for i in range(n_studies)]
    examples = data[split]
    assert builder.info.splits[split].num_examples == len(examples) == sum(l.num_videos for l in latents)
    position = 0
    for study_index, lat in enumerate(latents):
      study_id = f'syn-{split}-{study_index:05d}'
      for video_index in range(lat.num_videos):
        ex = examples[position]
        position += 1
        assert ex['video'].dtype == np.uint8 and ex['video'].shape[1:] == (112, 112, 1)
        assert MINI['min_frames'] <= ex['num_frames'] == ex['video'].shape[0] <= MINI['max_frames']
        assert ex['study_id'].decode() == ex['patient_id'].decode() == study_id
        assert ex['video_id'].decode() == f'{study_id}_{video_index}'
        assert (ex['study_index'], ex['video_index'], ex['study_num_videos']) == (
            study_index, video_index, lat.num_videos)
        assert records.AV_STENOSIS_NAMES[ex['av_stenosis']] == lat.grade
        assert ex['severe_as'] == int(lat.grade == 'severe')
        assert 30 <= ex['fps'] <= 80 and 0.6 <= ex['plax_prob'] <= 1.0
        assert ex['heart_rate'] == np.float32(lat.heart_rate)
        x0, y0, x1, y1 = ex['valve_box']
        assert 0 <= x0 < x1 <= 112 and 0 <= y0 < y1 <= 112
        boxes = ex['valve_boxes']                  # 2.0.0: the valve's box at every frame
        assert boxes.shape == (ex['num_frames'], 4)
        assert tuple(boxes[:, :2].min(0)) == (x0, y0) and tuple(boxes[:, 2:].max(0)) == (x1, y1)
  assert builder.info.disable_shuffling and builder.version == '2.0.0'


def test_records_hold_exactly_the_rendered_pixels(mini):
  _, data = mini
  study = synthetic.render_study(MINI['seed'], 'val', 1, difficulty=0.5, min_frames=32, max_frames=34)
  first = [ex for ex in data['val'] if ex['study_index'] == 1]
  assert len(first) == len(study[2])
  for ex, (video_id, video, fps) in zip(first, study[2]):
    assert ex['video_id'].decode() == video_id and ex['fps'] == np.float32(fps)
    np.testing.assert_array_equal(ex['video'][..., 0], video)


def test_splits_are_disjoint_by_study(mini):
  _, data = mini
  ids = {split: {ex['study_id'].decode() for ex in data[split]} for split in sb.SPLITS}
  assert not (ids['train'] & ids['val']) and not (ids['train'] & ids['test']) and not (ids['val'] & ids['test'])
  assert all(i.startswith(f'syn-{split}-') for split in sb.SPLITS for i in ids[split])


def test_registered_configs_and_tfds_builder_by_name(tmp_path):
  configs = {c.name: c for c in sb.Builder.BUILDER_CONFIGS}
  assert sb.Builder.DEFAULT_CONFIG_NAME == 'small'
  assert (configs['small'].num_train, configs['small'].num_val, configs['small'].num_test) == (240, 60, 60)
  big = configs['benchmark']
  assert big.num_train + big.num_val + big.num_test >= 2000
  builder = tfds.builder('synthetic_echo/tiny', data_dir=str(tmp_path), num_workers=0)
  assert isinstance(builder, sb.Builder) and builder.builder_config.num_train == 8
  assert builder.version == '2.0.0' and '2.0.0' in builder.release_notes
  old = tfds.builder('synthetic_echo/tiny:1.0.0', data_dir=str(tmp_path), num_workers=0)
  assert old.version == '1.0.0' and old.data_dir.endswith('tiny/1.0.0') and 'valve_boxes' not in old.info.features


def test_process_pool_build_matches_in_process_build(mini, tmp_path):
  _, data = mini
  pooled = sb.Builder(config=_mini_config(), data_dir=str(tmp_path), num_workers=2)
  pooled.download_and_prepare()
  other = _read_split(pooled, 'train')
  assert [e['video_id'] for e in other] == [e['video_id'] for e in data['train']]
  for a, b in zip(other, data['train']):
    np.testing.assert_array_equal(a['video'], b['video'])


def test_workers_never_rerun_an_unguarded_calling_script(tmp_path):
  # Spawned workers re-import the main module unless the builder hides it; a script without the
  # `if __name__ == '__main__':` guard would then build again inside every worker.
  script = tmp_path / 'build_unguarded.py'
  script.write_text(
      'from data_builders.synthetic_echo import synthetic_echo_dataset_builder as sb\n'
      f'config = sb.SyntheticEchoConfig(name="unguarded", **{dict(MINI, num_train=2)!r})\n'
      f'sb.Builder(config=config, data_dir={str(tmp_path / "data")!r}, num_workers=2).download_and_prepare()\n'
      'print("BUILT")\n')
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get('PYTHONPATH', '')]))
  done = subprocess.run([sys.executable, str(script)], cwd=str(tmp_path), env=env, capture_output=True,
                        text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.count('BUILT') == 1 and 'bootstrapping phase' not in done.stderr


@pytest.mark.parametrize('bad, message', [
    (dict(num_val=0), 'num_val'), (dict(difficulty=1.5), 'difficulty'),
    (dict(min_frames=50, max_frames=40), 'min_frames'), (dict(severe_fraction=-0.1), 'severe_fraction')])
def test_bad_config_is_rejected_by_name(tmp_path, bad, message):
  builder = sb.Builder(config=_mini_config(name='broken', **bad), data_dir=str(tmp_path), num_workers=0)
  with pytest.raises(ValueError, match=f"'broken'.*{message}"):
    builder.download_and_prepare()


def test_bad_generator_arguments_raise():
  with pytest.raises(ValueError, match='grade'):
    synthetic.sample_study(0, grade='critical')
  with pytest.raises(ValueError, match='difficulty'):
    synthetic.sample_study(0, difficulty=-0.1)
  lat = synthetic.sample_study(0)
  with pytest.raises(ValueError, match='frames'):
    synthetic.valve_box(lat, synthetic.video_acquisition(lat, 0, max_frames=40), frame=40)


def test_deterministic_by_seed():
  a = synthetic.render_study(0, 'train', 3, max_frames=40)
  b = synthetic.render_study(0, 'train', 3, max_frames=40)
  c = synthetic.render_study(1, 'train', 3, max_frames=40)
  d = synthetic.render_study(0, 'val', 3, max_frames=40)
  assert a[2][0][1].tobytes() == b[2][0][1].tobytes()
  assert a[2][0][1].tobytes() != c[2][0][1].tobytes() and a[2][0][1].tobytes() != d[2][0][1].tobytes()
  # An explicit acquisition is the one the seed would draw: same pixels either way.
  lat, seed = a.latents, synthetic.video_seed(0, 'train', 3, 0)
  explicit, _ = synthetic.render_video(lat, seed, acquisition=synthetic.video_acquisition(lat, seed, max_frames=40))
  np.testing.assert_array_equal(explicit, a[2][0][1])


def test_generate_split_yields_study_by_study():
  studies = list(synthetic.generate_split('test', 3, seed=2, max_frames=33))
  assert [s[0] for s in studies] == ['syn-test-00000', 'syn-test-00001', 'syn-test-00002']
  for study_id, grade, videos in studies:
    assert grade in synthetic.GRADES and 1 <= len(videos) <= 5
    for n, (video_id, video, fps) in enumerate(videos):
      assert video_id == f'{study_id}_{n}' and video.dtype == np.uint8 and 32 <= len(video) <= 33
      assert video.shape[1:] == (112, 112) and 30 <= fps <= 80


def test_severe_fraction_and_grade_mix():
  grades = [synthetic.sample_study(synthetic.study_seed(0, 'count', i)).grade for i in range(3000)]
  assert abs(np.mean([g == 'severe' for g in grades]) - 0.22) < 0.03
  assert set(grades) == set(synthetic.GRADES)
  half = [synthetic.sample_study((9, i), severe_fraction=0.5).grade == 'severe' for i in range(1000)]
  assert abs(np.mean(half) - 0.5) < 0.06


def test_outside_the_sector_is_exactly_zero():
  for i in range(4):
    lat = synthetic.sample_study((4, i))
    acq = synthetic.video_acquisition(lat, (4, i, 1), max_frames=40)
    video, _ = synthetic.render_video(lat, (4, i, 1), acquisition=acq)
    inside = synthetic.sector_mask(acq)
    assert 0.3 < inside.mean() < 0.9
    assert not video[:, ~inside].any()
    assert (video[:, inside] > 0).mean() > 0.3


def _systolic_valve_brightness(grade, i):
  lat = synthetic.sample_study((3, i), grade=grade)
  acq = synthetic.video_acquisition(lat, (3, i, 0), max_frames=48)
  motion = synthetic.video_motion(lat, (3, i, 0))
  video, _ = synthetic.render_video(lat, (3, i, 0), acquisition=acq)
  _, aortic, _ = synthetic.cycle_envelopes(lat, synthetic.cardiac_phase(lat, acq))
  frames = np.flatnonzero(aortic > 0.9)
  boxes = [synthetic.valve_box(lat, acq, f, motion=motion) for f in frames]
  return lat, [video[f, y0:y1, x0:x1].mean() for f, (x0, y0, x1, y1) in zip(frames, boxes)]


def test_valve_differs_between_severe_and_none():
  by_grade = {g: [_systolic_valve_brightness(g, i) for i in range(24)] for g in ('none', 'severe')}
  opening = {g: np.mean([lat.av_opening for lat, _ in v]) for g, v in by_grade.items()}
  assert opening['severe'] < opening['none'] - 0.15
  # In systole a stenotic valve keeps thick, bright leaflets across the root: its box is brighter.
  bright = {g: np.mean([np.mean(b) for _, b in v if b]) for g, v in by_grade.items()}
  assert bright['severe'] > bright['none'] + 5


def test_difficulty_shrinks_the_as_effect_relative_to_study_variation():
  def separation(difficulty):
    lat = {g: [synthetic.sample_study((6, i), grade=g, difficulty=difficulty) for i in range(300)]
           for g in ('none', 'severe')}
    o = {g: np.array([l.av_opening for l in v]) for g, v in lat.items()}
    return (o['none'].mean() - o['severe'].mean()) / np.sqrt((o['none'].var() + o['severe'].var()) / 2)
  easy, default, hard = separation(0.0), separation(0.5), separation(1.0)
  assert easy > default > hard > 0.3


def test_valve_box_and_pixels_follow_the_shift_knob():
  lat = synthetic.sample_study((3, 1), grade='severe')
  acq = synthetic.video_acquisition(lat, (9, 9), max_frames=40)
  motion = synthetic.video_motion(lat, (9, 9))
  base, _ = synthetic.render_video(lat, (9, 9), acquisition=acq)
  moved, _ = synthetic.render_video(lat, (9, 9), acquisition=acq, shift=(8, 3))
  x0, y0, x1, y1 = synthetic.valve_box(lat, acq, motion=motion)
  assert synthetic.valve_box(lat, acq, shift=(8, 3), motion=motion) == (x0 + 8, y0 + 3, x1 + 8, y1 + 3)
  crop = lambda v, dx, dy: v[:, y0 + dy:y1 + dy, x0 + dx:x1 + dx].mean(0).ravel()
  assert np.corrcoef(crop(base, 0, 0), crop(moved, 8, 3))[0, 1] > 0.8
  assert np.corrcoef(crop(base, 0, 0), crop(moved, 0, 0))[0, 1] < 0.5


def test_as_cue_is_learnable_from_the_valve_region_with_many_studies():
  features, labels = [], []
  for i in range(160):
    grade = 'severe' if i % 2 else None   # balanced; the non-severe half keeps the none/mild/moderate mix
    lat = synthetic.sample_study((11, i), grade=grade, severe_fraction=0.0 if grade is None else 0.22)
    acq = synthetic.video_acquisition(lat, (11, i, 0), max_frames=32)
    video, _ = synthetic.render_video(lat, (11, i, 0), acquisition=acq)
    x0, y0, x1, y1 = synthetic.valve_box(lat, acq, motion=synthetic.video_motion(lat, (11, i, 0)))
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    crop = video[:, cy - 12:cy + 12, cx - 10:cx + 10].astype(np.float32) / 255
    features.append(np.concatenate([crop.mean(0).ravel(), crop.max(0).ravel()]))
    labels.append(lat.grade == 'severe')
  x, y = np.array(features), np.array(labels)
  model = LogisticRegression(C=0.1, max_iter=2000)
  scores = cross_val_predict(model, x, y, cv=StratifiedKFold(4, shuffle=True, random_state=0),
                             method='decision_function')
  many = roc_auc_score(y, scores)
  # A handful of labelled studies (3 + 3) learns much less than all of them.
  rng, held_out = np.random.default_rng(0), np.arange(100, 160)
  few = []
  for _ in range(10):
    pick = np.concatenate([rng.choice(np.flatnonzero(y[:100] == c), 3, replace=False) for c in (0, 1)])
    few.append(roc_auc_score(y[held_out], model.fit(x[pick], y[pick]).decision_function(x[held_out])))
  assert many > 0.8, many
  assert np.mean(few) < many - 0.05, (np.mean(few), many)


# ------------------------------------------------------------------------------ generator versions
def test_v1_videos_are_unchanged():
  study = synthetic.render_study(0, 'train', 3, max_frames=40, version='1.0.0')
  assert hashlib.sha256(b''.join(v[1].tobytes() for v in study[2])).hexdigest() == V1_STUDY_SHA256
  assert all(v.motion is None for v in study[2])
  with pytest.raises(ValueError, match='generator version'):
    synthetic.render_study(0, 'train', 3, version='3.0.0')


def test_v1_stays_buildable_with_its_own_records(tmp_path):
  builder = sb.Builder(config=_mini_config(version='1.0.0'), data_dir=str(tmp_path), num_workers=0)
  builder.download_and_prepare()
  assert builder.version == '1.0.0' and 'valve_boxes' not in builder.info.features
  examples = _read_split(builder, 'train')
  rendered = [v for i in range(MINI['num_train']) for v in synthetic.render_study(
      MINI['seed'], 'train', i, min_frames=32, max_frames=34, version='1.0.0')[2]]
  assert [e['video_id'].decode() for e in examples] == [v[0] for v in rendered]
  for ex, video in zip(examples, rendered):
    np.testing.assert_array_equal(ex['video'][..., 0], video[1])
    assert tuple(ex['valve_box']) == synthetic.valve_box(synthetic.sample_study(
        synthetic.study_seed(MINI['seed'], 'train', ex['study_index'])), video.acquisition)


def test_v2_deterministic_and_motion_is_the_seeds():
  lat, seed = synthetic.sample_study((2, 7)), (2, 7, 1)
  acq = synthetic.video_acquisition(lat, seed, max_frames=36)
  a, _ = synthetic.render_video(lat, seed, acquisition=acq)
  b, _ = synthetic.render_video(lat, seed, acquisition=acq, motion=synthetic.video_motion(lat, seed))
  c, _ = synthetic.render_video(lat, (2, 7, 2), acquisition=acq)
  np.testing.assert_array_equal(a, b)
  assert a.tobytes() != c.tobytes()
  # Same latents and acquisition as 1.x: only speckle and motion differ.
  assert synthetic.render_study(0, 'val', 2, max_frames=33)[2][0].acquisition == synthetic.render_study(
      0, 'val', 2, max_frames=33, version='1.0.0')[2][0].acquisition


# ----------------------------------------------------------------- temporal statistics of 2.0.0
# The band: the real cine (pydicom's examples_ybr_color.dcm, SonoSite, 30 fps; tests/test_temporal_stats.py
# re-measures it) gives, at lags of 33/67/100/200/333 ms, a mean frame correlation of 0.97/0.95/0.92/0.85/0.80
# and, over its start frames (one cardiac cycle), the 10th–90th percentiles below. Synthetic cines should
# decorrelate as a real one does somewhere in its cycle: their mean must lie inside that within-cine spread,
# less 0.02 below (two standard errors of a 24-video mean; the videos' sd is ≈ 0.05 at 333 ms). 1.0.0
# (0.88 at 33 ms) and a frozen video (1.0) both fall outside.
REAL_LAG_MS = (1000 / 30, 2000 / 30, 100.0, 200.0, 1000 / 3)
REAL_P10 = (0.958, 0.916, 0.866, 0.786, 0.770)
REAL_P90 = (0.986, 0.974, 0.961, 0.918, 0.841)
SAMPLING = 0.02


def _v2_videos(count, fps=None):
  return list(temporal_stats.synthetic_videos(count, '2.0.0', split='temporal', fps=fps))


@pytest.fixture(scope='module')
def v2_videos():
  return _v2_videos(24)


def test_frame_correlation_decays_like_a_real_cine(v2_videos):
  curves = np.array([temporal_stats.correlation_curve(v, fps, REAL_LAG_MS) for v, fps in v2_videos])
  mean = np.nanmean(curves, 0)
  assert (np.array(REAL_P10) - SAMPLING <= mean).all() and (mean <= np.array(REAL_P90)).all(), mean
  assert (np.diff(mean) < 0).all(), mean                     # falls smoothly with the lag


def test_temporal_statistics_are_per_second_not_per_frame():
  slow, fast = _v2_videos(6, fps=30), _v2_videos(6, fps=80)
  curve = lambda videos: np.nanmean([temporal_stats.correlation_curve(v, f, REAL_LAG_MS) for v, f in videos], 0)
  assert np.abs(curve(slow) - curve(fast)).max() < 0.03


def test_order_cue_and_speckle_tracking_far_above_v1(v2_videos):
  v1 = list(temporal_stats.synthetic_videos(12, '1.0.0', split='temporal'))
  v2_videos = v2_videos[:12]
  cue = lambda videos: np.mean([temporal_stats.order_cue(v) for v, _ in videos])
  track = lambda videos: np.mean([temporal_stats.tracking_correlation(v, max(1, round(f / 30)))
                                  for v, f in videos])
  assert cue(v1) < 0.15 and cue(v2_videos) > 0.2, (cue(v1), cue(v2_videos))   # real cine: 0.29
  assert track(v2_videos) > 0.92 and track(v2_videos) > track(v1) + 0.08   # speckle moves with the tissue


def test_valve_boxes_follow_the_moving_valve():
  lat, seed = synthetic.sample_study((5, 1), grade='severe'), (5, 1, 0)
  acq, motion = synthetic.video_acquisition(lat, seed, min_frames=60), synthetic.video_motion(lat, seed)
  boxes = synthetic.valve_boxes(lat, acq, motion=motion)
  assert boxes.shape == (acq.num_frames, 4) and len({tuple(b) for b in boxes}) > 1
  assert synthetic.valve_box(lat, acq, motion=motion) == synthetic.union_box(boxes)
  hinges, tips = synthetic.aortic_leaflets(lat, acq, motion=motion)
  points = np.concatenate([hinges, tips], 1)                   # (T, 4, 2) x, y
  assert (points >= boxes[:, None, :2]).all() and (points < boxes[:, None, 2:]).all()

