"""The DICOM source of the `echo_studies` builder: converts `<manual_dir>/dicom/` into a resumable cache
(convert_dicom) and joins a label table keyed by accession number or StudyInstanceUID to the converted cines
by salted hash. Returns studies in study_tables' form, so the builder writes them through its usual loop.
Only salted hashes of identifiers leave this module (in studies, rejects and messages).
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Dict, List, Optional, Tuple

from echojax.data import convert_dicom, dicom, records, study_tables

SALT_ENV = 'ECHOJAX_DICOM_SALT'
NO_CINE = 'no usable DICOM cine for this study'
NO_LABEL = 'no label row for this converted cine'


def find_salt(options: study_tables.StudyTableOptions) -> Optional[str]:
  return options.salt or os.environ.get(SALT_ENV) or None


def require_salt(options: study_tables.StudyTableOptions) -> str:
  salt = find_salt(options)
  if not salt:
    raise ValueError(f'the DICOM source needs a secret salt for the identifier hashes: set ${SALT_ENV} or '
                     f'"salt" in {study_tables.OPTIONS_FILE} (or salt=... in Python); keep it to map label '
                     'CSVs to study ids later')
  return salt


def salt_fingerprint(salt: str) -> str:
  """The converter's salt check (conversion.json): tells builds with different salts apart."""
  return dicom.study_key('echojax-salt-check', salt)


@dataclasses.dataclass
class DicomStudies:
  studies: Dict[str, List[study_tables.Study]]
  rejects: List[Tuple[str, str]]   # (path or '<table>:<line>', reason)
  summary: Dict[str, int]


def prepare(manual_dir, options: study_tables.StudyTableOptions, *, progress: bool = True) -> DicomStudies:
  """Validates the label table, converts new DICOM files (earlier ones stay cached) and joins the two."""
  manual_dir = os.fspath(manual_dir)
  salt = require_salt(options)
  labels = study_tables.read_study_labels(manual_dir, options)   # a bad table fails before any conversion
  dicom_dir = os.path.join(manual_dir, options.dicom_dir)
  converted_dir = os.path.join(manual_dir, options.converted_dir)
  if not os.path.isdir(dicom_dir):
    raise FileNotFoundError(f'DICOM folder {dicom_dir} not found (option "dicom_dir")')
  conversion = convert_dicom.convert_dicom_folder(
      dicom_dir, converted_dir, salt=salt, max_frames=options.max_frames, progress=progress,
      **options.dicom_options)
  # Export paths are often made of UIDs: the dataset's rejects name a file by the converter's salted
  # source_key; its path is in the cache's rejected.csv, which stays next to the inputs.
  listing = os.path.join(converted_dir, 'rejected.csv')
  rejects = [(f'dicom:{row["source_key"]}', f'DICOM file not converted: {row["reason"]} (path in {listing})')
             for row in convert_dicom.read_rejects(converted_dir)]
  studies, join_rejects = join_labels(labels, convert_dicom.read_manifest(converted_dir), salt)
  study_tables.check_leakage(studies, options)
  summary = dict(converted=conversion['converted'], skipped_already_done=conversion['skipped'],
                 cache_videos=conversion['total_videos'], dicom_rejected=len(rejects),
                 labels_without_cine=sum(reason.startswith(NO_CINE) for _, reason in join_rejects),
                 cines_without_label=sum(reason.startswith(NO_LABEL) for _, reason in join_rejects))
  return DicomStudies(studies=studies, rejects=rejects + join_rejects, summary=summary)


def join_labels(labels: Dict[str, List[study_tables.StudyLabel]], manifest: List[dict], salt: str):
  """({split: [Study]}, rejects). A label row names every converted study with its UID's hash (or, keyed by
  accession, its accession's hash; one accession may cover several StudyInstanceUIDs, each its own study).
  Study and patient ids are salted hashes; a study named by two label rows is an error."""
  videos_of = collections.defaultdict(list)         # study_id → manifest rows (sorted by video_num)
  studies_of_accession = collections.defaultdict(set)
  for row in manifest:
    videos_of[row['study_id']].append(row)
    if row['accession_key']:
      studies_of_accession[row['accession_key']].add(row['study_id'])
  claimed: Dict[str, str] = {}
  studies: Dict[str, List[study_tables.Study]] = {}
  rejects, errors = [], []
  for split, split_labels in labels.items():
    studies[split] = []
    for label in split_labels:
      key = dicom.study_key(label.key, salt)
      if label.key_column == 'study_instance_uid':
        study_ids = [key] if key in videos_of else []
      else:
        study_ids = sorted(studies_of_accession.get(key, ()))
      if not study_ids:
        rejects.append((label.source, f'{NO_CINE} ({label.key_column} hash {key})'))
        continue
      patient_id = dicom.study_key(label.patient_id, salt) if label.patient_id else ''
      for study_id in study_ids:
        if study_id in claimed:
          errors.append(f'{claimed[study_id]} and {label.source} (study {study_id})')
          continue
        claimed[study_id] = label.source
        videos = sorted(videos_of[study_id], key=lambda r: r['video_num'])
        if len(videos) > records.MAX_VIDEOS_PER_STUDY:
          errors.append(f'{label.source}: study {study_id} has {len(videos)} cines '
                        f'(max {records.MAX_VIDEOS_PER_STUDY})')
        studies[split].append(study_tables.Study(
            study_id=study_id, patient_id=patient_id, av_stenosis=label.av_stenosis, videos=[
                study_tables.VideoEntry(path=row['path'], fpath=row['fpath'], video_num=str(row['video_num']),
                                        plax_prob=float('nan'), source=label.source,
                                        fps_is_default=row['fps_source'] == 'default')
                for row in videos]))
  if errors:
    raise ValueError('label rows that name the same DICOM study (e.g. by UID and by accession number), or '
                     'too many cines:\n  ' + '\n  '.join(errors))
  for study_id, rows in videos_of.items():
    if study_id not in claimed:
      rejects.extend((row['path'], f'{NO_LABEL} (study {study_id})') for row in rows)
  return studies, rejects
