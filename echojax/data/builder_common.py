"""Helpers every echojax TFDS builder shares: the TFDS 4.9.10 `code_path` workaround, label-CSV reading with
required-column checks and located number parsing, dropping splits with nothing to write, and the build
report (`rejects.csv` + `build_summary.json`) written next to the built dataset.
"""
from __future__ import annotations

import csv
import dataclasses
import inspect
import itertools
import json
import os
import warnings
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

from etils import epath
import tensorflow_datasets as tfds

from echojax.data import records

REJECTS_FILE = 'rejects.csv'
SUMMARY_FILE = 'build_summary.json'
EMPTY_SPLIT_REASON = 'no readable video in the whole split; split left out'


def read_csv(path: str, required: Sequence[str]) -> List[dict]:
  """Rows of a CSV (header stripped of spaces/BOM); ValueError naming the file when columns are missing."""
  with open(path, newline='', encoding='utf-8-sig') as f:
    reader = csv.DictReader(f)
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in required if c not in header]
    if missing:
      raise ValueError(f'{path}: missing column(s) {missing} (found {header})')
    reader.fieldnames = header
    return [{k: (v.strip() if isinstance(v, str) else v) for k, v in row.items()} for row in reader]


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
  return kept


def write_build_report(data_dir: str, rejects, summary: Mapping[str, Any]) -> Mapping[str, Any]:
  """Writes `<data_dir>/rejects.csv` (path, reason) and `<data_dir>/build_summary.json`; returns `summary`."""
  records.write_rejects(os.path.join(data_dir, REJECTS_FILE), rejects)
  with open(os.path.join(data_dir, SUMMARY_FILE), 'w') as f:
    json.dump(summary, f, indent=1)
  return summary


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

  The builder defines `_build_summary()` (the JSON-able summary, read after generation); its
  `_download_and_prepare` then writes rejects.csv and build_summary.json and returns that summary.
  """

  _rejects: list = []

  def _build_summary(self) -> Dict[str, Any]:
    raise NotImplementedError

  def _download_and_prepare(self, dl_manager, download_config=None):
    super()._download_and_prepare(dl_manager, download_config)
    # self.data_dir is TFDS's temporary folder here; it is renamed to the final one with these files in it.
    return write_build_report(self.data_dir, self._rejects, self._build_summary())

  @property
  def rejects_path(self) -> str:
    return os.path.join(self.data_dir, REJECTS_FILE)
