"""Tests of echojax.data.pipeline on a tiny coded TFDS builder (tests/tfds_fixtures.py): every frame tells which
video and frame it is, so the tests read back what each mode sampled."""
import collections
import itertools
import logging
import os
import sys

import numpy as np
import pytest

from tests import tfds_fixtures as fx  # noqa: E402

from echojax.data import pipeline  # noqa: E402

STUDIES = {s[0]: s for s in fx.DEFAULT_STUDIES}
LENGTHS = {f'{s[0]}_v{i}': n for s in fx.DEFAULT_STUDIES for i, n in enumerate(s[1])}
NUMBERS = fx.video_numbers()
ALL_VIDEOS = list(LENGTHS)


@pytest.fixture(scope='module')
def builder(tmp_path_factory):
  return fx.make_tiny_builder(str(tmp_path_factory.mktemp('tfds')))


def _cfg(**overrides):
  cfg = pipeline.default_data_config()
  cfg.augment.enabled = False  # keep the row-0 codes in place; augmentation has its own tests
  cfg.shuffle_buffer = 64
  cfg.update(overrides)
  return cfg


def _batches(builder, mode, cfg, batch_size=1, **kw):
  kw.setdefault('process_index', 0)
  kw.setdefault('process_count', 1)
  return list(pipeline.as_numpy(pipeline.make_dataset(builder, 'train', mode, batch_size=batch_size, cfg=cfg,
                                                      **kw)))


def _codes(clip):
  """[(video_number, frame_number)] of each frame of a clip (T, S, S, 1)."""
  return [fx.decode_codes(frame) for frame in clip]


def _check_clip(clip, video_id, stride=1):
  codes = _codes(clip)
  assert {v for v, _ in codes} == {NUMBERS[video_id]}, (video_id, codes)
  frames = [f for _, f in codes]
  assert np.all(np.diff(frames) == stride) and frames[-1] < LENGTHS[video_id]
  return frames


@pytest.mark.parametrize('mode,frame_order,image_size', [
    ('simclr', False, 112), ('multi_instance', True, 112), ('finetune', False, 56), ('eval', False, 56)])
def test_shapes_and_dtypes(builder, mode, frame_order, image_size):
  cfg = _cfg(frame_order=frame_order, image_size=image_size)
  cfg.augment.enabled = True
  batch = next(pipeline.as_numpy(pipeline.make_dataset(builder, 'train', mode, batch_size=3, cfg=cfg,
                                                       process_index=0, process_count=1)))
  s = image_size
  if mode in ('simclr', 'multi_instance'):
    assert batch['views'].shape == (3, 2, 4, s, s, 1) and batch['views'].dtype == np.float32
    assert batch['views_study_id'].shape == (3,) and batch['views_video_id'].shape == (3, 2)
    assert ('order_label' in batch) == frame_order
    if frame_order:
      assert batch['order_label'].dtype == np.int32 and batch['order_label'].shape == (3, 2)
    video = batch['views']
  elif mode == 'finetune':
    assert batch['video'].shape == (3, 16, s, s, 1) and batch['label'].dtype == np.float32
    video = batch['video']
  else:
    assert batch['video'].shape == (3, 4, 16, s, s, 1) and batch['mask'].dtype == bool
    video = batch['video']
  assert video.dtype == np.float32 and 0.0 <= video.min() and video.max() <= 1.0
  assert isinstance(batch['study_id'][0] if 'study_id' in batch else batch['views_study_id'][0], bytes)


def test_multi_instance_all_pairs_once_per_epoch(builder):
  batches = _batches(builder, 'multi_instance', _cfg(), repeat=False)
  seen = collections.Counter()
  for b in batches:
    study = b['views_study_id'][0].decode()
    ids = [v.decode() for v in b['views_video_id'][0]]
    assert all(v.startswith(study + '_') for v in ids)
    for view, vid in zip(b['views'][0], ids):
      _check_clip(view, vid)
    seen[tuple(sorted(ids))] += 1
  expected = set()
  for study_id, lengths, _, _ in fx.DEFAULT_STUDIES:
    vids = [f'{study_id}_v{i}' for i in range(len(lengths))]
    expected |= set(itertools.combinations(vids, 2)) if len(vids) > 1 else {(vids[0], vids[0])}
  assert set(seen) == expected and set(seen.values()) == {1}


def test_multi_instance_one_pair_per_study(builder):
  batches = _batches(builder, 'multi_instance', _cfg(pairs_per_study='one'), repeat=False)
  studies = collections.Counter(b['views_study_id'][0].decode() for b in batches)
  assert studies == collections.Counter(list(STUDIES))
  for b in batches:
    a, c = b['views_video_id'][0]
    assert (a != c) == (len(STUDIES[b['views_study_id'][0].decode()][1]) > 1)


def test_simclr_two_views_of_one_clip_with_stride(builder):
  batches = _batches(builder, 'simclr', _cfg(clip_len=3, clip_stride=2), repeat=False)
  assert sorted(b['views_video_id'][0][0].decode() for b in batches) == sorted(ALL_VIDEOS)
  for b in batches:
    vid = b['views_video_id'][0][0].decode()
    assert _check_clip(b['views'][0, 0], vid, stride=2) == _check_clip(b['views'][0, 1], vid, stride=2)


def test_permutation_table_and_index():
  table = pipeline.permutation_table(4)
  assert table.shape == (24, 4) and table.dtype == np.int32
  np.testing.assert_array_equal(table, np.array(list(itertools.permutations(range(4)))))
  assert [pipeline.permutation_index(p) for p in table] == list(range(24))
  with pytest.raises(ValueError, match='not a permutation'):
    pipeline.permutation_index([0, 0, 1])
  with pytest.raises(ValueError, match='clip_len'):
    pipeline.permutation_table(16)


def test_frame_order_label_matches_permutation(builder):
  labels = []
  ds = pipeline.make_dataset(builder, 'train', 'multi_instance', batch_size=4, cfg=_cfg(frame_order=True),
                             seed=5, process_index=0, process_count=1)
  for b in itertools.islice(pipeline.as_numpy(ds), 6):
    for views, label in zip(b['views'], b['order_label']):
      for view, k in zip(views, label):
        frames = np.array([f for _, f in _codes(view)])
        perm = frames - frames.min()
        assert pipeline.permutation_index(perm) == k
        np.testing.assert_array_equal(pipeline.permutation_table(4)[k], perm)
        labels.append(k)
  assert len(set(labels)) > 8  # drawn, not constant


def test_eval_offsets_padding_and_last_batch(builder):
  batches = _batches(builder, 'eval', _cfg(), batch_size=5)
  assert len(batches) == 3  # 12 videos -> 5 + 5 + 2 (padded to 5)
  ids = [v.decode() for b in batches for v in b['video_id']]
  masks = np.concatenate([b['mask'] for b in batches])
  assert ids[:12] == ALL_VIDEOS and ids[12:] == [''] * 3
  assert masks.tolist() == [True] * 12 + [False] * 3
  last = batches[-1]
  assert np.all(last['video'][2:] == 0) and np.all(last['label'][2:] == 0)
  videos = np.concatenate([b['video'] for b in batches])[:12]
  labels = np.concatenate([b['label'] for b in batches])[:12]
  for vid, clips, label in zip(ALL_VIDEOS, videos, labels):
    n = LENGTHS[vid]
    assert label == {'severe': 1, 'unknown': -1}.get(STUDIES[vid.split('_')[0]][2], 0)
    step = max((n - 16) // 4, 0)
    for k, clip in enumerate(clips):
      codes = _codes(clip)
      valid = min(16, n - k * step)
      assert codes[:valid] == [(NUMBERS[vid], k * step + t) for t in range(valid)]
      assert np.all(clip[valid:] == 0)  # zero padding of short videos, after min-max
      assert clip[:valid].max() == 1.0 and clip[:valid].min() == 0.0  # min-max per clip


def test_finetune_label_filter_padding_and_count(builder, caplog):
  batches = _batches(builder, 'finetune', _cfg(), repeat=False)
  ids = sorted(b['video_id'][0].decode() for b in batches)
  assert ids == sorted(v for v in ALL_VIDEOS if not v.startswith('s3'))  # s3 is 'unknown'
  assert (2, 12) in pipeline.UNKNOWN_LABEL_COUNTS.values()
  with caplog.at_level(logging.WARNING, logger=pipeline.__name__):
    for _ in range(2):  # logged once, not per call
      pipeline.make_dataset(builder, 'train', 'finetune', batch_size=1, cfg=_cfg(), study_ids=['s3', 's0'],
                            process_index=0, process_count=1)
  assert [r.getMessage().count('dropping 2 of 4') for r in caplog.records if r.name == pipeline.__name__] == [1]
  for b in batches:
    vid = b['video_id'][0].decode()
    assert b['label'][0] == (1.0 if STUDIES[vid.split('_')[0]][2] == 'severe' else 0.0)
    n = LENGTHS[vid]
    valid = min(16, n)
    _check_clip(b['video'][0, :valid], vid)
    assert np.all(b['video'][0, valid:] == 0)
  ef = _batches(builder, 'finetune', _cfg(), repeat=False, label_key='ef')
  assert sorted(b['video_id'][0].decode() for b in ef) == sorted(v for v in ALL_VIDEOS if v != 's2_v1')
  assert {float(b['label'][0]) for b in ef} >= {55.0, 30.0}


def test_study_ids_filter(builder):
  for mode in ('eval', 'multi_instance'):
    batches = _batches(builder, mode, _cfg(), repeat=False, study_ids=['s1', 's5'])
    key = 'study_id' if mode == 'eval' else 'views_study_id'
    assert {s.decode() for b in batches for s in b[key]} == {'s1', 's5'}
  with pytest.raises(ValueError, match='empty'):
    pipeline.make_dataset(builder, 'train', 'eval', batch_size=2, cfg=_cfg(), study_ids=[],
                          process_index=0, process_count=1)


def _first_batches(builder, mode, seed, n=2, **cfg_overrides):
  cfg = _cfg(**cfg_overrides)
  cfg.augment.enabled = True
  ds = pipeline.make_dataset(builder, 'train', mode, batch_size=4, cfg=cfg, seed=seed, process_index=0,
                             process_count=1)
  return list(itertools.islice(pipeline.as_numpy(ds), n))


@pytest.mark.parametrize('mode', ['simclr', 'multi_instance'])
def test_seeded_determinism_independent_of_parallelism(builder, mode):
  a = _first_batches(builder, mode, seed=3, num_parallel_calls=1)
  b = _first_batches(builder, mode, seed=3, num_parallel_calls=4)
  c = _first_batches(builder, mode, seed=4, num_parallel_calls=4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['views'], y['views'])
    np.testing.assert_array_equal(x['views_video_id'], y['views_video_id'])
  assert not all(np.array_equal(x['views'], z['views']) for x, z in zip(a, c))


def test_process_sharding_covers_every_video_once(builder):
  per_process = []
  for index in range(2):
    batches = _batches(builder, 'eval', _cfg(), batch_size=4, process_index=index, process_count=2)
    per_process.append([v.decode() for b in batches for v, m in zip(b['video_id'], b['mask']) if m])
    md = pipeline.read_video_metadata(builder, 'train', process_index=index, process_count=2)
    assert [r['video_id'] for r in md] == per_process[-1]
  assert not set(per_process[0]) & set(per_process[1])
  assert sorted(per_process[0] + per_process[1]) == sorted(ALL_VIDEOS)
  # Uneven shards (12 videos over 5 processes: 3,3,2,2,2) still give every process the same number of steps.
  for study_ids in (None, ['s0', 's2', 's5']):
    seen, steps = [], set()
    for index in range(5):
      batches = _batches(builder, 'eval', _cfg(image_size=16), batch_size=2, process_index=index,
                         process_count=5, study_ids=study_ids)
      steps.add(len(batches))
      seen += [v.decode() for b in batches for v, m in zip(b['video_id'], b['mask']) if m]
    assert len(steps) == 1 and sorted(seen) == sorted(v for v in ALL_VIDEOS if study_ids is None or
                                                      v.split('_')[0] in study_ids)
  # Multi-instance on a shard: a study cut by the boundary still pairs only within what this process has.
  for index in range(2):
    for b in _batches(builder, 'multi_instance', _cfg(), process_index=index, process_count=2, repeat=False):
      study = b['views_study_id'][0].decode()
      assert all(v.decode() in per_process[index] and v.decode().startswith(study) for v in b['views_video_id'][0])


def test_read_video_metadata(builder):
  md = pipeline.read_video_metadata(builder, 'train', process_index=0, process_count=1)
  assert [r['video_id'] for r in md] == ALL_VIDEOS
  row = md[0]
  assert 'video' not in row
  assert row == dict(row, study_id='s0', patient_id='p_s0', num_frames=12, fps=50.0, severe_as=1,
                     av_stenosis='severe', ef=55.0, study_num_videos=2, video_index=0)
  assert np.isnan(md[4]['ef']) and md[4]['video_id'] == 's2_v1'


def test_get_builder_registered_and_module(builder, tmp_path, monkeypatch):
  import data_builders
  import tensorflow_datasets as tfds
  pkg = tmp_path / 'tiny_fake'
  pkg.mkdir()
  (pkg / '__init__.py').write_text('')
  (pkg / 'tiny_fake_dataset_builder.py').write_text(
      'from tests import tfds_fixtures\n'
      'class Builder(tfds_fixtures.TinyEcho, skip_registration=True):\n'
      "  name = 'tiny_fake'\n")
  monkeypatch.setattr(data_builders, '__path__', list(data_builders.__path__) + [str(tmp_path)])
  fake = pipeline.get_builder('tiny_fake', data_dir=str(tmp_path / 'data'))
  assert fake.name == 'tiny_fake' and fake.data_dir.startswith(str(tmp_path / 'data'))
  registered = pipeline.get_builder('mnist', data_dir=str(tmp_path / 'data'))
  assert isinstance(registered, tfds.core.DatasetBuilder) and registered.name == 'mnist'
  with pytest.raises(ValueError, match="unknown dataset 'no_such_dataset_xyz'; the project's builders are: "
                     'echo_studies, echonet_dynamic, echonet_lvh, synthetic_echo'):
    pipeline.get_builder('no_such_dataset_xyz', data_dir=str(tmp_path / 'data'))


def test_bad_arguments(builder):
  with pytest.raises(ValueError, match='mode'):
    pipeline.make_dataset(builder, 'train', 'bogus', batch_size=2, process_index=0, process_count=1)
  with pytest.raises(ValueError, match='image_size'):
    pipeline.make_dataset(builder, 'train', 'eval', batch_size=2, cfg=dict(image_size=224), process_index=0,
                          process_count=1)
  with pytest.raises(ValueError, match='no_such_label'):
    pipeline.make_dataset(builder, 'train', 'finetune', batch_size=2, label_key='no_such_label',
                          process_index=0, process_count=1)
  with pytest.raises(ValueError, match='process_index'):
    pipeline.make_dataset(builder, 'train', 'eval', batch_size=2, process_index=2, process_count=2)
