"""A generated PACS-style export (folders `NAME^FIRST_MRN/YYYYMMDD/IM000n`, one per study, tiny cines from
dicom_fixtures) and the hospital registry CSV that goes with it, for the registry tests and the README
walk-through. All identities are invented and distinctive, so a byte search of outputs cannot match by chance.
"""
from __future__ import annotations

import csv
import dataclasses
import os
from typing import Dict, List, Sequence

from tests import dicom_fixtures as F

SALT = 'registry-test-salt-7f3a9c'
PATIENTS = (('QZDOE^JOHN', 'MRNQ70011'), ('QZROE^JANE', 'MRNQ70022'), ('QZPOE^ANNA', 'MRNQ70033'),
            ('QZMOE^PAUL', 'MRNQ70044'), ('QZKOE^RITA', 'MRNQ70055'), ('QZLOE^OMAR', 'MRNQ70066'),
            ('QZNOE^LENA', 'MRNQ70077'), ('QZBOE^IVAN', 'MRNQ70088'))
REGISTRY_COLUMNS = ('MRN', 'Accession', 'AS_Grade', 'Exam Date', 'Comment')


@dataclasses.dataclass(frozen=True)
class ExportStudy:
  name: str              # test handle, never written anywhere
  patient: int           # index into PATIENTS
  grade: str             # as the registry spells it
  cines: int = 1
  in_export: bool = True
  in_registry: bool = True
  by_uid: bool = False   # the registry names this study by its StudyInstanceUID, not its accession number

  @property
  def number(self) -> int:
    return int(self.name[1:])

  @property
  def accession(self) -> str:
    return f'ACCQ{880000 + 17 * self.number}'

  @property
  def study_uid(self) -> str:
    return f'1.2.826.0.1.3680043.8.498.7777{self.number:03d}0000000000000{self.number}'

  @property
  def date(self) -> str:
    return f'2024{1 + self.number % 12:02d}{10 + self.number:02d}'


# Ten studies of eight patients in the export (P0 and P2 have two each); S10's cines have no registry row,
# S11 is a registry row without images, S9 is named by its UID.
STUDIES = (
    ExportStudy('S1', 0, 'Severe', cines=2), ExportStudy('S2', 0, 'moderate'), ExportStudy('S3', 1, 'None'),
    ExportStudy('S4', 2, 'SEVERE'), ExportStudy('S5', 2, 'Mild'),
    ExportStudy('S6', 3, 'Sclerosis without Stenosis', cines=2), ExportStudy('S7', 4, 'severe'),
    ExportStudy('S8', 5, 'MILD'), ExportStudy('S9', 6, 'Moderate', by_uid=True),
    ExportStudy('S10', 7, 'None', in_registry=False), ExportStudy('S11', 1, 'Severe', in_export=False),
)


def patient_folder(study: ExportStudy) -> str:
  name, mrn = PATIENTS[study.patient]
  return f'{name}_{mrn}'


def write_export(root, studies: Sequence[ExportStudy] = STUDIES, frames: int = 16) -> Dict[str, List[str]]:
  """Writes every exported study's cines as `root/NAME^FIRST_MRN/DATE/IM000n`; returns name → paths."""
  paths = {}
  for study in studies:
    if not study.in_export:
      continue
    name, mrn = PATIENTS[study.patient]
    folder = os.path.join(os.fspath(root), patient_folder(study), study.date)
    os.makedirs(folder, exist_ok=True)
    paths[study.name] = []
    for n in range(study.cines):
      path = os.path.join(folder, f'IM{n + 1:04d}')
      F.write_cine(path, frames=frames, seed=10 * study.number + n, study_uid=study.study_uid,
                   AccessionNumber=study.accession, PatientName=name, PatientID=mrn, StudyDate=study.date)
      paths[study.name].append(path)
  return paths


def registry_rows(studies: Sequence[ExportStudy] = STUDIES) -> List[dict]:
  return [{'MRN': PATIENTS[s.patient][1], 'Accession': s.study_uid if s.by_uid else s.accession,
           'AS_Grade': s.grade, 'Exam Date': s.date, 'Comment': 'follow-up'}
          for s in studies if s.in_registry]


def write_registry(path, rows: Sequence[dict], columns: Sequence[str] = REGISTRY_COLUMNS,
                   encoding: str = 'utf-8') -> str:
  with open(path, 'w', newline='', encoding=encoding) as f:
    writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  return os.fspath(path)


def raw_identifiers(studies: Sequence[ExportStudy] = STUDIES) -> List[str]:
  """Every PHI value of the export and the registry (names, MRNs, accession numbers, UIDs, dates)."""
  values = [part for name, mrn in PATIENTS for part in (*name.split('^'), mrn)]
  values += [v for s in studies for v in (s.accession, s.study_uid)]
  return values + list(F.PHI_STRINGS)
