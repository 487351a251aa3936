"""Raw inputs for prediction and saliency: a folder of DICOM files (converted and de-identified first), a
folder of AVI/MP4 files (subfolders = studies, else `<study>_<n>.avi` names), a manifest CSV (study_id,
fpath) or one file → (study_id, video_id, uint8 frames) and a rejects list."""
from __future__ import annotations

import csv
import os

VIDEO_EXTS = ('.avi', '.mp4', '.mov', '.mkv')


def _is_dicom(path: str) -> bool:
  try:
    with open(path, 'rb') as f:
      head = f.read(132)
    return len(head) == 132 and head[128:132] == b'DICM'
  except OSError:
    return False


def _study_of(path: str, root: str) -> str:
  rel = os.path.relpath(path, root)
  parts = rel.split(os.sep)
  if len(parts) > 1:
    return parts[0]
  stem = os.path.splitext(parts[0])[0]
  return stem.rsplit('_', 1)[0] if '_' in stem else stem


def _read_videos(entries, rejects):
  from echojax.data import video_io
  videos = []
  for study, vid, path in entries:
    try:
      frames, _ = video_io.read_video(path)
      videos.append((study, vid, frames))
    except video_io.VideoReadError as e:
      rejects.append((path, e.reason))
    except Exception as e:  # one bad file never stops a prediction run
      rejects.append((path, f'{type(e).__name__}: {e}'))
  return videos


def load_inputs(path: str, work_dir: str, salt: str | None = None):
  """→ (videos [(study_id, video_id, uint8 (T,H,W))], rejects [(path, reason)]). DICOM inputs are converted
  (masked, de-identified) first; their ids are salted hashes (salt: argument or $ECHOJAX_DICOM_SALT)."""
  rejects: list[tuple[str, str]] = []
  if not os.path.exists(path):
    raise FileNotFoundError(f'input not found: {path}')
  if os.path.isfile(path) and path.lower().endswith('.csv'):
    rows = list(csv.DictReader(open(path)))
    missing = {'study_id', 'fpath'} - set(rows[0] if rows else [])
    if missing:
      raise ValueError(f'{path}: missing column(s) {sorted(missing)}')
    base = os.path.dirname(os.path.abspath(path))
    entries = [(r['study_id'], r.get('video_id') or os.path.splitext(os.path.basename(r['fpath']))[0],
                r['fpath'] if os.path.isabs(r['fpath']) else os.path.join(base, r['fpath'])) for r in rows]
    return _read_videos(entries, rejects), rejects
  if os.path.isfile(path):
    files, root = [path], os.path.dirname(os.path.abspath(path))
  else:
    root = path
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
  dicoms = [f for f in files if _is_dicom(f) or f.lower().endswith('.dcm')]
  if dicoms:
    from echojax.data import convert_dicom
    salt = salt or os.environ.get('ECHOJAX_DICOM_SALT')
    if not salt:
      raise ValueError('DICOM input needs a salt for the de-identified ids: pass --salt or set '
                       'ECHOJAX_DICOM_SALT (keep it to map predictions back to studies)')
    out = os.path.join(work_dir, 'dicom_converted')
    convert_dicom.convert_dicom_folder(root, out, salt=salt, progress=False)
    entries = [(m['study_id'], m['video_id'], m['path']) for m in convert_dicom.read_manifest(out)]
    rejects += [(r['path'], r['reason']) for r in convert_dicom.read_rejects(out)]
    rejects += [(f, 'not a video or DICOM file') for f in files
                if f not in dicoms and not f.lower().endswith(VIDEO_EXTS)]
    return _read_videos(entries, rejects), rejects
  vids = [f for f in files if f.lower().endswith(VIDEO_EXTS)]
  rejects += [(f, 'not a video or DICOM file') for f in files if f not in vids]
  entries = [(_study_of(f, root), os.path.splitext(os.path.basename(f))[0], f) for f in vids]
  return _read_videos(entries, rejects), rejects
