"""Tests of the synthetic_echo generator (`echojax.data.synthetic`) and its TFDS builder."""
import numpy as np
import pytest
import tensorflow_datasets as tfds
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from data_builders.synthetic_echo import synthetic_echo_dataset_builder as sb
from echojax.data import records, synthetic

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
  assert builder.info.disable_shuffling


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


def test_process_pool_build_matches_in_process_build(mini, tmp_path):
  _, data = mini
  pooled = sb.Builder(config=_mini_config(), data_dir=str(tmp_path), num_workers=2)
  pooled.download_and_prepare()
  other = _read_split(pooled, 'train')
  assert [e['video_id'] for e in other] == [e['video_id'] for e in data['train']]
  for a, b in zip(other, data['train']):
    np.testing.assert_array_equal(a['video'], b['video'])


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
  video, _ = synthetic.render_video(lat, (3, i, 0), acquisition=acq)
  _, aortic, _ = synthetic.cycle_envelopes(lat, synthetic.cardiac_phase(lat, acq))
  frames = np.flatnonzero(aortic > 0.9)
  boxes = [synthetic.valve_box(lat, acq, f) for f in frames]
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
  base, _ = synthetic.render_video(lat, (9, 9), acquisition=acq)
  moved, _ = synthetic.render_video(lat, (9, 9), acquisition=acq, shift=(8, 3))
  x0, y0, x1, y1 = synthetic.valve_box(lat, acq)
  assert synthetic.valve_box(lat, acq, shift=(8, 3)) == (x0 + 8, y0 + 3, x1 + 8, y1 + 3)
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
    x0, y0, x1, y1 = synthetic.valve_box(lat, acq)
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
