"""`synthetic_echo`: procedurally generated PLAX-like echo cines with an aortic-stenosis (AS) label.

The embedded default dataset: it lets the whole system run, and be judged, without patient data. The
generator (`echojax.data.synthetic`, numpy + OpenCV) draws, for every study, from this model:

Image formation (per frame, 112×112 uint8). A transducer fan with its apex at the top on black (everything
outside the sector is exactly 0). Tissue is a reflectivity map painted with anti-aliased polygons; echo
power = reflectivity² × speckle × depth attenuation × gain + an electronic noise floor, shown on a log (dB)
scale over the video's dynamic range. Speckle is the squared modulus of a spatially correlated complex
Gaussian field (Rayleigh amplitude, grains wider laterally than axially).

Speckle and motion differ by version (the dataset version is the generator's; 1.0.0 stays buildable with
`version='1.0.0'`, same latents and acquisitions, pixel for pixel as before 2.0.0):
- 1.0.0: a share of the speckle (`speckle_persistence`, 30–75 %) is fixed in the image, the rest is redrawn
  every frame; only the painted anatomy moves. Consecutive frames are barely more alike than frames two apart
  (order cue 1 − MAD(lag 1)/MAD(lag 2) ≈ 0.08).
- 2.0.0 (default): tissue-locked speckle. Scatterers live on a material canvas (the end-diastolic frame)
  and every frame samples it through the inverse motion field — wall thickening and LV shortening across
  the long axis, aortic-root/LA motion, the base (annulus, root, valves) descending toward the apex in
  systole (`Motion.base_descent`, ∝ fractional shortening) and a slow respiratory/probe drift — so speckle
  moves with the myocardium as speckle tracking assumes. Inside the heart the scatterers decorrelate
  gradually (an AR(1) whose rate, set per second and so the same at every fps, rises with the wall's speed:
  out-of-plane motion); chest wall and deep tissue keep theirs; each frame adds a little independent noise.
  The echo map is blurred by the beam's PSF and the log image by σ 0.85 px (the resampling of a real cine
  to 112²). Calibrated on a real 30 fps cine (`scripts/temporal_stats.py`, docs/temporal_correlation.png):
  frame correlation inside the sector 0.96 / 0.90 / 0.83 / 0.78 at 33 / 100 / 200 / 333 ms (real 0.97 /
  0.92 / 0.85 / 0.80), order cue 0.26 (real 0.29), the same in ms at 30 and 80 fps.

Anatomy in PLAX position (heart coordinates, long axis roughly horizontal): chest wall under the apex; right
ventricle (top); interventricular septum; LV cavity (left) whose diameter shortens over the cardiac cycle
while the septum and posterior wall thicken; posterior wall and bright pericardium; aortic root (right of the
LV outflow, continuous with the septum) with sinus bulges and two leaflets (right- and non-coronary cusps)
that open toward the root walls in systole and meet near the centre, bowing toward the LV, in diastole; left
atrium below the root; mitral valve (anterior leaflet hanging off the posterior aortic wall, posterior leaflet
off the annulus) opening in early (E) and late (A) diastole; descending aorta behind the LA.

Per-study latents (`StudyLatents`, shared by all of the study's 1–5 videos): chamber sizes (LV, RV, LA,
aortic root), wall thicknesses, heart rate (55–100 bpm), LV function (fractional shortening, 15 % reduced),
long-axis tilt and placement, tissue echogenicity, and the AS grade (none/mild/moderate/severe with
P(severe) = `severe_fraction`, 0.22 as in the paper's cohort; the rest 55/25/20 % none/mild/moderate). The
grade's continuous severity sets the aortic valve's systolic opening, leaflet thickness, brightness and
calcium spots. `difficulty` ∈ [0, 1] trades how much AS moves those quantities (strength 1 − 0.8·d) against
how much the same quantities vary at random per study (scale 0.5 + d), including a sclerosis confounder
(thick, bright leaflets that still open). Leaflet length, asymmetry, cusp bowing and calcium positions are
per-study too, so a valve looks the same across its study's videos and differs between studies: the cue
multi-instance contrastive pretraining can latch onto. The cue is local (the valve spans a few pixels).

Per-video acquisition nuisances (`Acquisition`): depth/zoom, sector angle and radius, apex position, small
rotation and translation, gain, noise floor, dynamic range, depth attenuation, speckle size and persistence,
frame rate (30–80 fps), cardiac phase at frame 0, length (`min_frames`..`max_frames`, 32–100) and a ±10 %
valve visibility change (scan-plane jitter); `plax_prob` ~ U(0.6, 1).

Determinism: every study is a pure function of (seed, split, study index) and every video of (seed, split,
study index, video index), so builds are reproducible and parallel-safe. Splits train/val/test are disjoint
by study; study_id `syn-<split>-<index:05d>` (= patient_id), video_id `<study_id>_<n>`. Extra features:
`valve_box` (int32 (4,) [x0, y0, x1, y1), end-exclusive pixel box in the 112² frame around the aortic
leaflets over the whole video, i.e. the union of the per-frame boxes), 2.0.0 also `valve_boxes` (int32
(num_frames, 4), the same box at every frame: the valve moves with the base), `heart_rate` (bpm) and
`as_severity` (the continuous severity behind the grade).

Build: `tfds build data_builders/synthetic_echo [--config small|benchmark|tiny] --data_dir=OUT`, or
`Builder(config='small', data_dir=OUT).download_and_prepare()` (`version='1.0.0'` rebuilds the 1.x data
pixel for pixel). Studies render in `num_workers` spawned processes (same records as in-process; default 2,
or none for configs under 100 studies or on one core); the workers run only echojax code, so no
`if __name__ == '__main__':` guard is needed. `small` (2.0.0) takes ≈ 50 s of CPU.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import multiprocessing
import os
import sys
import types
from typing import Iterator, Optional

import numpy as np
import tensorflow_datasets as tfds

from echojax.data import builder_common, records, synthetic

SPLITS = ('train', 'val', 'test')


@dataclasses.dataclass(eq=False)
class SyntheticEchoConfig(tfds.core.BuilderConfig):
  """Size and generative knobs of one synthetic_echo variant."""
  num_train: int = 240
  num_val: int = 60
  num_test: int = 60
  seed: int = 0
  difficulty: float = 0.5
  severe_fraction: float = 0.22
  min_frames: int = 32
  max_frames: int = 100

  def num_studies(self, split: str) -> int:
    return {'train': self.num_train, 'val': self.num_val, 'test': self.num_test}[split]


def _check(config: SyntheticEchoConfig) -> None:
  for split in SPLITS:
    if config.num_studies(split) < 1:
      raise ValueError(f'synthetic_echo config {config.name!r}: num_{split} must be >= 1 '
                       f'(got {config.num_studies(split)}); TFDS cannot write an empty split')
  if not 0.0 <= config.difficulty <= 1.0:
    raise ValueError(f'synthetic_echo config {config.name!r}: difficulty must be in [0, 1], '
                     f'got {config.difficulty}')
  if not 0.0 <= config.severe_fraction <= 1.0:
    raise ValueError(f'synthetic_echo config {config.name!r}: severe_fraction must be in [0, 1], '
                     f'got {config.severe_fraction}')
  if not 1 <= config.min_frames <= config.max_frames:
    raise ValueError(f'synthetic_echo config {config.name!r}: need 1 <= min_frames <= max_frames, '
                     f'got {config.min_frames}, {config.max_frames}')


_CONFIGS = [
    SyntheticEchoConfig(name='small', description='360 studies (240/60/60): the default, builds in minutes.'),
    SyntheticEchoConfig(name='benchmark', description='2,000 studies (1,500/200/300, 75/10/15 as the paper).',
                        num_train=1500, num_val=200, num_test=300),
    SyntheticEchoConfig(name='tiny', description='12 short-video studies (8/2/2) for tests.',
                        num_train=8, num_val=2, num_test=2, max_frames=40),
    SyntheticEchoConfig(name='ci', description='28 short-video studies (16/6/6, 40 % severe) for the '
                        'trainer tests: every split has both classes.',
                        num_train=16, num_val=6, num_test=6, severe_fraction=0.4, min_frames=20,
                        max_frames=36),
]


class Builder(builder_common.ModuleCodePath, tfds.core.GeneratorBasedBuilder):
  """Synthetic PLAX cines (severe AS vs. not) as echojax per-video records, study by study."""

  VERSION = tfds.core.Version(synthetic.LATEST_VERSION)
  RELEASE_NOTES = {
      '1.0.0': 'First release.',
      '2.0.0': 'Tissue-locked speckle advected with the heart (wall thickening, root/valve and base motion, '
               'drift), decorrelating gradually per second; temporal statistics calibrated on a real 30 fps '
               'cine. New feature valve_boxes (per-frame aortic-valve box). Same study latents (AS grade and '
               'valve), acquisitions and difficulty knob as 1.0.0.',
  }
  # Every config at every generator version: TFDS generates only a config's own version, so 1.0.0 stays
  # buildable (`config='small', version='1.0.0'`, or 'synthetic_echo/small:1.0.0') into <config>/1.0.0.
  BUILDER_CONFIGS = [dataclasses.replace(c, version=v) for v in synthetic.GENERATOR_VERSIONS[::-1]
                     for c in _CONFIGS]
  DEFAULT_CONFIG_NAME = 'small'

  def __init__(self, *, num_workers: Optional[int] = None, **kwargs):
    self._num_workers = num_workers
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    extra = {
        'valve_box': tfds.features.Tensor(shape=(4,), dtype=np.int32),
        'heart_rate': np.float32,
        'as_severity': np.float32,
    }
    if self.version.major >= 2:
      extra['valve_boxes'] = tfds.features.Tensor(shape=(None, 4), dtype=np.int32)
    return self.dataset_info_from_configs(
        description=__doc__.split('\n')[0],
        features=records.video_features(extra),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download: every video is generated
    _check(self.builder_config)
    return {split: self._generate_examples(split) for split in SPLITS}

  def _studies(self, split: str) -> Iterator[dict]:
    """Rendered studies of a split in index order; a bounded window of them in flight in worker processes."""
    cfg = self.builder_config
    kwargs = dict(difficulty=cfg.difficulty, severe_fraction=cfg.severe_fraction,
                  min_frames=cfg.min_frames, max_frames=cfg.max_frames,
                  version=str(self.version))   # the dataset version is the generator's
    tasks = [(cfg.seed, split, index, kwargs) for index in range(cfg.num_studies(split))]
    workers = _default_workers(cfg) if self._num_workers is None else int(self._num_workers)
    if workers <= 0:
      yield from map(synthetic.render_study_for_records, tasks)
      return
    with _worker_pool(workers) as pool:
      window = collections.deque()
      for task in tasks:
        window.append(pool.apply_async(synthetic.render_study_for_records, (task,)))
        if len(window) >= 4 * workers:
          yield window.popleft().get()
      while window:
        yield window.popleft().get()

  def _generate_examples(self, split: str):
    for study_index, study in enumerate(self._studies(split)):
      latents, videos = study['latents'], study['videos']
      for video_index, video in enumerate(videos):
        acquisition = video['acquisition']
        extra = {} if self.version.major < 2 else dict(valve_boxes=video['valve_boxes'])
        record = records.make_record(
            video=video['video'], fps=video['fps'], video_id=video['video_id'], study_id=study['study_id'],
            study_index=study_index, study_num_videos=len(videos), video_index=video_index,
            av_stenosis=study['grade'], patient_id=study['study_id'], plax_prob=acquisition.plax_prob,
            valve_box=np.asarray(video['valve_box'], np.int32),
            heart_rate=np.float32(latents.heart_rate), as_severity=np.float32(latents.severity), **extra)
        record['video'] = video['png']  # already-encoded frames: TFDS stores the bytes as given
        yield video['video_id'], record


def _default_workers(config: SyntheticEchoConfig) -> int:
  """2 worker processes (1 core: none); none for configs under 100 studies, where start-up costs more than it
  saves, and inside daemonic processes, which cannot have children."""
  cores = os.cpu_count() or 1
  if multiprocessing.current_process().daemon or cores < 2 or sum(config.num_studies(s) for s in SPLITS) < 100:
    return 0
  return 2


@contextlib.contextmanager
def _worker_pool(workers: int):
  """A spawn pool (the workers import numpy/OpenCV, never TensorFlow, which is not fork-safe) started without
  the caller's main module: the workers need only echojax code, and spawn would otherwise re-import, i.e.
  re-run, a calling script that lacks the `if __name__ == '__main__':` guard."""
  main = sys.modules['__main__']
  sys.modules['__main__'] = types.ModuleType('__main__')
  try:
    pool = multiprocessing.get_context('spawn').Pool(workers)   # starts every worker now
  finally:
    sys.modules['__main__'] = main
  with pool:                                                    # terminates the workers on exit
    yield pool
