"""The DICOM source of the `echo_studies` builder: converts `<manual_dir>/dicom/` into a resumable cache
(convert_dicom) and joins a label table keyed by accession number or StudyInstanceUID to the converted cines
by salted hash. Returns studies in study_tables' form, so the builder writes them through its usual loop.
Only salted hashes of identifiers leave this module (in studies, rejects and messages).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Tuple

from echojax.data import builder_common, convert_dicom, dicom, study_tables
from echojax.data.registry import NO_CINE, NO_LABEL, join_labels  # noqa: F401 (the join, shared with registry)

SALT_ENV = 'ECHOJAX_DICOM_SALT'


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
  """A slow (scrypt), fixed-nonce check of the salt: tells builds with different salts apart in
  build_summary.json without giving a fast hash from which a short salt could be recovered."""
  return convert_dicom.salt_check(salt, nonce=_FINGERPRINT_NONCE)['hash']


_FINGERPRINT_NONCE = b"echojax-build-summary-salt-check".hex()   # scrypt nonces are hex


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
  # Export paths are often made of names and UIDs: a rejected file is named by the converter's salted
  # source_key (convert_dicom's --key-map maps it back to its path).
  rejects = [(f'dicom:{row["source_key"]}', f'DICOM file not converted: {row["reason"]}')
             for row in convert_dicom.read_rejects(converted_dir)]
  studies, join_rejects = join_labels(labels, convert_dicom.read_manifest(converted_dir), salt)
  studies = study_tables.select_videos(studies, options.min_plax_prob, options.views)
  study_tables.check_leakage(studies, options.allow_cross_split_studies)
  summary = dict(converted=conversion['converted'], skipped_already_done=conversion['skipped'],
                 cache_videos=conversion['total_videos'], dicom_rejected=len(rejects),
                 labels_without_cine=sum(reason.startswith(NO_CINE) for _, reason in join_rejects),
                 cines_without_label=sum(reason.startswith(NO_LABEL) for _, reason in join_rejects))
  return DicomStudies(studies=studies, rejects=rejects + join_rejects, summary=summary)


def fingerprint_parts(manual_dir, options: study_tables.StudyTableOptions) -> Dict[str, Optional[str]]:
  """The DICOM folder's listing digest (new, removed or rewritten files change it) and the salt's check
  (None without a salt at hand: reading a built dataset does not need one, so it is then not compared)."""
  salt = find_salt(options)
  return {'dicom_files': builder_common.tree_digest(os.path.join(os.fspath(manual_dir), options.dicom_dir)),
          'salt_check': salt_fingerprint(salt) if salt else None}
