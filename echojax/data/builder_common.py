"""Helpers every echojax TFDS builder shares: the TFDS 4.9.10 `code_path` workaround, label-CSV reading with
required-column checks and located number parsing, dropping splits with nothing to write, the build report
(`rejects.csv` + `build_summary.json`) written next to the built dataset, and the dataset fingerprint (label
tables, options, converter manifest) that tells a stale built dataset from a current one.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import inspect
import itertools
import json
import os
import re
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

from etils import epath
import tensorflow_datasets as tfds

from echojax.data import label_csv, records, video_io

REJECTS_FILE = 'rejects.csv'
SUMMARY_FILE = 'build_summary.json'
EMPTY_SPLIT_REASON = 'no readable video in the whole split; split left out'
VIDEO_FLAGS = ('colour_converted', 'frames_missing')   # kept videos with a caveat, counted per split
REBUILD_HINT = 'rebuild it (--config.data.rebuild=True, or --overwrite / overwrite=True)'


def read_csv(path: str, required: Sequence[str]) -> List[dict]:
  """Rows of a CSV (label_csv.read_table: encoding, delimiter, row shape, not header-only) as dicts;
  ValueError naming the file when columns are missing."""
  table = label_csv.read_table(path)
  missing = [c for c in required if c not in table.header]
  if missing:
    raise ValueError(f'{path}: missing column(s) {missing} (found {table.header})')
  return [row for _, row in table.rows]


def parse_float(value: Optional[str], where: str) -> float:
  """None / '' / NaN → NaN; anything else must be a number (ValueError naming `where` and the value)."""
  if value is None or value == '' or value.lower() == 'nan':
    return float('nan')
  try:
    return float(value)
  except ValueError:
    raise ValueError(f'{where}: not a number: {value!r}') from None


def drop_empty_splits(generators: Mapping[str, Iterator], rejects: list, *,
                      listed: Optional[Mapping[str, int]] = None,
                      warn_as: Optional[str] = None) -> Dict[str, Iterator]:
  """The splits whose generator yields something, each with its first example already pulled.

  TFDS cannot write an empty split. A dropped split goes to `rejects` unless `listed` says it listed
  nothing; `warn_as` (the builder's name) also warns about it.
  """
  kept = {}
  for split, generator in generators.items():
    first = next(generator, None)
    if first is None:
      if warn_as:
        warnings.warn(f'{warn_as}: split {split!r} has no readable video; it is left out')
      if listed is None or listed[split]:
        rejects.append((f'split:{split}', EMPTY_SPLIT_REASON))
      continue
    kept[split] = itertools.chain([first], generator)
  if not kept:
    reasons = collections.Counter(re.split(r' \(| \[|:', reason, maxsplit=1)[0] for _, reason in rejects)
    raise ValueError(f'nothing to build: no split has a usable video ({len(rejects)} rejects; reasons: '
                     f'{", ".join(f"{r} x{n}" for r, n in reasons.most_common(8)) or "none"})')
  return kept


def write_build_report(data_dir: str, rejects, summary: Mapping[str, Any]) -> Mapping[str, Any]:
  """Writes `<data_dir>/rejects.csv` (path, reason) and `<data_dir>/build_summary.json`; returns `summary`."""
  records.write_rejects(os.path.join(data_dir, REJECTS_FILE), rejects)
  with open(os.path.join(data_dir, SUMMARY_FILE), 'w') as f:
    json.dump(summary, f, indent=1)
  return summary


def count_video_flags(counts: Dict[str, int], decoded: video_io.DecodedVideo) -> Optional[str]:
  """Adds a kept video's caveats to `counts` (VIDEO_FLAGS); returns the frames-missing note, if any."""
  counts['colour_converted'] = counts.get('colour_converted', 0) + bool(decoded.colour)
  counts['frames_missing'] = counts.get('frames_missing', 0) + bool(decoded.frames_missing)
  if decoded.frames_missing:
    return (f'kept: {decoded.frames_missing} frame(s) listed by the container are not decodable '
            f'({decoded.source_frames} are)')
  return None


# ---------------------------------------------------------------------------------------------------------
# Fingerprint: what a built dataset was made from.

def file_sha256(path) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def tree_digest(root) -> str:
  """Digest of a folder's file listing (relative path, size, mtime): changes when files are added, removed
  or rewritten, without reading them (a DICOM export can be large)."""
  digest = hashlib.sha256()
  root = os.fspath(root)
  for folder, dirs, files in sorted(os.walk(root)):
    dirs.sort()
    for name in sorted(files):
      stat = os.stat(os.path.join(folder, name))
      digest.update(f'{os.path.relpath(os.path.join(folder, name), root)}\x1f{stat.st_size}\x1f'
                    f'{stat.st_mtime_ns}\n'.encode())
  return digest.hexdigest()


def _json_normal(value):
  return json.loads(json.dumps(value, sort_keys=True, default=str))


def make_fingerprint(parts: Mapping[str, Any]) -> Dict[str, Any]:
  """{'sha256': digest of `parts`, 'parts': parts}: parts are JSON-able (e.g. {'tables': {name: sha256},
  'options': {...}, 'manifest': sha256}); a None part is unknown at check time and not compared."""
  parts = _json_normal(dict(parts))
  return {'sha256': hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), 'parts': parts}


def describe_changes(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
  changes = []
  for name in sorted(set(recorded) | set(current)):
    old, new = recorded.get(name), current.get(name)
    if new is None or old == new:
      continue
    if isinstance(old, dict) and isinstance(new, dict):
      for key in sorted(set(old) | set(new)):
        if key not in old:
          changes.append(f'{name}: {key} added')
        elif key not in new:
          changes.append(f'{name}: {key} removed')
        elif old[key] != new[key]:
          is_digest = isinstance(old[key], str) and len(old[key]) == 64
          changes.append(f'{name}: {key} changed' + ('' if is_digest else f' ({old[key]!r} → {new[key]!r})'))
    else:
      changes.append(f'{name} changed')
  return changes


def check_fingerprint(builder, manual_dir) -> Optional[str]:
  """Why the built dataset of `builder` no longer matches `manual_dir` and the builder's options, or None
  (it matches, it is not built yet, or the builder reads no manual dir). The caller stops with the reason
  and REBUILD_HINT."""
  parts_of = getattr(builder, 'fingerprint_parts', None)
  data_dir = os.fspath(builder.data_dir)
  if parts_of is None or not manual_dir or not os.path.exists(os.path.join(data_dir, 'dataset_info.json')):
    return None
  path = os.path.join(data_dir, SUMMARY_FILE)
  recorded = None
  if os.path.exists(path):
    with open(path) as f:
      recorded = json.load(f).get('fingerprint')
  if not recorded:
    return (f'{data_dir} records no fingerprint of its inputs (built by an older echojax or another tool), '
            'so it cannot be checked against the label tables')
  current = make_fingerprint(parts_of(os.fspath(manual_dir)))['parts']
  changes = describe_changes(recorded.get('parts', {}), current)
  if not changes:
    return None
  return f'the dataset in {data_dir} was built from other inputs: ' + '; '.join(changes)


@dataclasses.dataclass(eq=False)
class MaxFramesConfig(tfds.core.BuilderConfig):
  """Config of a builder that reads each video's first `max_frames` frames."""
  max_frames: Optional[int] = 100    # None keeps every frame


def max_frames_configs(config_cls: type) -> List[MaxFramesConfig]:
  """The `default` (first 100 frames) and `all_frames` configs of a MaxFramesConfig subclass."""
  return [config_cls(name='default', description='First 100 frames of each video.', max_frames=100),
          config_cls(name='all_frames', description='Every frame of each video.', max_frames=None)]


class ModuleCodePath:
  """Mixin (listed before tfds.core.GeneratorBasedBuilder) giving a builder's `code_path` as its module file."""

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS 4.9.10 resolves a packaged builder's path through `importlib_resources`, a package it does not
    # declare; the module's own path is all it needs (checksums/metadata lookups next to the module).
    return epath.Path(inspect.getfile(cls))


class ReportingBuilder(ModuleCodePath):
  """Mixin for builders that collect `_rejects` (path, reason) while generating: writes the build report.

  The builder defines `_build_summary()` (the JSON-able summary, read after generation) and
  `fingerprint_parts(manual_dir)` (see make_fingerprint); its `_download_and_prepare` then writes
  rejects.csv and build_summary.json (with the fingerprint, taken before generation) and returns the summary.
  """

  _rejects: list = []
  video_checks = video_io.VideoChecks()

  def _build_summary(self) -> Dict[str, Any]:
    raise NotImplementedError

  def fingerprint_parts(self, manual_dir: str) -> Dict[str, Any]:
    raise NotImplementedError

  def _download_and_prepare(self, dl_manager, download_config=None):
    fingerprint = make_fingerprint(self.fingerprint_parts(os.fspath(dl_manager.manual_dir)))
    super()._download_and_prepare(dl_manager, download_config)
    # self.data_dir is TFDS's temporary folder here; it is renamed to the final one with these files in it.
    return write_build_report(self.data_dir, self._rejects, dict(self._build_summary(), fingerprint=fingerprint))

  @property
  def rejects_path(self) -> str:
    return os.path.join(self.data_dir, REJECTS_FILE)
