"""`predict` on raw inputs with a tiny fine-tuned model: its study probabilities equal the evaluation
report's for the same videos (recalibration included), the decision at the validation threshold, run_info,
one file as input, a folder mixing DICOM and AVI files (no identifier in any output), the key map join, and
bounded memory (one decoded video alive at a time)."""
import csv
import gc
import json
import os
import weakref

import cv2
import numpy as np
import pytest

from echojax.data import study_videos
from echojax.jobs import finetune, tasks
from echojax.tools import predict, raw_inputs
from tests import dicom_fixtures
from tests import trainer_fixtures as tf_

SALT = 'predict-test-salt-Zq8vN3rT'


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  data_dir = tf_.build_ci_dataset(str(tmp_path_factory.mktemp('tfds')))
  workdir = str(tmp_path_factory.mktemp('ft'))
  cfg = tf_.finetune_config(data_dir)
  cfg.train.num_epochs = 1
  cfg.eval.splits = ('val', 'test')
  cfg.eval.calibration = 'platt'
  cfg.eval.html_report = False
  cfg.eval.bootstrap_resamples = 50
  finetune.train(cfg, workdir)
  return workdir, data_dir, cfg


def _write_lossless(path, frames):
  """FFV1 AVI: the decoded frames equal the dataset's exactly (the project's MJPG writer is lossy)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*'FFV1'), 30.0, frames.shape[1:][::-1], True)
  for frame in frames:
    writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
  writer.release()


@pytest.fixture(scope='module')
def test_videos(run, tmp_path_factory):
  """The test split's videos as `<study>/<video>.avi` files."""
  _, data_dir, cfg = run
  from echojax.data import pipeline
  builder = pipeline.get_builder('synthetic_echo', 'ci', data_dir)
  folder = tmp_path_factory.mktemp('videos')
  for v in study_videos.read_study_videos(builder, 'test'):
    _write_lossless(folder / v['study_id'] / f"{v['video_id']}.avi", v['frames'])
  return folder


def _rows(path):
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def test_study_probabilities_equal_the_evaluation_report(run, test_videos, tmp_path):
  workdir, _, _ = run
  result = predict.predict(workdir, str(test_videos), str(tmp_path / 'out'), batch_size=3)
  report = {r['study_id']: float(r['prob']) for r in _rows(os.path.join(workdir, 'eval', 'test',
                                                                        'study_predictions.csv'))}
  predicted = {r['study_id']: r for r in _rows(tmp_path / 'out' / 'study_predictions.csv')}
  assert predicted.keys() == report.keys() and len(report) == 6
  for sid, prob in report.items():
    assert float(predicted[sid]['prob']) == pytest.approx(prob, rel=1e-5, abs=1e-7), sid
  state = tasks.read_state(workdir)
  threshold = state['threshold']['study']
  assert state['calibration']['method'] == 'platt'
  for r in predicted.values():
    assert list(r)[:3] == ['study_id', 'n_videos', 'prob']
    assert float(r['threshold']) == pytest.approx(threshold)
    assert int(r['decision']) == int(float(r['prob']) >= threshold)
    assert r['output'] == 'probability'      # recalibrated on validation
  info = json.load(open(tmp_path / 'out' / 'run_info.json'))
  assert info['checkpoint'] == os.path.abspath(workdir) and info['weights'] in ('best', 'checkpoints')
  assert isinstance(info['step'], int) and info['versions']['jax'] and info['time']
  assert info['threshold']['study'] == pytest.approx(threshold) and info['n_studies'] == 6
  assert result['rejects'] == []


def test_one_file_is_one_video_and_memory_is_bounded(run, test_videos, tmp_path, monkeypatch):
  workdir, _, _ = run
  one = sorted(test_videos.glob('*/*.avi'))[0]
  single = predict.predict(workdir, str(one), str(tmp_path / 'one'), saliency=True)
  assert [(r['study_id'], r['n_videos']) for r in single['studies']] == [(one.stem.rsplit('_', 1)[0], 1)]
  assert os.path.getsize(single['saliency'][0]['png']) > 10_000   # --saliency: one figure per study

  refs, peak = [], []
  read = raw_inputs.read_frames

  def tracked(entry, max_frames=100):
    gc.collect()
    frames = read(entry, max_frames)
    refs.append(weakref.ref(frames))
    peak.append(sum(r() is not None for r in refs))
    return frames
  monkeypatch.setattr(raw_inputs, 'read_frames', tracked)
  result = predict.predict(workdir, str(test_videos), str(tmp_path / 'all'), batch_size=2)
  assert len(peak) == sum(r['n_videos'] for r in result['studies']) > 6
  assert max(peak) <= 2, peak    # the one being read (and at most the previous, not yet collected)


def test_mixed_dicom_and_avi_folder_with_key_map(run, test_videos, tmp_path):
  workdir, _, _ = run
  src = tmp_path / 'export' / 'QZXDOE_PIDQ778899'
  (src / 'echo').mkdir(parents=True)
  dicom_fixtures.write_cine(src / 'echo' / 'IM1', frames=20, seed=1)
  dicom_fixtures.write_cine(src / 'echo' / 'IM2', frames=20, seed=2)
  avi = sorted(test_videos.glob('*/*.avi'))[0]
  os.makedirs(src / 'cine_study')
  os.link(avi, src / 'cine_study' / 'clip_0.avi')
  (src / 'notes.txt').write_text('not an image')
  out, key_map = tmp_path / 'out', tmp_path / 'private' / 'key_map.csv'
  key_map.parent.mkdir()
  with pytest.raises(ValueError, match='outside --out'):
    predict.predict(workdir, str(tmp_path / 'export'), str(out), SALT, key_map=str(out / 'key_map.csv'))
  result = predict.predict(workdir, str(tmp_path / 'export'), str(out), SALT, key_map=str(key_map))
  studies = {r['study_id']: r for r in result['studies']}
  assert 'QZXDOE_PIDQ778899' in studies      # the AVI's folder is its study (the user's own name)
  dicom_studies = [s for s in studies if s != 'QZXDOE_PIDQ778899']
  assert len(dicom_studies) == 1 and studies[dicom_studies[0]]['n_videos'] == 2
  assert result['run_info']['inputs'] == {'dicom': 2, 'video': 1, 'manifest': 0}
  rejected = _rows(out / 'rejected.csv')
  assert len(rejected) == 1 and rejected[0]['path'].startswith('file:')   # salted, not the path
  # No identifier of the DICOM headers, nor the export's folder names, in any output but the AVI study id.
  for root, _, files in os.walk(out):
    for name in files:
      text = open(os.path.join(root, name), 'rb').read().decode('latin-1')
      for phi in dicom_fixtures.PHI_STRINGS + [dicom_fixtures.STUDY_UID]:
        assert phi not in text.replace('QZXDOE_PIDQ778899', ''), (name, phi)
  identified = _rows(result['identified'])
  assert os.path.dirname(result['identified']) == str(key_map.parent)
  by_id = {r['study_id']: r for r in identified}
  assert 'ACCQ55667' in by_id[dicom_studies[0]]['accession_number']
  assert float(by_id[dicom_studies[0]]['prob']) == pytest.approx(studies[dicom_studies[0]]['prob'])

  # A single DICOM file is that one cine, not its folder; any CSV with study_id works as a key map.
  single = predict.predict(workdir, str(src / 'echo' / 'IM1'), str(tmp_path / 'one'), SALT)
  assert [r['n_videos'] for r in single['studies']] == [1]
  generic = tmp_path / 'private' / 'registry.csv'
  generic.write_text(f'study_id,mrn\n{dicom_studies[0]},PIDQ778899\n')
  joined = predict.join_key_map(single['studies'], str(generic), str(tmp_path / 'private' / 'j.csv'))
  assert _rows(joined)[0]['mrn'] == 'PIDQ778899'


def test_nothing_usable_says_so(run, tmp_path):
  workdir, _, _ = run
  folder = tmp_path / 'junk'
  folder.mkdir()
  (folder / 'broken.avi').write_bytes(b'not a video')
  with pytest.raises(SystemExit, match='no usable video.*rejected.csv'):
    predict.predict(workdir, str(folder), str(tmp_path / 'out'))
  rows = _rows(tmp_path / 'out' / 'rejected.csv')
  assert rows[0]['path'] == 'broken.avi' and rows[0]['reason']
