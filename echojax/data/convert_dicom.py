"""Converts a folder of DICOM exports into the seed paper's layout: OUT/videos/*.avi + OUT/manifest.csv.

Also writes OUT/rejected.csv (source path relative to the input, reason) and OUT/previews/*.png for QC.
Resumable (inputs already listed in the manifest or the rejects are skipped), parallel (worker processes),
and one bad file never stops the run. Usage:
  python -m echojax.data.convert_dicom --input DIR --output OUT --salt S [--workers N] [--allow-color] ...
"""
from __future__ import annotations

import argparse
import collections
import csv
import json
import multiprocessing
import os
import re
import sys
from typing import Dict, List, Optional

import cv2
from tqdm import tqdm

from echojax.data import dicom
from echojax.data.video_io import write_video

MANIFEST_COLUMNS = (
    'study_id', 'video_id', 'video_num', 'fpath', 'fps', 'fps_source', 'num_frames', 'source_num_frames',
    'orig_rows', 'orig_cols', 'photometric', 'transfer_syntax', 'crop_box', 'mask_source', 'colour_fraction',
    'physical_delta_x_cm', 'output_pixel_cm', 'accession_key', 'source_key', 'status')
REJECT_COLUMNS = ('path', 'reason', 'source_key')
_INT_COLUMNS = ('video_num', 'num_frames', 'source_num_frames', 'orig_rows', 'orig_cols')
_FLOAT_COLUMNS = ('fps', 'colour_fraction', 'physical_delta_x_cm', 'output_pixel_cm')
# Options whose change would make earlier outputs/decisions inconsistent with new ones.
_OPTION_KEYS = ('max_frames', 'min_frames', 'min_fps', 'allow_color')
_FILTER_KEYS = ('min_frames', 'min_fps', 'allow_color')   # may change together with retry_rejected


def source_key(rel_path: str, size: int, mtime_ns: int, salt: str) -> str:
  """Identity of one input file version (salted, so the manifest does not reveal source paths)."""
  return dicom.study_key(f'{rel_path}\x1f{size}\x1f{mtime_ns}', salt)


def read_manifest(output_dir) -> List[dict]:
  """Manifest rows (numbers parsed, '' → None) plus 'path', the absolute path of the video."""
  path = os.path.join(output_dir, 'manifest.csv')
  if not os.path.exists(path):
    return []
  rows = []
  with open(path, newline='') as f:
    for row in csv.DictReader(f):
      for key in _INT_COLUMNS:
        if key in row:
          row[key] = int(row[key]) if row[key] not in ('', None) else None
      for key in _FLOAT_COLUMNS:
        if key in row:
          row[key] = float(row[key]) if row[key] not in ('', None) else None
      row['path'] = os.path.join(os.path.abspath(output_dir), row['fpath'])
      rows.append(row)
  return rows


def read_rejects(output_dir) -> List[dict]:
  path = os.path.join(output_dir, 'rejected.csv')
  if not os.path.exists(path):
    return []
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def _write_csv_atomic(path, columns, rows) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)


def _list_files(input_dir: str, output_dir: str) -> List[str]:
  """Relative paths of all regular files below input_dir (not descending into output_dir), sorted."""
  skip = os.path.realpath(output_dir)
  found = []
  for root, dirs, files in os.walk(input_dir):
    dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) != skip)
    for name in files:
      full = os.path.join(root, name)
      if os.path.isfile(full):
        found.append(os.path.relpath(full, input_dir))
  return sorted(found)


def _convert_task(task):
  """Worker: (rel_path, key, ok, payload); payload is a ConvertedCine or a reject reason. Never raises."""
  full_path, rel_path, key, options = task
  ds = None
  try:
    ds = dicom.read_dataset(full_path)
    return rel_path, key, True, dicom.convert_dataset(ds, **options)
  except dicom.DicomReject as e:
    return rel_path, key, False, e.reason
  except Exception as e:  # pylint: disable=broad-except
    # Unexpected failures are reported without their message unless it can be scrubbed of header values.
    message = dicom.scrub(str(e), ds)[:200] if ds is not None else ''
    return rel_path, key, False, f'internal error: {type(e).__name__}' + (f': {message}' if message else '')


def _reason_group(reason: str) -> str:
  return re.split(r' \(|:', reason, maxsplit=1)[0].strip()


def _load_config(output_dir, salt, options, retry_rejected) -> None:
  path = os.path.join(output_dir, 'conversion.json')
  salt_check = dicom.study_key('echojax-salt-check', salt)
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if previous.get('salt_check') != salt_check:
      raise ValueError(f'{output_dir} was converted with a different salt; ids would not match. '
                       'Use the same salt or a new output folder.')
    changed = [k for k in _OPTION_KEYS if previous.get('options', {}).get(k) != options[k]]
    allowed = set(_FILTER_KEYS) if retry_rejected else set()
    if set(changed) - allowed:
      raise ValueError(f'{output_dir} was converted with other options ({", ".join(changed)}: '
                       f'{[previous.get("options", {}).get(k) for k in changed]} → {[options[k] for k in changed]}); '
                       'use the same options, a new output folder, or --retry-rejected for filter options.')
  with open(path, 'w') as f:
    json.dump({'salt_check': salt_check, 'options': options}, f, indent=1)


def convert_dicom_folder(input_dir, output_dir, *, salt: str, workers: int = 1, max_frames: int = 100,
                         min_frames: int = 16, min_fps: float = 25.0, allow_color: bool = False,
                         retry_rejected: bool = False, progress: bool = True) -> Dict:
  """Converts every DICOM cine under input_dir; returns a summary (counts and reject reasons).

  Inputs are keyed by a salted hash of (relative path, size, mtime): on a rerun those already converted or
  rejected are skipped (rejected ones are retried with retry_rejected=True).
  """
  if not salt:
    raise ValueError('a non-empty salt is required')
  input_dir, output_dir = os.fspath(input_dir), os.fspath(output_dir)
  if not os.path.isdir(input_dir):
    raise FileNotFoundError(f'input folder {input_dir} does not exist')
  for sub in ('videos', 'previews'):
    os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
  options = dict(max_frames=max_frames, min_frames=min_frames, min_fps=float(min_fps),
                 allow_color=bool(allow_color))
  _load_config(output_dir, salt, options, retry_rejected)

  manifest = read_manifest(output_dir)
  rejects = read_rejects(output_dir)
  if retry_rejected:
    rejects = []
  done = {row['source_key'] for row in manifest} | {row['source_key'] for row in rejects}
  video_ids = {row['video_id'] for row in manifest}
  manifest_path = os.path.join(output_dir, 'manifest.csv')
  rejects_path = os.path.join(output_dir, 'rejected.csv')
  # Rewrite in the current column layout, then append as results arrive (a crash keeps what was done).
  _write_csv_atomic(manifest_path, MANIFEST_COLUMNS, manifest)
  _write_csv_atomic(rejects_path, REJECT_COLUMNS, rejects)

  tasks, skipped = [], 0
  for rel_path in _list_files(input_dir, output_dir):
    full_path = os.path.join(input_dir, rel_path)
    stat = os.stat(full_path)
    key = source_key(rel_path, stat.st_size, stat.st_mtime_ns, salt)
    if key in done:
      skipped += 1
      continue
    tasks.append((full_path, rel_path, key, dict(options, salt=salt)))

  new_reasons = collections.Counter()
  converted = 0
  with open(manifest_path, 'a', newline='') as mf, open(rejects_path, 'a', newline='') as rf:
    manifest_writer = csv.DictWriter(mf, fieldnames=MANIFEST_COLUMNS, extrasaction='ignore')
    reject_writer = csv.DictWriter(rf, fieldnames=REJECT_COLUMNS)

    def reject(rel_path, key, reason):
      row = dict(path=rel_path, reason=reason, source_key=key)
      reject_writer.writerow(row)
      rf.flush()
      rejects.append(row)
      new_reasons[_reason_group(reason)] += 1

    pool = None
    if workers > 1 and len(tasks) > 1:
      # spawn: the parent may hold TensorFlow/JAX threads, which fork() does not copy safely.
      pool = multiprocessing.get_context('spawn').Pool(min(workers, len(tasks)))
      # imap keeps the sorted input order, so which of two copies of an image is kept is deterministic.
      results = pool.imap(_convert_task, tasks, chunksize=1)
    else:
      results = map(_convert_task, tasks)
    try:
      for rel_path, key, ok, payload in tqdm(results, total=len(tasks), disable=not progress,
                                            desc='DICOM', unit='file'):
        if not ok:
          reject(rel_path, key, payload)
          continue
        meta = dict(payload.metadata)
        if meta['video_id'] in video_ids:
          reject(rel_path, key, 'duplicate SOPInstanceUID (this image was already converted)')
          continue
        try:
          _write_outputs(output_dir, meta['video_id'], payload)
        except Exception as e:  # pylint: disable=broad-except
          reject(rel_path, key, f'output write failed: {type(e).__name__}')
          continue
        meta.update(fpath=f'videos/{meta["video_id"]}.avi', source_key=key, video_num='')
        manifest_writer.writerow(meta)
        mf.flush()
        manifest.append(meta)
        video_ids.add(meta['video_id'])
        converted += 1
    finally:
      if pool is not None:
        pool.close()
        pool.join()

  manifest.sort(key=lambda r: (r['study_id'], r['video_id']))
  ordinal = collections.Counter()
  for row in manifest:
    row['video_num'] = ordinal[row['study_id']]
    ordinal[row['study_id']] += 1
  _write_csv_atomic(manifest_path, MANIFEST_COLUMNS, manifest)
  _write_csv_atomic(rejects_path, REJECT_COLUMNS, sorted(rejects, key=lambda r: r['path']))
  return dict(converted=converted, rejected=sum(new_reasons.values()), skipped=skipped,
              total_videos=len(manifest), total_studies=len(ordinal), total_rejected=len(rejects),
              reject_reasons=dict(new_reasons))


def _write_outputs(output_dir, video_id, cine) -> None:
  videos = os.path.join(output_dir, 'videos')
  tmp = os.path.join(videos, f'.partial_{video_id}.avi')   # a crash never leaves a half-written video
  write_video(tmp, cine.video, float(cine.metadata['fps']))
  os.replace(tmp, os.path.join(videos, f'{video_id}.avi'))
  preview = os.path.join(output_dir, 'previews', f'{video_id}.png')
  if not cv2.imwrite(preview, cv2.cvtColor(cine.preview, cv2.COLOR_RGB2BGR)):
    raise OSError(f'cannot write {preview}')


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--input', required=True, help='folder searched recursively for DICOM files')
  parser.add_argument('--output', required=True, help='output folder (videos/, manifest.csv, ...)')
  parser.add_argument('--salt', default=os.environ.get('ECHOJAX_DICOM_SALT'),
                      help='secret salt of the id hashes (default: $ECHOJAX_DICOM_SALT); keep it to map '
                           'label CSVs (StudyInstanceUID/accession) to study ids')
  parser.add_argument('--workers', type=int, default=1)
  parser.add_argument('--max-frames', type=int, default=100)
  parser.add_argument('--min-frames', type=int, default=16)
  parser.add_argument('--min-fps', type=float, default=25.0)
  parser.add_argument('--allow-color', action='store_true', help='keep colour-Doppler cines (as luma)')
  parser.add_argument('--retry-rejected', action='store_true', help='reprocess inputs rejected earlier')
  parser.add_argument('--no-progress', action='store_true')
  args = parser.parse_args(argv)
  if not args.salt:
    parser.error('--salt (or $ECHOJAX_DICOM_SALT) is required')
  summary = convert_dicom_folder(args.input, args.output, salt=args.salt, workers=args.workers,
                                 max_frames=args.max_frames, min_frames=args.min_frames,
                                 min_fps=args.min_fps, allow_color=args.allow_color,
                                 retry_rejected=args.retry_rejected, progress=not args.no_progress)
  print(json.dumps(summary, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
