"""Converts a folder of DICOM exports into the seed paper's layout: OUT/videos/*.avi + OUT/manifest.csv.

Also writes OUT/rejected.csv (salted source key, reason: no source path), OUT/previews/*.png + *.json for QC
and OUT/conversion.json (options, a slow-KDF salt check, the de-identification audit). Only --key-map FILE,
outside OUT, maps salted keys back to source paths and accession numbers (it holds PHI). Resumable (inputs
already listed in the manifest or the rejects are skipped), parallel (worker processes), and one bad file
never stops the run. Usage:
  python -m echojax.data.convert_dicom --input DIR --output OUT (--salt S | --salt-file F) [--workers N] ...
"""
from __future__ import annotations

import argparse
import collections
import csv
import hashlib
import hmac
import json
import multiprocessing
import os
import re
import secrets
import sys
from typing import Dict, List, Optional

import cv2
from tqdm import tqdm

from echojax.data import deid, dicom
from echojax.data.video_io import write_video

MANIFEST_COLUMNS = (
    'study_id', 'video_id', 'video_num', 'fpath', 'fps', 'fps_source', 'num_frames', 'source_num_frames',
    'orig_rows', 'orig_cols', 'photometric', 'transfer_syntax', 'crop_box', 'mask_source', 'geometry',
    'noise_sigma', 'overlay_removed', 'overlay_masked', 'overlay_fraction', 'colour_fraction',
    'physical_delta_x_cm', 'output_pixel_cm', 'accession_key', 'source_key', 'status')
# No source path: export folders are often named after the patient (NAME_MRN/...). See --key-map.
REJECT_COLUMNS = ('source_key', 'reason')
# The private key map (PHI: source paths, accession numbers); extra columns (e.g. a registry's study column)
# may follow these.
KEY_MAP_COLUMNS = ('source_key', 'source_path', 'status', 'reason', 'study_id', 'video_id', 'accession_key',
                   'accession_number')
_INT_COLUMNS = ('video_num', 'num_frames', 'source_num_frames', 'orig_rows', 'orig_cols', 'overlay_removed',
                'overlay_masked')
_FLOAT_COLUMNS = ('fps', 'colour_fraction', 'physical_delta_x_cm', 'output_pixel_cm', 'noise_sigma',
                  'overlay_fraction')
# The salt check in conversion.json: scrypt (memory-hard, ~50 ms) with a per-folder nonce, so it cannot be
# used to test salt guesses quickly.
SALT_KDF = dict(kdf='scrypt', n=2 ** 14, r=8, p=1, dklen=16)
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
  """Reject rows plus 'path', the reject's PHI-free name (dicom:<source_key>; the key map has the real one)."""
  path = os.path.join(output_dir, 'rejected.csv')
  if not os.path.exists(path):
    return []
  with open(path, newline='') as f:
    rows = [{k: row[k] for k in REJECT_COLUMNS if k in row} for row in csv.DictReader(f)]
  for row in rows:
    row['path'] = f'dicom:{row["source_key"]}'
  return rows


def read_salt(salt: Optional[str] = None, salt_file: Optional[str] = None) -> str:
  """The salt given directly or as a file's content (trailing newline dropped), checked for strength."""
  if salt_file:
    if salt:
      raise ValueError('give the salt either directly or as a file, not both')
    with open(salt_file) as f:
      salt = f.read().rstrip('\r\n')
  return dicom.check_salt(salt)


def _scrypt(salt: str, nonce: str, n: int, r: int, p: int, dklen: int) -> str:
  return hashlib.scrypt(salt.encode(), salt=bytes.fromhex(nonce), n=n, r=r, p=p, dklen=dklen,
                        maxmem=256 * n * r * p + (1 << 20)).hex()


def salt_check(salt: str, nonce: Optional[str] = None) -> dict:
  """A slow, nonced fingerprint of the salt with its KDF parameters (compared by `salt_matches`); a fixed
  nonce makes it deterministic (for comparing builds), a random one (the default) unlinkable."""
  nonce = nonce or secrets.token_hex(16)
  params = {k: v for k, v in SALT_KDF.items() if k != 'kdf'}
  return dict(SALT_KDF, nonce=nonce, hash=_scrypt(salt, nonce, **params))


def salt_matches(record, salt: str) -> bool:
  """Whether `salt` produced `record` (recomputed with the record's own KDF parameters)."""
  if isinstance(record, str):   # folders converted before the KDF: the old fast hash, upgraded on write
    return hmac.compare_digest(record, dicom.study_key('echojax-salt-check', salt))
  try:
    if record['kdf'] != 'scrypt':
      return False
    expected = _scrypt(salt, record['nonce'], *(int(record[k]) for k in ('n', 'r', 'p', 'dklen')))
  except (KeyError, TypeError, ValueError):
    return False
  return hmac.compare_digest(expected, str(record.get('hash', '')))


def check_key_map_path(key_map: str, output_dir: str) -> str:
  """Refuses a key map inside the output folder (which is shared as de-identified)."""
  key_map, output = os.path.realpath(key_map), os.path.realpath(output_dir)
  if os.path.commonpath([key_map, output]) == output:
    raise ValueError('the key map holds PHI (source paths, accession numbers) and must not be written inside '
                     'the output folder; give a path outside it')
  return key_map


def read_key_map(path) -> List[dict]:
  if not os.path.exists(path):
    return []
  with open(path, newline='') as f:
    return list(csv.DictReader(f))


def write_key_map(path, rows: List[dict]) -> None:
  """Writes the private key map (atomically): KEY_MAP_COLUMNS, then any extra column the rows carry."""
  extra = sorted({k for row in rows for k in row} - set(KEY_MAP_COLUMNS))
  _write_csv_atomic(os.fspath(path), KEY_MAP_COLUMNS + tuple(extra), sorted(rows, key=lambda r: r['source_path']))


def _write_csv_atomic(path, columns, rows) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  os.replace(tmp, path)


def _list_files(input_dir: str, output_dir: str, skip_files=()) -> List[str]:
  """Relative paths of all regular files below input_dir (not descending into output_dir), sorted."""
  skip = os.path.realpath(output_dir)
  skip_files = {os.path.realpath(f) for f in skip_files}
  found = []
  for root, dirs, files in os.walk(input_dir):
    dirs[:] = sorted(d for d in dirs if os.path.realpath(os.path.join(root, d)) != skip)
    for name in files:
      full = os.path.join(root, name)
      if os.path.isfile(full) and os.path.realpath(full) not in skip_files:
        found.append(os.path.relpath(full, input_dir))
  return sorted(found)


def _convert_task(task):
  """Worker: (rel_path, key, ok, payload, identity); payload is a ConvertedCine or a reject reason, identity
  (PHI, for the key map only) the file's ids. Never raises on a bad file."""
  full_path, rel_path, key, options = task
  cine, reason, identity = dicom.convert_file(full_path, **options)
  return rel_path, key, cine is not None, cine if cine is not None else reason, identity


def _reason_group(reason: str) -> str:
  return re.split(r' \(|:', reason, maxsplit=1)[0].strip()


def _load_config(output_dir, salt, options, retry_rejected) -> dict:
  path = os.path.join(output_dir, 'conversion.json')
  previous = {}
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    if not salt_matches(previous.get('salt_check'), salt):
      raise ValueError(f'{output_dir} was converted with a different salt; ids would not match. '
                       'Use the same salt or a new output folder.')
    changed = [k for k in _OPTION_KEYS if previous.get('options', {}).get(k) != options[k]]
    allowed = set(_FILTER_KEYS) if retry_rejected else set()
    if set(changed) - allowed:
      raise ValueError(f'{output_dir} was converted with other options ({", ".join(changed)}: '
                       f'{[previous.get("options", {}).get(k) for k in changed]} → {[options[k] for k in changed]}); '
                       'use the same options, a new output folder, or --retry-rejected for filter options.')
  check = previous.get('salt_check')
  config = dict(previous, options=options,
                salt_check=check if isinstance(check, dict) else salt_check(salt))
  _write_json_atomic(path, config)
  return config


def _write_json_atomic(path, data) -> None:
  with open(path + '.tmp', 'w') as f:
    json.dump(data, f, indent=1)
  os.replace(path + '.tmp', path)


def _write_audit(output_dir, config, manifest, rejects) -> None:
  """conversion.json's de-identification section, rebuilt from the per-video sidecars (crash-safe)."""
  files = {}
  for row in manifest:
    sidecar = os.path.join(output_dir, 'previews', f'{row["video_id"]}.json')
    if os.path.exists(sidecar):
      with open(sidecar) as f:
        files[row['video_id']] = json.load(f)
  sources = collections.Counter(r.get('mask_source', '') for r in files.values())
  config['deidentification'] = dict(
      policy=deid.policy(),
      summary=dict(videos=len(manifest), rejected=len(rejects), mask_sources=dict(sources),
                   videos_with_inpainted_overlay=sum(bool(r.get('removed_regions')) for r in files.values()),
                   reject_reasons=dict(collections.Counter(_reason_group(r['reason']) for r in rejects))),
      files=files)
  _write_json_atomic(os.path.join(output_dir, 'conversion.json'), config)


def convert_dicom_folder(input_dir, output_dir, *, salt: str, workers: int = 1, max_frames: int = 100,
                         min_frames: int = 16, min_fps: float = 25.0, allow_color: bool = False,
                         retry_rejected: bool = False, progress: bool = True,
                         key_map: Optional[str] = None) -> Dict:
  """Converts every DICOM cine under input_dir; returns a summary (counts and reject reasons, no PHI).

  Inputs are keyed by a salted hash of (relative path, size, mtime): on a rerun those already converted or
  rejected are skipped (rejected ones are retried with retry_rejected=True). `key_map`: a CSV path outside
  output_dir that receives the private mapping of every input's salted key to its path and accession number.
  """
  salt = dicom.check_salt(salt)
  input_dir, output_dir = os.fspath(input_dir), os.fspath(output_dir)
  if not os.path.isdir(input_dir):
    raise FileNotFoundError(f'input folder {input_dir} does not exist')
  if key_map is not None:
    key_map = check_key_map_path(key_map, output_dir)
  for sub in ('videos', 'previews'):
    os.makedirs(os.path.join(output_dir, sub), exist_ok=True)
  options = dict(max_frames=max_frames, min_frames=min_frames, min_fps=float(min_fps),
                 allow_color=bool(allow_color))
  config = _load_config(output_dir, salt, options, retry_rejected)

  manifest = read_manifest(output_dir)
  rejects = [] if retry_rejected else read_rejects(output_dir)
  done = {row['source_key'] for row in manifest} | {row['source_key'] for row in rejects}
  video_ids = {row['video_id'] for row in manifest}
  manifest_path = os.path.join(output_dir, 'manifest.csv')
  rejects_path = os.path.join(output_dir, 'rejected.csv')
  # Rewrite in the current column layout (dropping the source paths older versions wrote), then append as
  # results arrive (a crash keeps what was done).
  _write_csv_atomic(manifest_path, MANIFEST_COLUMNS, manifest)
  _write_csv_atomic(rejects_path, REJECT_COLUMNS, rejects)

  listing, tasks, skipped = [], [], 0
  new_reasons = collections.Counter()
  for rel_path in _list_files(input_dir, output_dir, [key_map] if key_map else []):
    full_path = os.path.join(input_dir, rel_path)
    try:
      stat = os.stat(full_path)
      key = source_key(rel_path, stat.st_size, stat.st_mtime_ns, salt)
    except OSError:   # vanished or unreadable since the listing: rejected below, by path only
      key = source_key(rel_path, -1, -1, salt)
    listing.append((rel_path, full_path, key))
    if key in done:
      skipped += 1
      continue
    tasks.append((full_path, rel_path, key, dict(options, salt=salt)))

  converted, identities = 0, {}
  with open(manifest_path, 'a', newline='') as mf, open(rejects_path, 'a', newline='') as rf:
    manifest_writer = csv.DictWriter(mf, fieldnames=MANIFEST_COLUMNS, extrasaction='ignore')
    reject_writer = csv.DictWriter(rf, fieldnames=REJECT_COLUMNS, extrasaction='ignore')

    def reject(key, reason):
      row = dict(source_key=key, reason=reason, path=f'dicom:{key}')
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
      for _, key, ok, payload, identity in tqdm(results, total=len(tasks), disable=not progress,
                                                desc='DICOM', unit='file'):
        identities[key] = identity
        if not ok:
          reject(key, payload)
          continue
        meta = dict(payload.metadata)
        if meta['video_id'] in video_ids:
          reject(key, 'duplicate SOPInstanceUID (this image was already converted)')
          continue
        try:
          _write_outputs(output_dir, meta['video_id'], payload)
        except Exception as e:  # pylint: disable=broad-except
          reject(key, f'output write failed: {type(e).__name__}')
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
  _write_csv_atomic(rejects_path, REJECT_COLUMNS, sorted(rejects, key=lambda r: r['source_key']))
  _write_audit(output_dir, config, manifest, rejects)
  if key_map is not None:
    write_key_map(key_map, key_map_rows(read_key_map(key_map), listing, manifest, rejects, identities, salt))
  return dict(converted=converted, rejected=sum(new_reasons.values()), skipped=skipped,
              total_videos=len(manifest), total_studies=len(ordinal), total_rejected=len(rejects),
              reject_reasons=dict(new_reasons))


def key_map_rows(previous: List[dict], listing, manifest: List[dict], rejects: List[dict], identities: Dict,
                 salt: str) -> List[dict]:
  """Key-map rows of every listed input (plus earlier rows of inputs gone since): salted key → source path,
  status, ids and the raw accession number. Inputs skipped in this run keep their earlier row, or have their
  header read again for it."""
  rows = {row['source_key']: row for row in previous}
  converted = {row['source_key']: row for row in manifest}
  rejected = {row['source_key']: row for row in rejects}
  for rel_path, full_path, key in listing:
    if key in rows and key not in identities:
      continue
    identity = identities.get(key)
    if identity is None:
      identity = _read_identity(full_path, salt)
    video = converted.get(key, {})
    rows[key] = dict(source_key=key, source_path=rel_path, status='converted' if video else 'rejected',
                     reason=rejected.get(key, {}).get('reason', ''),
                     study_id=video.get('study_id') or identity.get('study_id', ''),
                     video_id=video.get('video_id', ''), accession_key=identity.get('accession_key', ''),
                     accession_number=identity.get('accession_number', ''))
  return list(rows.values())


def _read_identity(path, salt) -> dict:
  try:
    return dicom.identity(dicom.read_dataset(path), salt)
  except Exception:  # pylint: disable=broad-except
    return {}


def _write_outputs(output_dir, video_id, cine) -> None:
  videos = os.path.join(output_dir, 'videos')
  tmp = os.path.join(videos, f'.partial_{video_id}.avi')   # a crash never leaves a half-written video
  write_video(tmp, cine.video, float(cine.metadata['fps']))
  os.replace(tmp, os.path.join(videos, f'{video_id}.avi'))
  preview = os.path.join(output_dir, 'previews', f'{video_id}.png')
  if not cv2.imwrite(preview, cv2.cvtColor(cine.preview, cv2.COLOR_RGB2BGR)):
    raise OSError('cannot write the preview')
  _write_json_atomic(os.path.join(output_dir, 'previews', f'{video_id}.json'), cine.deid)


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--input', required=True, help='folder searched recursively for DICOM files')
  parser.add_argument('--output', required=True, help='output folder (videos/, manifest.csv, ...)')
  parser.add_argument('--salt', default=None,
                      help=f'secret salt of the id hashes, >= {dicom.MIN_SALT_CHARS} characters (default: '
                           '$ECHOJAX_DICOM_SALT); keep it to map label CSVs (StudyInstanceUID/accession) to '
                           'study ids')
  parser.add_argument('--salt-file', help='read the salt from this file (keeps it out of shell history)')
  parser.add_argument('--key-map', help='also write this CSV (outside --output): salted source keys and '
                                        'study ids → source paths and accession numbers. It contains PHI')
  group = parser.add_argument_group(
      'registry', 'join a registry CSV (one row per study) to the cines and write OUTPUT/labels.csv (salted ids), '
      'so OUTPUT is an echo_studies manual dir (echojax.data.registry)')
  group.add_argument('--labels', help='registry CSV, one row per study')
  group.add_argument('--study-col', help='its accession number or StudyInstanceUID column')
  group.add_argument('--patient-col', help='its patient id (e.g. MRN) column: splits never share a patient')
  group.add_argument('--label-col', help='its AS grade column (None/Mild/Moderate/Severe/Sclerosis without '
                                         'Stenosis, any case; others via --label-map)')
  group.add_argument('--split-col', help='its split column (train/val/test/ext_test); without it splits are '
                                         'made: patient-grouped, stratified by grade, seeded')
  group.add_argument('--split-fractions', default='0.75,0.1,0.15', help='train,val,test (default %(default)s)')
  group.add_argument('--split-seed', type=int, default=0)
  group.add_argument('--label-map', help='JSON {"moderate-severe": "severe", "": "unknown"} or a two-column '
                                         'CSV (value, grade); a grade "exclude" leaves the study out')
  parser.add_argument('--workers', type=int, default=1)
  parser.add_argument('--max-frames', type=int, default=100)
  parser.add_argument('--min-frames', type=int, default=16)
  parser.add_argument('--min-fps', type=float, default=25.0)
  parser.add_argument('--allow-color', action='store_true', help='keep colour-Doppler cines (as luma)')
  parser.add_argument('--retry-rejected', action='store_true', help='reprocess inputs rejected earlier')
  parser.add_argument('--no-progress', action='store_true')
  args = parser.parse_args(argv)
  salt = args.salt if args.salt or args.salt_file else os.environ.get('ECHOJAX_DICOM_SALT')
  if not salt and not args.salt_file:
    parser.error('--salt, --salt-file or $ECHOJAX_DICOM_SALT is required')
  try:
    salt = read_salt(salt, args.salt_file)
    if args.key_map:
      check_key_map_path(args.key_map, args.output)
  except (OSError, ValueError) as e:
    parser.error(str(e) if isinstance(e, ValueError) else f'cannot read the salt file ({type(e).__name__})')
  from echojax.data import registry   # pylint: disable=g-import-not-at-top (loads TensorFlow: only here)
  try:
    spec = registry.spec_from_args(args)   # a bad registry fails before any conversion
  except (OSError, ValueError) as e:
    parser.exit(2, f'error: {e}\n')
  summary = convert_dicom_folder(args.input, args.output, salt=salt, workers=args.workers,
                                 max_frames=args.max_frames, min_frames=args.min_frames,
                                 min_fps=args.min_fps, allow_color=args.allow_color,
                                 retry_rejected=args.retry_rejected, progress=not args.no_progress,
                                 key_map=args.key_map)
  print(json.dumps(summary, indent=1))
  if spec is not None:
    try:
      result = registry.write_registry_labels(args.output, spec, read_manifest(args.output), salt=salt)
    except ValueError as e:
      parser.exit(2, f'error: {e}\n')
    if args.key_map:
      write_key_map(args.key_map, registry.add_to_key_map(read_key_map(args.key_map), result.key_map))
  return 0


if __name__ == '__main__':
  sys.exit(main())
