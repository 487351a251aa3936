"""`echo_studies`: TFDS builder for a user's own echo studies: the seed paper's layout (AVIs + label CSVs) or
DICOM exports + a label CSV keyed by study.

Layout of the manual dir:
  videos/<fpath>                 AVI or MP4 (any size; read as 112×112 gray, first `max_frames` frames)
  train.csv, val.csv, test.csv   optional ext_test.csv; or one labels.csv with a `split` column
  echo_studies.json              optional options, e.g.
      {"columns": {"study_id": "acc_num", "label": "av_stenosis", "mrn": "patient_id"},
       "max_frames": 100, "allow_cross_split_studies": false, "labels_csv": "labels.csv",
       "videos_dir": "videos"}
Columns are read by name: acc_num, fpath, av_stenosis required; video_num, plax_prob, patient_id optional;
`columns` maps your names to these. Options given in Python (`build_echo_studies(..., max_frames=...)` or a
custom `EchoStudiesConfig`) override the JSON file.

DICOM layout (chosen when `<manual_dir>/dicom/` exists, or with {"source": "dicom", "dicom_dir": PATH}):
  dicom/...                      DICOM files in any folder structure (stills, Doppler, SR objects are rejected)
  labels.csv with a split column, or train.csv/val.csv/test.csv: ONE ROW PER STUDY with av_stenosis and
                                 accession_number and/or study_instance_uid (UID wins when a row has both);
                                 optional patient_id (e.g. MRN; stored salted-hashed). Map other names with
                                 "columns", e.g. {"AccessionNumber": "accession_number", "grade": "av_stenosis"}.
  echo_studies.json              optional: "salt" (else $ECHOJAX_DICOM_SALT; required), "converted_dir"
                                 (default .echojax_converted, relative to the manual dir), "dicom_options":
                                 {"workers", "min_frames", "min_fps", "allow_color"} for convert_dicom.
The cines are converted (echojax.data.convert_dicom: sector masked, 112×112 gray) into converted_dir, which
is resumable: a rebuild converts only new files. Label rows join the converted cines by salted hash
(dicom.study_key) of the UID (→ study_id) or accession number (→ accession_key); an accession covering
several StudyInstanceUIDs gives one study per UID. Records carry only salted hashes (study_id, patient_id,
video_id = study_id/ordinal); raw accession numbers, UIDs and MRNs never reach records, rejects or logs.
rejects.csv also lists: files the converter rejected ('dicom:<salted source_key>' + reason; export paths
often hold UIDs, so their paths are only in <converted_dir>/rejected.csv), label rows with no converted cine
('<table>:<line>', 'no usable DICOM cine for this study'), and converted cines with no label row.

Build: `tfds build data_builders/echo_studies --manual_dir=DIR --data_dir=OUT` or
`build_echo_studies(DIR, OUT)`. The tables are validated before any video is read. A video that is missing,
unreadable, corrupt or empty is skipped with a warning and listed in `<builder.data_dir>/rejects.csv`
(path, reason), as is a study that lost all its videos; `build_summary.json` there holds the per-split
counts and the options used. A built dataset is reused as is: after changing tables or options rebuild with
`--overwrite` / `overwrite=True` or another config name.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import sys
import warnings
from typing import Any, Dict, Mapping, Optional

import numpy as np
import tensorflow_datasets as tfds

try:
  from echojax.data import builder_common, records, study_tables, video_io
except ImportError:  # `tfds build data_builders/echo_studies` puts only data_builders/ on sys.path
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))
  from echojax.data import builder_common, records, study_tables, video_io
# echojax.data.dicom_source (pydicom) is imported only for the DICOM layout.

_OPTION_NAMES = ('columns', 'max_frames', 'allow_cross_split_studies', 'labels_csv', 'videos_dir', 'source',
                 'dicom_dir', 'converted_dir', 'dicom_options')
log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class EchoStudiesConfig(tfds.core.BuilderConfig):
  """Fields left None come from `<manual_dir>/echo_studies.json`, then the StudyTableOptions defaults."""
  columns: Optional[Dict[str, str]] = None
  max_frames: Optional[int] = None
  allow_cross_split_studies: Optional[bool] = None
  labels_csv: Optional[str] = None
  videos_dir: Optional[str] = None
  source: Optional[str] = None
  dicom_dir: Optional[str] = None
  converted_dir: Optional[str] = None
  dicom_options: Optional[Dict[str, Any]] = None

  def overrides(self) -> Dict[str, Any]:
    return {name: getattr(self, name) for name in _OPTION_NAMES}


class Builder(builder_common.ReportingBuilder, tfds.core.GeneratorBasedBuilder):
  """Per-video records (echojax.data.records schema) of the user's studies, study by study."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release.'}
  BUILDER_CONFIGS = [EchoStudiesConfig(
      name='default', description='Seed-paper layout; options from echo_studies.json in the manual dir.')]
  DEFAULT_CONFIG_NAME = 'default'
  _options: Optional[study_tables.StudyTableOptions] = None   # set by _split_generators
  _summary: Dict[str, Dict[str, int]] = {}
  _source_summary: Optional[Dict[str, int]] = None   # the DICOM source's conversion/join counts
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put your studies in the manual dir (`--manual_dir=DIR` / `build_echo_studies(DIR, ...)`):
    DIR/videos/...            AVI/MP4 files (e.g. {acc_num}_{video_num}.avi)
    DIR/train.csv, val.csv, test.csv (optional ext_test.csv), or DIR/labels.csv with a `split` column;
      columns acc_num, fpath (relative to DIR/videos or DIR, or absolute), av_stenosis
      (None/Mild/Moderate/Severe/empty = unknown), optional video_num, plax_prob, patient_id.
    DIR/echo_studies.json     optional: {"columns": {"your_name": "acc_num", ...}, "max_frames": 100,
      "allow_cross_split_studies": false, "labels_csv": "labels.csv", "videos_dir": "videos"}
  Or DICOM exports: DIR/dicom/... plus labels.csv (or per-split CSVs) with one row per study: av_stenosis and
    accession_number or study_instance_uid (optional patient_id, split); a secret salt in
    $ECHOJAX_DICOM_SALT (or "salt" in echo_studies.json). Converted cines are cached in
    DIR/.echojax_converted ("converted_dir").
  """

  def __init__(self, *, salt: Optional[str] = None, **kwargs):
    # The DICOM source's secret salt is no config field: TFDS logs custom configs, and it must not rename one.
    self._salt = salt
    super().__init__(**kwargs)

  def _load_options(self, manual_dir) -> study_tables.StudyTableOptions:
    return study_tables.load_options(manual_dir, dict(self.builder_config.overrides(), salt=self._salt))

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__.split('\n')[0],
        features=records.video_features({
            'fps_is_default': np.bool_,   # container reported no fps; video_io.DEFAULT_FPS used
        }),
        disable_shuffling=True,   # the multi-instance pipeline needs each study's videos contiguous
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    self._options = self._load_options(manual_dir)
    self._rejects = []
    self._summary = {}
    self._source_summary = None
    if self._options.source == 'dicom':
      from echojax.data import dicom_source   # pylint: disable=g-import-not-at-top
      prepared = dicom_source.prepare(manual_dir, self._options)
      studies = prepared.studies
      self._rejects.extend(prepared.rejects)
      self._source_summary = prepared.summary
    else:
      studies = study_tables.read_study_tables(manual_dir, self._options)   # validation before any video
    return builder_common.drop_empty_splits(
        {split: self._generate_examples(split, split_studies) for split, split_studies in studies.items()},
        self._rejects, warn_as='echo_studies')

  def _generate_examples(self, split: str, studies):
    counts = self._summary.setdefault(split, dict.fromkeys(
        ('studies_listed', 'studies_kept', 'videos_listed', 'videos_kept', 'videos_rejected',
         'studies_dropped', 'fps_defaulted', 'truncated'), 0))
    study_index = 0
    for study in studies:
      counts['studies_listed'] += 1
      counts['videos_listed'] += len(study.videos)
      kept = []
      for entry in study.videos:
        try:
          decoded = video_io.read_video(entry.path, max_frames=self._options.max_frames)
        except video_io.VideoReadError as e:
          warnings.warn(f'echo_studies: skipping {entry.path} ({entry.source}): {e.reason}')
          self._rejects.append((entry.path, f'{e.reason} [{split} study {study.study_id}, {entry.source}]'))
          counts['videos_rejected'] += 1
          continue
        kept.append((entry, decoded))
      if not kept:
        self._rejects.append((f'study:{study.study_id}',
                              f'{split}: all {len(study.videos)} video(s) rejected; study dropped'))
        counts['studies_dropped'] += 1
        continue
      for video_index, (entry, decoded) in enumerate(kept):
        fps_is_default = (not decoded.fps_from_container if entry.fps_is_default is None
                          else entry.fps_is_default)
        counts['fps_defaulted'] += fps_is_default
        counts['truncated'] += decoded.truncated
        key = f'{study.study_id}/{entry.video_num}'
        yield key, records.make_record(
            video=decoded.frames, fps=decoded.fps, video_id=key, study_id=study.study_id,
            study_index=study_index, study_num_videos=len(kept), video_index=video_index,
            av_stenosis=study.av_stenosis, patient_id=study.patient_id, plax_prob=entry.plax_prob,
            fps_is_default=fps_is_default)
      counts['studies_kept'] += 1
      counts['videos_kept'] += len(kept)
      study_index += 1

  def _build_summary(self):
    summary = {'splits': self._summary, 'rejected': len(self._rejects),
               'options': _recorded_options(self._options) if self._options else None}
    if self._source_summary is not None:
      summary['dicom'] = self._source_summary
    return summary

  def _download_and_prepare(self, dl_manager, download_config=None):
    summary = super()._download_and_prepare(dl_manager, download_config)   # writes the build report
    print('\n' + format_summary(summary), flush=True)   # after TFDS's progress bars


def _recorded_options(options: study_tables.StudyTableOptions) -> Dict[str, Any]:
  """Options as written to build_summary.json: the DICOM source adds the salt's fingerprint, never the salt."""
  recorded = options.to_dict()
  if options.source == 'dicom':
    from echojax.data import dicom_source   # pylint: disable=g-import-not-at-top
    salt = dicom_source.find_salt(options)
    if salt:
      recorded['salt_check'] = dicom_source.salt_fingerprint(salt)
  return recorded


def format_summary(summary: Mapping[str, Any]) -> str:
  lines = ['echo_studies build summary:']
  if 'dicom' in summary:
    d = summary['dicom']
    lines.append(f'  DICOM: {d["converted"]} cines converted now, {d["skipped_already_done"]} files done before, '
                 f'{d["dicom_rejected"]} files rejected by the converter, {d["labels_without_cine"]} label '
                 f'rows without a cine, {d["cines_without_label"]} cines without a label row')
  for split, c in summary['splits'].items():
    lines.append(f'  {split}: {c["studies_kept"]}/{c["studies_listed"]} studies, '
                 f'{c["videos_kept"]}/{c["videos_listed"]} videos kept, {c["videos_rejected"]} rejected, '
                 f'{c["studies_dropped"]} studies dropped, {c["fps_defaulted"]} with default fps, '
                 f'{c["truncated"]} cut to max_frames')
  lines.append(f'  rejects listed: {summary["rejected"]}')
  return '\n'.join(lines)


def build_echo_studies(manual_dir, data_dir, *, config_name: Optional[str] = None, overwrite: bool = False,
                       file_format: Optional[str] = None, salt: Optional[str] = None, **options) -> Builder:
  """Builds (or reuses) echo_studies from `manual_dir` into `data_dir`; returns the prepared builder.

  `options` (columns, max_frames, allow_cross_split_studies, labels_csv, videos_dir; for DICOM source,
  dicom_dir, converted_dir, dicom_options) override echo_studies.json; with any given, the config is named
  `config_name or 'custom'`. `salt` (DICOM source; else echo_studies.json or $ECHOJAX_DICOM_SALT) is not
  an option of the config. Reusing a built dataset whose recorded options differ from the requested ones
  (the salt's fingerprint included) raises (use overwrite=True).
  """
  unknown = sorted(set(options) - set(_OPTION_NAMES))
  if unknown:
    raise TypeError(f'unknown option(s) {unknown}; known: {list(_OPTION_NAMES)}')
  manual_dir = os.fspath(manual_dir)
  if any(v is not None for v in options.values()) or config_name not in (None, 'default'):
    config = EchoStudiesConfig(name=config_name or 'custom', version=Builder.VERSION,
                               description='echo_studies with options given in Python', **options)
  else:
    config = 'default'
  builder = Builder(data_dir=os.fspath(data_dir), config=config, salt=salt)
  summary_path = os.path.join(builder.data_dir, builder_common.SUMMARY_FILE)
  if not overwrite and os.path.exists(summary_path):
    requested = _recorded_options(builder._load_options(manual_dir))   # pylint: disable=protected-access
    with open(summary_path) as f:
      recorded = json.load(f)['options']
    if 'salt_check' not in requested:   # no salt at hand: reading a built dataset does not need one
      recorded.pop('salt_check', None)
    if recorded != requested:
      raise ValueError(f'{builder.data_dir} was built with options {recorded}, not {requested}; '
                       'pass overwrite=True or another config_name')
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode),
      file_format=file_format)
  return builder
