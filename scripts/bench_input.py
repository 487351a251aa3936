"""Input-pipeline benchmark: echojax tf.data (SSL multi-instance pairs and eval clips) vs the seed code's loader
(OpenCV decode of the WHOLE AVI + NumPy pad/crop/flip + scipy.ndimage.rotate per frame) on the same videos.

Clip convention: an SSL pair counts as 2 clips (2 x 4 frames); an eval video counts as eval_num_clips clips.
Per-core convention: clips per CPU-second of this process (user+sys over all its threads, getrusage), i.e. clips/s
divided by the cores actually used (CPU time / wall time); the seed loader runs single-threaded (1 core).
Last line: input_speedup_vs_seed_loader=<SSL: our clips per CPU-s / seed clips per CPU-s>.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time

import cv2
import numpy as np
import scipy
import scipy.ndimage
import tensorflow as tf

from echojax.data import pipeline  # noqa: E402


def _cpu_seconds():
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def _timed(fn):
  wall, cpu = time.perf_counter(), _cpu_seconds()
  clips = fn()
  return clips, time.perf_counter() - wall, _cpu_seconds() - cpu


# ---- the seed code's loader (CarDS-Yale/EchoCLR imlh-2022/ssl: load_video, _sample_frames, _augment) ----
def seed_load_video(path):
  capture = cv2.VideoCapture(path)
  count = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
  video = np.zeros((count, int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
                    int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), 3), np.uint8)
  for i in range(count):
    _, video[i] = capture.read()
  return video


def seed_sample(x, rng, clip_len=4):
  if x.shape[0] > clip_len:
    start = rng.integers(x.shape[0] - clip_len)
    return x[start:start + clip_len]
  return np.pad(x, ((0, clip_len - x.shape[0]), (0, 0), (0, 0), (0, 0)))


def seed_augment(x, rng, pad=8):
  n, h, w, c = x.shape
  tmp = np.zeros((n, h + 2 * pad, w + 2 * pad, c), x.dtype)
  tmp[:, pad:-pad, pad:-pad] = x
  i, j = rng.integers(0, 2 * pad, 2)
  x = tmp[:, i:i + h, j:j + w]
  if rng.uniform() > 0.5:
    x = np.stack([cv2.flip(f, 1) for f in x])
  if rng.uniform() > 0.5:
    x = np.stack([scipy.ndimage.rotate(f, rng.integers(-10, 11), reshape=False) for f in x])
  return x


def seed_minmax(x):
  return (x - x.min()) / (x.max() - x.min())


def seed_ssl_pairs(pairs, paths, rng):
  for a, b in pairs:
    for vid in (a, b):
      seed_minmax(seed_augment(seed_sample(seed_load_video(paths[vid]), rng), rng).astype(np.float32))
  return 2 * len(pairs)


def seed_eval(video_ids, paths, num_clips=4, clip_len=16):
  for vid in video_ids:
    x = seed_load_video(paths[vid])
    step = max((len(x) - clip_len) // num_clips, 0)
    for k in range(num_clips):
      clip = x[k * step:k * step + clip_len]
      clip = np.pad(clip, ((0, clip_len - len(clip)), (0, 0), (0, 0), (0, 0)))
      seed_minmax(clip.astype(np.float32))
  return num_clips * len(video_ids)


def write_avis(builder, split, out_dir):
  """The same videos as the TFDS records, as MJPG AVIs (3 identical channels) like the seed's layout."""
  paths = {}
  ds = builder.as_dataset(split=split, read_config=__import__('tensorflow_datasets').ReadConfig(
      interleave_cycle_length=1))
  for r in pipeline.as_numpy(ds.map(lambda r: dict(video=r['video'], video_id=r['video_id']))):
    path = os.path.join(out_dir, r['video_id'].decode() + '.avi')
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*'MJPG'), 50, (112, 112))
    for frame in r['video']:
      writer.write(cv2.cvtColor(frame, cv2.COLOR_GRAY2BGR))
    writer.release()
    paths[r['video_id'].decode()] = path
  return paths


def make_bench_builder(data_dir, num_studies, min_frames, max_frames, seed=0):
  from tests import tfds_fixtures  # run as `python -m scripts.bench_input` from the repo root
  rng = np.random.default_rng(seed)
  studies = []
  for s in range(num_studies):
    n = int(rng.integers(1, 5))
    studies.append((f'b{s:04d}', tuple(int(t) for t in rng.integers(min_frames, max_frames + 1, n)),
                    ('none', 'severe')[s % 2], (50.0,) * n))
  return tfds_fixtures.make_tiny_builder(data_dir, studies=studies, realistic=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--builder', default='tiny', help="'tiny' (coded fixture, built here) or a builder name "
                      "such as synthetic_echo (needs --data_dir with it already built)")
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--split', default='train')
  parser.add_argument('--studies', type=int, default=60, help='tiny builder: number of studies (1-4 videos)')
  parser.add_argument('--min_frames', type=int, default=60)
  parser.add_argument('--max_frames', type=int, default=100)
  parser.add_argument('--batch_size', type=int, default=32, help='SSL pairs per batch; eval videos per batch')
  parser.add_argument('--ssl_batches', type=int, default=30)
  parser.add_argument('--seed_pairs', type=int, default=40)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()

  cores = len(os.sched_getaffinity(0))
  print(f'machine: {platform.machine()} {platform.processor() or ""} cores_available={cores} '
        f'python={platform.python_version()} tf={tf.__version__} cv2={cv2.__version__} numpy={np.__version__} '
        f'scipy={scipy.__version__}')
  cv2.setNumThreads(1)
  work = tempfile.mkdtemp(prefix='bench_input_')
  if args.builder == 'tiny':
    builder = make_bench_builder(args.data_dir or os.path.join(work, 'tfds'), args.studies, args.min_frames,
                                 args.max_frames)
  else:
    builder = pipeline.get_builder(args.builder, data_dir=args.data_dir)
  md = pipeline.read_video_metadata(builder, args.split, 0, 1)
  frames = [r['num_frames'] for r in md]
  print(f'data: {builder.info.full_name} split={args.split} videos={len(md)} '
        f'studies={len({r["study_id"] for r in md})} frames/video mean={np.mean(frames):.1f}')
  paths = write_avis(builder, args.split, work)

  by_study = {}
  for r in md:
    by_study.setdefault(r['study_id'], []).append(r['video_id'])
  seed_pairs = [p for vids in by_study.values()
                for p in ([(vids[0], vids[0])] if len(vids) == 1 else
                          [(a, b) for i, a in enumerate(vids) for b in vids[i + 1:]])]
  seed_pairs = (seed_pairs * (1 + args.seed_pairs // len(seed_pairs)))[:args.seed_pairs]
  rng = np.random.default_rng(0)

  cfg = pipeline.default_data_config()
  results = {}

  def measure(name, fn, warmup=None):
    if warmup is not None:  # first-call costs (imports, codec/graph initialisation) are not throughput
      warmup()
    runs = [_timed(fn) for _ in range(args.repeats)]
    clips_per_s = statistics.median(c / w for c, w, _ in runs)
    clips_per_cpu_s = statistics.median(c / max(u, 1e-9) for c, _, u in runs)
    cores_used = statistics.median(u / w for _, w, u in runs)
    results[name] = (clips_per_s, clips_per_cpu_s)
    print(f'{name:10s} clips/s={clips_per_s:9.1f}  clips/CPU-s={clips_per_cpu_s:9.1f}  '
          f'cores_used={cores_used:4.2f}  (median of {args.repeats}; clips per run={runs[0][0]})', flush=True)

  # Seed loaders first: our pipeline's background threads must not run (and bill CPU) during their timing.
  video_ids = [r['video_id'] for r in md]
  measure('seed_ssl', lambda: seed_ssl_pairs(seed_pairs, paths, rng),
          warmup=lambda: seed_ssl_pairs(seed_pairs[:4], paths, rng))
  measure('seed_eval', lambda: seed_eval(video_ids, paths), warmup=lambda: seed_eval(video_ids[:4], paths))

  eval_ds = pipeline.make_dataset(builder, args.split, 'eval', batch_size=args.batch_size, cfg=cfg,
                                  process_index=0, process_count=1)

  def ours_eval():  # one pass over the split (graph built once, outside the timing)
    return sum(int(b['mask'].sum()) for b in pipeline.as_numpy(eval_ds)) * cfg.eval_num_clips

  measure('ours_eval', ours_eval, warmup=lambda: next(pipeline.as_numpy(eval_ds)))
  ssl_ds = pipeline.make_dataset(builder, args.split, 'multi_instance', batch_size=args.batch_size, cfg=cfg,
                                 process_index=0, process_count=1)
  ssl_iter = pipeline.as_numpy(ssl_ds)
  for _ in range(3):  # warm-up: graph tracing, autotune, shuffle buffer fill
    next(ssl_iter)

  def ours_ssl():
    for _ in range(args.ssl_batches):
      next(ssl_iter)
    return 2 * args.batch_size * args.ssl_batches

  measure('ours_ssl', ours_ssl)
  eval_speedup = results['ours_eval'][1] / results['seed_eval'][1]
  print(f'eval per-core speedup (clips/CPU-s ratio) = {eval_speedup:.2f}; '
        f'SSL wall-clock speedup (clips/s ratio, ours on {cores} cores vs seed on 1) = '
        f'{results["ours_ssl"][0] / results["seed_ssl"][0]:.2f}')
  del ssl_iter
  shutil.rmtree(work, ignore_errors=True)  # AVIs (and the tiny TFDS build unless --data_dir was given)
  print(f'input_speedup_vs_seed_loader={results["ours_ssl"][1] / results["seed_ssl"][1]:.3f}')


if __name__ == '__main__':
  main()
