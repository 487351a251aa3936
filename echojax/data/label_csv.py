"""Careful reading of the label CSVs people make by hand or export from Excel/registries: encoding, delimiter
and row-shape checks, identifier normalisation (ids that differ only by case, whitespace or invisible
characters are caught), AS-grade spellings (+ a user label map), split names and probability cells.
Every problem is reported with its file, line and value; used by study_tables and registry.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import io
import json
import math
import os
import unicodedata
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from echojax.data import records

SPLITS = ('train', 'val', 'test', 'ext_test')
SPLIT_ALIASES = {'validation': 'val', 'valid': 'val', 'dev': 'val'}
EXCLUDE = 'exclude'            # a label-map target: leave the row out (counted, e.g. low-gradient AS)
_DELIMITERS = (',', ';', '\t')
_MAX_LISTED = 20


class Problems:
  """Problems grouped by kind, each with its values and where they occur; raise_if() raises them at once."""

  def __init__(self):
    self._found: Dict[str, Dict[str, List[str]]] = collections.defaultdict(dict)

  def add(self, kind: str, value: str = '', where: str = '') -> None:
    self._found[kind].setdefault(value, [])
    if where:
      self._found[kind][value].append(where)

  def __bool__(self):
    return bool(self._found)

  def raise_if(self, title: str = 'invalid label tables') -> None:
    if not self._found:
      return
    lines = []
    for kind, values in self._found.items():
      shown = [f'{v} ({_where(w)})' if v and w else (v or _where(w)) for v, w in list(values.items())[:_MAX_LISTED]]
      more = f' ... ({len(values)} in all)' if len(values) > _MAX_LISTED else ''
      lines.append(f'  {kind}: {", ".join(shown)}{more}')
    raise ValueError(f'{title}:\n' + '\n'.join(lines))


def _where(places: Sequence[str]) -> str:
  """'labels.csv:3', 'labels.csv:7' → 'labels.csv lines 3, 7' (the file named once)."""
  by_file = collections.defaultdict(list)
  for place in places:
    name, _, line = place.rpartition(':')
    by_file[name].append(line)
  parts = []
  for name, lines in by_file.items():
    shown = ', '.join(lines[:_MAX_LISTED]) + (' ...' if len(lines) > _MAX_LISTED else '')
    parts.append(f'{name} line{"s" if len(lines) > 1 else ""} {shown}')
  return '; '.join(parts)


@dataclasses.dataclass
class Table:
  path: str
  header: List[str]
  rows: List[Tuple[int, Dict[str, str]]]   # (line number, {column: stripped cell})
  delimiter: str

  @property
  def name(self) -> str:
    return os.path.basename(self.path)


def decode_text(path: str, encoding: Optional[str] = None, encoding_hint: Optional[str] = '') -> str:
  """The file as text: UTF-8 (with or without Excel's BOM), else `encoding`; a ValueError names the first
  undecodable byte's line and how to fix it (`encoding_hint`: where to name an encoding; None: nowhere)."""
  with open(path, 'rb') as f:
    data = f.read()
  try:
    return data.decode('utf-8-sig')
  except UnicodeDecodeError as e:
    line = data.count(b'\n', 0, e.start) + 1
    if encoding:
      try:
        return data.decode(encoding)
      except (UnicodeDecodeError, LookupError) as e2:
        raise ValueError(f'{path}: neither UTF-8 nor {encoding!r} text ({e2})') from None
    named = '' if encoding_hint is None else f' or name its encoding (e.g. "latin-1", "cp1252"){encoding_hint}'
    raise ValueError(f'{path}: not UTF-8 text (byte 0x{data[e.start]:02x} on line {line}); save it as '
                     f'"CSV UTF-8"{named}') from None


def read_table(path, *, encoding: Optional[str] = None, encoding_hint: Optional[str] = '') -> Table:
  """Reads a CSV (comma, semicolon or tab separated, as its header line shows). Errors: not decodable,
  empty, header only, repeated column names, and rows with more filled cells than the header has columns
  (an unquoted comma, e.g. a decimal comma '0,5', shifts every later cell)."""
  path = os.fspath(path)
  text = decode_text(path, encoding, encoding_hint)
  first_line = text.split('\n', 1)[0]
  delimiter = max(_DELIMITERS, key=first_line.count) if any(d in first_line for d in _DELIMITERS) else ','
  reader = csv.reader(io.StringIO(text, newline=''), delimiter=delimiter)
  header = next(reader, None)
  if header is None or not any(h.strip() for h in header):
    raise ValueError(f'{path}: empty file (no header row)')
  header = [_strip(h) for h in header]
  doubled = sorted(h for h, n in collections.Counter(header).items() if n > 1)
  if doubled:
    raise ValueError(f'{path}: repeated column name(s) {doubled}')
  rows, problems = [], Problems()
  for cells in reader:
    if not any(c.strip() for c in cells):
      continue
    line = reader.line_num
    if len(cells) > len(header) and any(c.strip() for c in cells[len(header):]):
      problems.add(f'rows with more cells than the header\'s {len(header)} columns (an unquoted comma in a '
                   f'value, e.g. a decimal comma "0,5"? write 0.5 or quote the value)', '',
                   f'{os.path.basename(path)}:{line}')
      continue
    cells = cells + [''] * (len(header) - len(cells))
    rows.append((line, {h: _strip(c) for h, c in zip(header, cells)}))
  problems.raise_if(f'{path}: malformed rows')
  if not rows:
    raise ValueError(f'{path}: has a header ({", ".join(header)}) but no data rows; fill it or remove it')
  return Table(path=path, header=header, rows=rows, delimiter=delimiter)


def _strip(value: str) -> str:
  return value.strip().strip('\ufeff').strip()


# ---------------------------------------------------------------------------------------------------------
# Identifiers

def clean_id(value: str) -> str:
  """The identifier as used: Unicode NFKC (full-width digits → ASCII), invisible format characters (zero-width
  spaces, BOMs) removed, outer whitespace stripped."""
  value = unicodedata.normalize('NFKC', value)
  return ''.join(c for c in value if unicodedata.category(c) != 'Cf').strip()


def id_fold(value: str) -> str:
  """Collision key: clean_id, case-folded, without any whitespace."""
  return ''.join(clean_id(value).casefold().split())


def _difference(a: str, b: str) -> str:
  kinds = []
  if clean_id(a) == clean_id(b):
    kinds.append('invisible characters')
  else:
    if clean_id(a).casefold() != clean_id(b).casefold():
      kinds.append('whitespace')
    if ''.join(clean_id(a).split()) != ''.join(clean_id(b).split()):
      kinds.append('case')
  return ' and '.join(kinds) or 'Unicode form'


def find_id_collisions(entries: Iterable[Tuple[str, str]], kind: str, problems: Problems, *,
                       reveal: bool = True) -> None:
  """`entries` (raw id, 'file:line'): ids written differently that fold to the same key are a problem
  (they would otherwise be two studies/patients). `reveal=False` names lines only (PHI identifiers)."""
  spellings: Dict[str, Dict[str, str]] = collections.defaultdict(dict)
  for raw, where in entries:
    spellings[id_fold(raw)].setdefault(raw, where)
  for variants in spellings.values():
    if len(variants) > 1:
      a, b = list(variants)[:2]
      what = f'{kind}s that differ only by {_difference(a, b)} (make them identical, or distinct)'
      value = ' vs '.join(repr(v) for v in variants) if reveal else ''
      for where in variants.values():
        problems.add(what, value, where)


# ---------------------------------------------------------------------------------------------------------
# AS grades, splits, probabilities

def label_key(value: str) -> str:
  return ' '.join(clean_id(value).casefold().split())


def make_label_map(user_map: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
  """Spelling (label_key) → AS grade or EXCLUDE: the clinical spellings (None, Mild, Moderate, Severe,
  Sclerosis without Stenosis, any case) plus `user_map`, which wins. A blank cell maps only via user_map."""
  mapping = {k: v for k, v in records.AV_STENOSIS_ALIASES.items() if k}
  allowed = set(records.AV_STENOSIS_NAMES) | {EXCLUDE}
  bad = {k: v for k, v in (user_map or {}).items() if label_key(str(v)) not in allowed}
  if bad:
    raise ValueError(f'label map targets must be one of {sorted(allowed)}; got {bad}')
  mapping.update({label_key(str(k)): label_key(str(v)) for k, v in (user_map or {}).items()})
  return mapping


def read_json_object(path, example: str = '') -> dict:
  """A JSON file holding one object, with errors that name the file."""
  with open(path, encoding='utf-8') as f:
    try:
      value = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path}: not valid JSON ({e})') from None
  if not isinstance(value, dict):
    raise ValueError(f'{path}: expected a JSON object{" " + example if example else ""}')
  return value


def load_label_map(path) -> Dict[str, str]:
  """A label map file: JSON {"moderate-severe": "severe", "": "unknown"} or a two-column CSV
  (your value, AS grade or "exclude") with a header row."""
  path = os.fspath(path)
  if path.lower().endswith('.json'):
    mapping = read_json_object(path, '{"your value": "severe", ...}')
    return {str(k): str(v) for k, v in mapping.items()}
  table = read_table(path)
  if len(table.header) != 2:
    raise ValueError(f'{path}: a label map CSV has two columns (your value, AS grade); found {table.header}')
  source, target = table.header
  return {row[source]: row[target] for _, row in table.rows}


def map_label(raw: str, label_map: Mapping[str, str]) -> Optional[str]:
  """The AS grade (or EXCLUDE) of a cell, None when its spelling is not mapped."""
  return label_map.get(label_key(raw))


def label_problem(raw: str, column: str, hint: str) -> str:
  if not clean_id(raw):
    return f'blank {column} cells (map blanks with "": "unknown" or "exclude" {hint})'
  return f'{column} values not understood (known: None, Mild, Moderate, Severe, Sclerosis without Stenosis; ' \
         f'map others {hint})'


def split_name(raw: str) -> Optional[str]:
  """The canonical split of a cell ('Validation' → 'val'), None when it is not one of SPLITS."""
  name = label_key(raw).replace(' ', '_')
  name = SPLIT_ALIASES.get(name, name)
  return name if name in SPLITS else None


SPLIT_PROBLEM = (f'unknown split value(s) (allowed: {", ".join(SPLITS)}; also '
                 f'{", ".join(SPLIT_ALIASES)} for val; any case)')


def parse_probability(raw: str) -> Tuple[float, Optional[str]]:
  """(value, problem): '' → NaN; a number in [0, 1]; else a problem description for the error."""
  text = raw.strip()
  if not text or text.lower() == 'nan':
    return float('nan'), None
  if ',' in text and text.replace(',', '', 1).replace('.', '', 1).isdigit():
    return float('nan'), 'decimal comma (write 0.5, not 0,5)'
  try:
    value = float(text)
  except ValueError:
    return float('nan'), 'not a number'
  if not math.isfinite(value) or not 0.0 <= value <= 1.0:
    return float('nan'), 'outside [0, 1]'
  return value, None
