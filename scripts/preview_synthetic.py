"""Writes a PNG strip of synthetic_echo studies for the README: severe AS rows, then non-severe rows.

Each row is one study's first video: frames spread over one cardiac cycle, then a zoom on the aortic valve
at peak systole (its `valve_box` outlined). Usage:
  python scripts/preview_synthetic.py [--out docs/synthetic_preview.png] [--per_class 3] [--difficulty 0.5]
                                     [--version 2.0.0]
"""
from __future__ import annotations

import argparse
import os

import matplotlib
matplotlib.use('Agg')
import matplotlib.patches as patches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from echojax.data import synthetic  # noqa: E402


def pick_studies(seed: int, split: str, per_class: int, difficulty: float):
  """First `per_class` severe and non-severe study indices of a split (latents only, nothing rendered)."""
  severe, other, index = [], [], 0
  while len(severe) < per_class or len(other) < per_class:
    lat = synthetic.sample_study(synthetic.study_seed(seed, split, index), difficulty=difficulty)
    bucket = severe if lat.grade == 'severe' else other
    if len(bucket) < per_class:
      bucket.append(index)
    index += 1
  return severe + other


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='docs/synthetic_preview.png')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--split', default='train')
  parser.add_argument('--per_class', type=int, default=3)
  parser.add_argument('--frames', type=int, default=6)
  parser.add_argument('--difficulty', type=float, default=0.5)
  parser.add_argument('--version', default=synthetic.LATEST_VERSION, choices=synthetic.GENERATOR_VERSIONS,
                      help='generator version')
  args = parser.parse_args(argv)

  indices = pick_studies(args.seed, args.split, args.per_class, args.difficulty)
  cols = args.frames + 1
  fig, axes = plt.subplots(len(indices), cols, figsize=(1.6 * cols, 1.75 * len(indices)), squeeze=False)
  for row, index in enumerate(indices):
    study = synthetic.render_study(args.seed, args.split, index, difficulty=args.difficulty,
                                   version=args.version)
    latents, (video_id, video, fps) = study.latents, study[2][0]
    acq, motion = study[2][0].acquisition, study[2][0].motion
    cycle = fps * 60.0 / latents.heart_rate          # frames per heartbeat
    picks = np.linspace(0, min(len(video) - 1, cycle), args.frames).round().astype(int)
    phase = synthetic.cardiac_phase(latents, acq)
    for col, frame in enumerate(picks):
      ax = axes[row, col]
      ax.imshow(video[frame], cmap='gray', vmin=0, vmax=255)
      ax.set_title(f't={frame} φ={phase[frame]:.2f}', fontsize=6)
    _, aortic, _ = synthetic.cycle_envelopes(latents, phase)
    peak = int(np.argmax(aortic))
    x0, y0, x1, y1 = synthetic.valve_box(latents, acq, peak, margin=4, motion=motion)
    ax = axes[row, -1]
    ax.imshow(video[peak, y0:y1, x0:x1], cmap='gray', vmin=0, vmax=255,
              extent=(x0 - 0.5, x1 - 0.5, y1 - 0.5, y0 - 0.5))
    bx0, by0, bx1, by1 = synthetic.valve_box(latents, acq, peak, motion=motion)
    ax.add_patch(patches.Rectangle((bx0 - 0.5, by0 - 0.5), bx1 - bx0, by1 - by0, fill=False, color='red', lw=0.6))
    ax.set_title(f'valve t={peak}', fontsize=6)
    axes[row, 0].set_ylabel(f'{study[0]}\n{latents.grade}', fontsize=7,
                            color='firebrick' if latents.grade == 'severe' else 'black')
    for ax in axes[row]:
      ax.set_xticks([])
      ax.set_yticks([])
  fig.suptitle(f'synthetic_echo {args.version} (difficulty {args.difficulty}): severe AS (top) vs. not (bottom)',
               fontsize=9)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  fig.savefig(args.out, dpi=130)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
