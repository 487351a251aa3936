"""Raw inputs for prediction and saliency, discovered without decoding: one DICOM or video file, a folder
mixing DICOM files and AVI/MP4 videos (subfolders = studies, else `<study>_<n>.avi` names), or a manifest CSV
(study_id, fpath[, video_id]). DICOM files are converted (sector-masked, de-identified; salted ids) into the
output folder first; videos are read one at a time later (`read_frames`), so memory stays bounded."""
from __future__ import annotations

import csv
import dataclasses
import os
import tempfile

VIDEO_EXTS = ('.avi', '.mp4', '.mov', '.mkv')


@dataclasses.dataclass(frozen=True)
class Entry:
  study_id: str
  video_id: str
  path: str
  source: str          # 'dicom' (converted, salted ids) | 'video' | 'manifest'
  name: str = ''       # how rejected.csv names it (never a source path when a salt is known)


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


def _reject_name(path: str, root: str, salt: str | None) -> str:
  """How a rejected file is named in rejected.csv: salted when a salt is known (a folder of a DICOM export
  is often named after the patient), else its path relative to the input."""
  rel = os.path.relpath(path, root)
  if salt:
    from echojax.data import dicom
    return f'file:{dicom.study_key(rel, salt)}'
  return rel


def _manifest_entries(path: str) -> list[Entry]:
  with open(path, newline='') as f:
    rows = list(csv.DictReader(f))
  missing = {'study_id', 'fpath'} - set(rows[0] if rows else [])
  if missing:
    raise ValueError(f'{path}: missing column(s) {sorted(missing)}')
  base = os.path.dirname(os.path.abspath(path))
  return [Entry(r['study_id'], r.get('video_id') or os.path.splitext(os.path.basename(r['fpath']))[0],
                r['fpath'] if os.path.isabs(r['fpath']) else os.path.join(base, r['fpath']), 'manifest',
                r['fpath']) for r in rows]


def _convert_dicoms(dicoms: list[str], root: str, work_dir: str, salt: str, key_map: str | None):
  """Converts exactly the DICOM files given (staged as symlinks under a private temporary folder, outside the
  output, so no source path lands there) → (entries, rejects)."""
  from echojax.data import convert_dicom
  out = os.path.join(work_dir, 'dicom_converted')
  with tempfile.TemporaryDirectory(prefix='echojax-dicom-') as stage:
    for f in dicoms:
      link = os.path.join(stage, os.path.relpath(f, root))
      os.makedirs(os.path.dirname(link), exist_ok=True)
      os.symlink(os.path.abspath(f), link)
    convert_dicom.convert_dicom_folder(stage, out, salt=salt, progress=False, key_map=key_map)
  entries = [Entry(m['study_id'], m['video_id'], m['path'], 'dicom', f"dicom:{m['video_id']}")
             for m in convert_dicom.read_manifest(out)]
  rejects = [(r['path'], r['reason']) for r in convert_dicom.read_rejects(out)]
  return entries, rejects


def discover(path: str, work_dir: str, salt: str | None = None, key_map: str | None = None):
  """→ (entries [Entry], rejects [(name, reason)]) without decoding any video. DICOM inputs need a salt
  (argument or $ECHOJAX_DICOM_SALT); `key_map` (outside work_dir) receives the converter's private map of
  salted ids to source paths and accession numbers when it does not exist yet."""
  if not os.path.exists(path):
    raise FileNotFoundError(f'input not found: {path}')
  if os.path.isfile(path) and path.lower().endswith('.csv'):
    return _manifest_entries(path), []
  if os.path.isfile(path):
    files, root = [os.path.abspath(path)], os.path.dirname(os.path.abspath(path))
  else:
    root = os.path.abspath(path)
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs)
    work = os.path.realpath(work_dir)
    files = [f for f in files if os.path.commonpath([os.path.realpath(f), work]) != work]  # skip our output
  videos = [f for f in files if f.lower().endswith(VIDEO_EXTS)]
  dicoms = [f for f in files if f not in videos and (f.lower().endswith('.dcm') or _is_dicom(f))]
  salt = salt or os.environ.get('ECHOJAX_DICOM_SALT')
  if dicoms and not salt:
    raise ValueError('DICOM input needs a salt for the de-identified ids: pass --salt or set '
                     'ECHOJAX_DICOM_SALT (the same one as the conversion of the training data, to map ids)')
  entries, rejects = [], []
  if dicoms:
    entries, rejects = _convert_dicoms(dicoms, root, work_dir, salt,
                                       key_map if key_map and not os.path.exists(key_map) else None)
  entries += [Entry(_study_of(f, root), os.path.splitext(os.path.basename(f))[0], f, 'video',
                    _reject_name(f, root, salt)) for f in videos]
  rejects += [(_reject_name(f, root, salt), 'not a video or DICOM file') for f in files
              if f not in videos and f not in dicoms]
  return entries, rejects


def read_frames(entry: Entry, max_frames: int | None = 100):
  """uint8 (T, 112, 112) frames of one entry, or a reason string when it cannot be read."""
  from echojax.data import video_io
  try:
    return video_io.read_video(entry.path, max_frames=max_frames)[0]
  except video_io.VideoReadError as e:
    return e.reason
  except Exception as e:  # one bad file never stops a prediction run
    return f'{type(e).__name__}: {e}'


def load_inputs(path: str, work_dir: str, salt: str | None = None, max_frames: int | None = 100):
  """Every input decoded at once → (videos [(study_id, video_id, frames)], rejects); small inputs only
  (predict streams through `discover` + `read_frames` instead)."""
  entries, rejects = discover(path, work_dir, salt)
  videos = []
  for e in entries:
    frames = read_frames(e, max_frames)
    if isinstance(frames, str):
      rejects.append((e.name, frames))
    else:
      videos.append((e.study_id, e.video_id, frames))
  return videos, rejects


def add_input_arguments(parser, input_help: str) -> None:
  """The input and salt flags predict and saliency share."""
  parser.add_argument('--checkpoint', required=True, help='fine-tuning workdir')
  parser.add_argument('--input', required=True, help=input_help)
  parser.add_argument('--salt', default=None, help='salt for DICOM ids (default $ECHOJAX_DICOM_SALT)')
  parser.add_argument('--salt-file', default=None, help='read the salt from this file (as convert_dicom)')


def salt_of(args):
  """--salt, else the contents of --salt-file, else None ($ECHOJAX_DICOM_SALT is read where it is used)."""
  if args.salt_file:
    from echojax.data.convert_dicom import read_salt
    return read_salt(None, args.salt_file)
  return args.salt
