"""`echo_studies`: TFDS builder for a user's own echo studies: the seed paper's layout (AVIs + label CSVs) or
DICOM exports + a label CSV keyed by study.

Layout of the manual dir:
  videos/<fpath>                 AVI or MP4 (any size; read as 112×112 gray, first `max_frames` frames)
  train.csv, val.csv, test.csv   optional ext_test.csv; or one labels.csv with a `split` column
  echo_studies.json              optional options, e.g.
      {"columns": {"study_id": "acc_num", "label": "av_stenosis", "mrn": "patient_id"},
       "max_frames": 100, "allow_cross_split_studies": false, "labels_csv": "labels.csv",
       "videos_dir": "videos"}
Columns are read by name: acc_num (or study_id), fpath, av_stenosis required; video_num, plax_prob,
patient_id, view optional; `columns` maps your names to these. AS grades: None/Mild/Moderate/Severe/
Sclerosis without Stenosis/unknown in any case; "label_map" maps other spellings (and "" for blank cells,
which are otherwise an error) to a grade or "exclude". Other options: "encoding" (tried after UTF-8),
"min_plax_prob" / "views" (view filter: videos below the probability / of other views are dropped, those
without a value kept and counted), "video_checks" (video_io.VideoChecks: min_frames, min_fps, max_fps,
min_decoded_fraction). A convert_dicom output folder (videos/, manifest.csv, labels.csv) is such a manual
dir as is. Options given in Python (`build_echo_studies(..., max_frames=...)`, a custom `EchoStudiesConfig`,
or `Builder(options=...)`) override the JSON file.

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

Build: `python -m echojax.data.build echo_studies --manual_dir=DIR --data_dir=OUT` (or `tfds build` where
its CLI's extra packages are installed) or `build_echo_studies(DIR, OUT)`. The tables are validated before
any video is read (study_tables, label_csv, study_checks). A video that is missing, no video container,
corrupt, truncated, too short or with an implausible fps is skipped with a warning and listed in
`<builder.data_dir>/rejects.csv` (path, reason), as is a study that lost all its videos;
`build_summary.json` there holds the per-split counts (colour videos converted, view filter), the options
and the fingerprint of the inputs (label tables, options, converter manifest / DICOM listing). A built
dataset whose fingerprint no longer matches is refused (builder_common.check_fingerprint) until rebuilt
(`overwrite=True`, `--overwrite`, --config.data.rebuild=True).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional

import numpy as np
import tensorflow_datasets as tfds

from echojax.data import builder_common, records, study_tables, video_io
# echojax.data.dicom_source (pydicom) is imported only for the DICOM layout.

_OPTION_NAMES = ('columns', 'max_frames', 'allow_cross_split_studies', 'labels_csv', 'videos_dir', 'encoding',
                 'label_map', 'min_plax_prob', 'views', 'video_checks', 'source', 'dicom_dir', 'converted_dir',
                 'dicom_options')
_SPLIT_COUNTS = ('studies_listed', 'studies_kept', 'videos_listed', 'videos_kept', 'videos_rejected',
                 'studies_dropped', 'fps_defaulted', 'truncated') + builder_common.VIDEO_FLAGS
log = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)
class EchoStudiesConfig(tfds.core.BuilderConfig):
  """Fields left None come from `<manual_dir>/echo_studies.json`, then the StudyTableOptions defaults."""
  columns: Optional[Dict[str, str]] = None
  max_frames: Optional[int] = None
  allow_cross_split_studies: Optional[bool] = None
  labels_csv: Optional[str] = None
  videos_dir: Optional[str] = None
  encoding: Optional[str] = None
  label_map: Optional[Dict[str, str]] = None
  min_plax_prob: Optional[float] = None
  views: Optional[List[str]] = None
  video_checks: Optional[Dict[str, Any]] = None
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
  RUN_OPTIONS = ('min_plax_prob', 'views')   # data-config keys a run passes as Builder(options=...)
  _options: Optional[study_tables.StudyTableOptions] = None   # set by _split_generators
  _summary: Dict[str, Dict[str, int]] = {}
  _source_summary: Optional[Dict[str, int]] = None   # the DICOM source's conversion/join counts
  _converter_summary: Optional[Dict[str, int]] = None   # a convert_dicom output's cines / unlabelled ones
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put your studies in the manual dir (`--manual_dir=DIR` / `build_echo_studies(DIR, ...)`):
    DIR/videos/...            AVI/MP4 files (e.g. {acc_num}_{video_num}.avi)
    DIR/train.csv, val.csv, test.csv (optional ext_test.csv), or DIR/labels.csv with a `split` column;
      columns acc_num (or study_id), fpath (relative to DIR/videos or DIR, or absolute), av_stenosis
      (None/Mild/Moderate/Severe/Sclerosis without Stenosis/unknown), optional video_num, plax_prob,
      patient_id, view.
    DIR/echo_studies.json     optional: {"columns": {"your_name": "acc_num", ...}, "max_frames": 100,
      "label_map": {"moderate-severe": "severe"}, "min_plax_prob": 0.5, "encoding": "latin-1", ...}
  `python -m echojax.data.convert_dicom --input EXPORT --output DIR --labels REGISTRY.csv ...` writes such
    a DIR from a DICOM export and a registry CSV.
  Or DICOM exports: DIR/dicom/... plus labels.csv (or per-split CSVs) with one row per study: av_stenosis and
    accession_number or study_instance_uid (optional patient_id, split); a secret salt in
    $ECHOJAX_DICOM_SALT (or "salt" in echo_studies.json). Converted cines are cached in
    DIR/.echojax_converted ("converted_dir").
  """

  def __init__(self, *, salt: Optional[str] = None, options: Optional[Mapping[str, Any]] = None, **kwargs):
    # The DICOM source's secret salt is no config field: TFDS logs custom configs, and it must not rename one.
    # `options` (e.g. {'min_plax_prob': 0.5} from a run's data config) override config and echo_studies.json
    # without renaming the config either; the fingerprint records them, so a change asks for a rebuild.
    self._salt = salt
    self._option_overrides = dict(options or {})
    unknown = sorted(set(self._option_overrides) - set(_OPTION_NAMES))
    if unknown:
      raise TypeError(f'unknown echo_studies option(s) {unknown}; known: {list(_OPTION_NAMES)}')
    super().__init__(**kwargs)

  def _load_options(self, manual_dir) -> study_tables.StudyTableOptions:
    overrides = dict(self.builder_config.overrides())
    overrides.update({k: v for k, v in self._option_overrides.items() if v is not None})
    return study_tables.load_options(manual_dir, dict(overrides, salt=self._salt))

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=__doc__.split('\n')[0],
        features=records.video_features({
            'fps_is_default': np.bool_,   # container reported no fps; video_io.DEFAULT_FPS used
        }),
        disable_shuffling=True,   # the multi-instance pipeline needs each study's videos contiguous
    )

  def fingerprint_parts(self, manual_dir):
    """Digests of the label tables and the converter manifest (a convert_dicom output), the options, and
    for the DICOM source the export's file listing and the salt's check."""
    options = self._load_options(manual_dir)
    tables = {os.path.basename(p): builder_common.file_sha256(p)
              for _, p in study_tables.table_files(manual_dir, options)}
    manifest = os.path.join(manual_dir, study_tables.CONVERTER_MANIFEST)
    parts = {'tables': tables, 'options': options.to_dict(),
             'manifest': builder_common.file_sha256(manifest) if os.path.exists(manifest) else ''}
    if options.source == 'dicom':
      from echojax.data import dicom_source   # pylint: disable=g-import-not-at-top
      parts.update(dicom_source.fingerprint_parts(manual_dir, options))
    return parts

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    self._options = self._load_options(manual_dir)
    self._rejects, self._flagged, self._summary = [], [], {}
    self._source_summary = self._converter_summary = None
    if self._options.source == 'dicom':
      from echojax.data import dicom_source   # pylint: disable=g-import-not-at-top
      prepared = dicom_source.prepare(manual_dir, self._options)
      studies = prepared.studies
      self._rejects.extend(prepared.rejects)
      self._source_summary = prepared.summary
    else:
      studies = study_tables.read_study_tables(manual_dir, self._options)   # validation before any video
      self._converter_summary = studies.converter
    for split, selection in studies.selection.items():
      self._summary[split] = dict(dict.fromkeys(_SPLIT_COUNTS, 0), **selection)
    return builder_common.drop_empty_splits(
        {split: self._generate_examples(split, split_studies) for split, split_studies in studies.items()},
        self._rejects, warn_as='echo_studies')

  def _generate_examples(self, split: str, studies):
    counts = self._summary.setdefault(split, dict.fromkeys(_SPLIT_COUNTS, 0))
    checks = self._options.checks()
    study_index = 0
    for study in studies:
      counts['studies_listed'] += 1
      counts['videos_listed'] += len(study.videos)
      kept = []
      for entry in study.videos:
        where = f'[{split} study {study.study_id}, {entry.source}]'
        try:
          decoded = video_io.read_video(entry.path, max_frames=self._options.max_frames, checks=checks)
        except video_io.VideoReadError as e:
          warnings.warn(f'echo_studies: skipping {entry.path} ({entry.source}): {e.reason}')
          self._rejects.append((entry.path, f'{e.reason} {where}'))
          counts['videos_rejected'] += 1
          continue
        note = builder_common.count_video_flags(counts, decoded)
        if note:
          self._flagged.append((entry.path, f'{note} {where}'))
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
    summary = {'splits': self._summary, 'rejected': len(self._rejects), 'flagged': self._flagged,
               'options': _recorded_options(self._options) if self._options else None}
    if self._source_summary is not None:
      summary['dicom'] = self._source_summary
    if self._converter_summary is not None:
      summary['converter'] = self._converter_summary
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
  if 'converter' in summary:
    c = summary['converter']
    lines.append(f'  converted cines: {c["cines"]}, of which {c["without_label_row"]} have no row in the '
                 'label table (left out)')
  options = summary.get('options') or {}
  for split, c in summary['splits'].items():
    lines.append(f'  {split}: {c["studies_kept"]}/{c["studies_listed"]} studies, '
                 f'{c["videos_kept"]}/{c["videos_listed"]} videos kept, {c["videos_rejected"]} rejected, '
                 f'{c["studies_dropped"]} studies dropped, {c["fps_defaulted"]} with default fps, '
                 f'{c["truncated"]} cut to max_frames, {c["colour_converted"]} colour converted to gray, '
                 f'{c["frames_missing"]} kept with undecodable frames')
    if c['studies_excluded']:
      lines.append(f'    {c["studies_excluded"]} studies left out by the label map ("exclude")')
    if options.get('min_plax_prob') is not None or options.get('views') is not None:
      lines.append(f'    view filter (min_plax_prob {options.get("min_plax_prob")}, views '
                   f'{options.get("views")}): {c["videos_dropped_view"]} videos dropped '
                   f'({c["studies_dropped_view"]} studies emptied), {c["videos_view_unknown"]} kept without '
                   'a plax_prob/view value')
  lines.append(f'  rejects listed: {summary["rejected"]}')
  return '\n'.join(lines)


def build_echo_studies(manual_dir, data_dir, *, config_name: Optional[str] = None, overwrite: bool = False,
                       file_format: Optional[str] = None, salt: Optional[str] = None, **options) -> Builder:
  """Builds (or reuses) echo_studies from `manual_dir` into `data_dir`; returns the prepared builder.

  `options` (the StudyTableOptions fields: columns, max_frames, label_map, min_plax_prob, views, ...) override
  echo_studies.json; with any given, the config is named `config_name or 'custom'`. `salt` (DICOM source;
  else echo_studies.json or $ECHOJAX_DICOM_SALT) is not an option of the config. Reusing a built dataset
  whose fingerprint (label tables, options, manifest, DICOM listing, salt) differs raises (overwrite=True).
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
  if not overwrite:
    reason = builder_common.check_fingerprint(builder, manual_dir)
    if reason:
      raise ValueError(f'{reason}. Pass overwrite=True to rebuild, or another config_name')
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir, download_mode=mode),
      file_format=file_format)
  return builder
