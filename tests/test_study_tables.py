"""Tests of the label-table validation behind echo_studies (study_tables, label_csv, study_checks): every
problem a hand-made or Excel-exported table can have fails with its file, line and value, before any video
is read. Only tables are written here, plus a few tiny files for the same-file-in-two-splits checks."""
import os
import re

import numpy as np
import pytest

from echojax.data import label_csv, study_checks, study_tables
from tests.test_echo_studies import STUDIES, write_csv, write_per_split

COLUMNS = ['acc_num', 'fpath', 'av_stenosis', 'patient_id', 'split']


def table_rows():
  return [dict(acc_num=s, fpath=f'{s}_{v}.avi', av_stenosis=label, video_num=v, patient_id=p, split=split)
          for s, p, split, label, n, _ in STUDIES for v in range(n)]


def read(tmp_path, **options):
  return study_tables.read_study_tables(tmp_path, study_tables.StudyTableOptions(**options))


def test_tables_group_studies_in_order(tmp_path):
  write_per_split(tmp_path, table_rows())
  studies = study_tables.read_study_tables(tmp_path)
  assert list(studies) == ['train', 'val', 'test']
  assert [(s.study_id, s.av_stenosis, len(s.videos)) for s in studies['train']] == [
      ('S0', 'none', 1), ('S1', 'severe', 2), ('S2', 'mild', 3)]
  assert studies['test'][1].av_stenosis == 'none'   # "Sclerosis without Stenosis"
  assert studies['train'][0].videos[0].path == os.path.join(str(tmp_path), 'videos', 'S0_0.avi')
  assert np.isnan(studies['train'][0].videos[0].plax_prob)   # the column is absent


def test_missing_column_names_column_and_file(tmp_path):
  write_per_split(tmp_path, table_rows())
  write_csv(tmp_path / 'test.csv', table_rows(), ['acc_num', 'fpath', 'video_num'])   # only test.csv lacks it
  with pytest.raises(ValueError, match=r"test\.csv: missing required column\(s\) \['av_stenosis'\]"):
    study_tables.read_study_tables(tmp_path)


def test_missing_mapped_column_says_where_it_was_mapped_from(tmp_path):
  rows = [dict(r, label=r['av_stenosis']) for r in table_rows()]
  write_csv(tmp_path / 'labels.csv', rows, ['acc_num', 'fpath', 'label', 'split'])
  with pytest.raises(ValueError, match=r"labels\.csv: missing required column.*mapped from 'grade'"):
    read(tmp_path, columns={'grade': 'av_stenosis'})


def test_unknown_labels_name_value_and_lines(tmp_path):
  rows = table_rows()
  rows[0]['av_stenosis'], rows[1]['av_stenosis'], rows[2]['av_stenosis'] = 'Critical', 'severe?', 'Critical'
  write_per_split(tmp_path, rows)
  with pytest.raises(ValueError, match=r"train\.csv: av_stenosis values not understood .*label_map.*: "
                                       r"'Critical' \(train\.csv lines 2, 4\), 'severe\?' \(train\.csv line 3\)$"):
    study_tables.read_study_tables(tmp_path)


def test_clinical_spellings_in_any_case_and_a_label_map(tmp_path):
  rows = table_rows()[:6]
  for row, label in zip(rows, ['sclerosis WITHOUT  stenosis', 'Severe', 'SEVERE', 'mild', 'MILD', 'Mild']):
    row['av_stenosis'] = label
  rows[3:6] = [dict(r, av_stenosis='moderate-severe') for r in rows[3:6]]   # S2's three videos
  write_csv(tmp_path / 'labels.csv', rows, COLUMNS)
  with pytest.raises(ValueError, match=r"not understood.*'moderate-severe' \(labels\.csv lines 5, 6, 7\)"):
    study_tables.read_study_tables(tmp_path)
  studies = read(tmp_path, label_map={'Moderate-Severe': 'severe'})
  assert [(s.study_id, s.av_stenosis) for s in studies['train']] == [('S0', 'none'), ('S1', 'severe'),
                                                                      ('S2', 'severe')]
  excluded = read(tmp_path, label_map={'moderate-severe': 'exclude'})
  assert [s.study_id for s in excluded['train']] == ['S0', 'S1']
  assert excluded.selection['train']['studies_excluded'] == 1
  with pytest.raises(ValueError, match='label map targets must be one of'):
    study_tables.StudyTableOptions(label_map={'x': 'very severe'})


def test_blank_labels_are_errors_unless_mapped(tmp_path):
  rows = table_rows()
  rows[0]['av_stenosis'] = ''
  write_csv(tmp_path / 'labels.csv', rows, COLUMNS)
  with pytest.raises(ValueError, match=r'blank av_stenosis cells \(map blanks with "": "unknown".*labels\.csv '
                                       r'line 2'):
    study_tables.read_study_tables(tmp_path)
  assert read(tmp_path, label_map={'': 'unknown'})['train'][0].av_stenosis == 'unknown'


def test_duplicate_rows_are_named(tmp_path):
  rows = table_rows()
  rows.append(dict(rows[1], fpath='other.avi'))    # same (S1, 0)
  write_per_split(tmp_path, rows)
  with pytest.raises(ValueError, match=r'duplicate \(study, video_num\) rows: \(S1, 0\) x2'):
    study_tables.read_study_tables(tmp_path)


def test_study_rows_must_agree_on_label_and_patient(tmp_path):
  rows = table_rows()
  rows[2]['av_stenosis'] = 'None'    # S1's second video
  write_per_split(tmp_path, rows)
  with pytest.raises(ValueError, match=r"disagree on av_stenosis: S1 \['none', 'severe'\]"):
    study_tables.read_study_tables(tmp_path)
  rows = table_rows()
  rows[2]['patient_id'] = 'P9'
  write_csv(tmp_path / 'train.csv', rows, COLUMNS)
  with pytest.raises(ValueError, match=r"disagree on patient_id: S1 \['P1', 'P9'\]"):
    study_tables.read_study_tables(tmp_path)


@pytest.mark.parametrize('variant, kind', [('s1', 'case'), ('S 1', 'whitespace'), ('S1\u200b', 'invisible'),
                                           ('s 1', 'whitespace and case')])
def test_ids_differing_only_by_case_whitespace_or_invisible_characters(tmp_path, variant, kind):
  rows = table_rows()
  rows[2]['acc_num'] = variant      # S1's second video, spelled differently
  write_csv(tmp_path / 'labels.csv', rows, COLUMNS)
  with pytest.raises(ValueError, match=rf"study ids that differ only by {kind}.*'S1' vs {re.escape(repr(variant))} "
                                       r"\(labels\.csv lines 3, 4\)"):
    study_tables.read_study_tables(tmp_path)
  rows = table_rows()
  rows[-1]['patient_id'] = 'p5'      # S5's last video: patient P5 written in lower case
  write_csv(tmp_path / 'labels.csv', rows, COLUMNS)
  with pytest.raises(ValueError, match=r"patient ids that differ only by case.*'P5' vs 'p5'"):
    study_tables.read_study_tables(tmp_path)


def test_unknown_split_names_list_the_allowed_ones(tmp_path):
  rows = table_rows()
  rows[0]['split'], rows[1]['split'], rows[-1]['split'] = 'tset', 'hold out', ''
  write_csv(tmp_path / 'labels.csv', rows, COLUMNS)
  with pytest.raises(ValueError, match=r"unknown split value\(s\) \(allowed: train, val, test, ext_test; .*\): "
                                       r"'tset' \(labels\.csv line 2\), 'hold out' \(labels\.csv line 3\), '' "):
    study_tables.read_study_tables(tmp_path)
  rows = [dict(r, split={'val': 'Validation', 'test': 'TEST'}.get(r['split'], r['split'])) for r in table_rows()]
  write_csv(tmp_path / 'labels.csv', rows, COLUMNS)
  assert list(study_tables.read_study_tables(tmp_path)) == ['train', 'val', 'test']


def test_header_only_and_empty_tables(tmp_path):
  write_per_split(tmp_path, table_rows())
  write_csv(tmp_path / 'ext_test.csv', [], ['acc_num', 'fpath', 'av_stenosis'])
  with pytest.raises(ValueError, match=r'ext_test\.csv: has a header \(acc_num, fpath, av_stenosis\) but no data'):
    study_tables.read_study_tables(tmp_path)
  for split in ('train', 'val', 'test'):   # all of them header-only
    write_csv(tmp_path / f'{split}.csv', [], ['acc_num', 'fpath', 'av_stenosis'])
  with pytest.raises(ValueError, match='train.csv: has a header'):
    study_tables.read_study_tables(tmp_path)
  (tmp_path / 'train.csv').write_text('')
  with pytest.raises(ValueError, match=r'train\.csv: empty file'):
    study_tables.read_study_tables(tmp_path)


def test_latin1_table_fails_with_the_fix_then_reads_with_encoding(tmp_path):
  rows = table_rows()
  rows[0]['acc_num'] = 'Sé0'
  rows[0]['fpath'] = 'Sé0_0.avi'
  path = tmp_path / 'labels.csv'
  with open(path, 'w', newline='', encoding='latin-1') as f:
    f.write(','.join(COLUMNS) + '\n')
    f.writelines(','.join(str(r[c]) for c in COLUMNS) + '\n' for r in rows)
  with pytest.raises(ValueError, match=r'labels\.csv: not UTF-8 text \(byte 0xe9 on line 2\); save it as "CSV '
                                       r'UTF-8" or name its encoding .*"encoding" in echo_studies\.json'):
    study_tables.read_study_tables(tmp_path)
  assert read(tmp_path, encoding='latin-1')['train'][0].study_id == 'Sé0'
  (tmp_path / 'labels.csv').write_bytes(b'\xef\xbb\xbf' + path.read_bytes().decode('latin-1').encode())   # BOM
  assert study_tables.read_study_tables(tmp_path)['train'][0].study_id == 'Sé0'


def test_plax_prob_cells_decimal_comma_and_range(tmp_path):
  columns = COLUMNS + ['plax_prob']
  rows = [dict(r, plax_prob='0.9') for r in table_rows()]
  rows[1]['plax_prob'], rows[2]['plax_prob'], rows[3]['plax_prob'] = '0,5', 'high', '1.5'
  write_csv(tmp_path / 'labels.csv', rows, columns)   # csv quotes "0,5": one cell with a decimal comma
  with pytest.raises(ValueError) as raised:
    study_tables.read_study_tables(tmp_path)
  message = str(raised.value)
  assert "plax_prob decimal comma (write 0.5, not 0,5): '0,5' (labels.csv line 3)" in message
  assert "plax_prob not a number: 'high' (labels.csv line 4)" in message
  assert "plax_prob outside [0, 1]: '1.5' (labels.csv line 5)" in message
  # unquoted, as typed by hand: the comma splits the cell and shifts the row (it used to read as 0.0)
  text = (tmp_path / 'labels.csv').read_text().replace('"0,5"', '0,5')
  (tmp_path / 'labels.csv').write_text(text)
  with pytest.raises(ValueError, match=r'rows with more cells than the header.*decimal comma.*labels\.csv line 3'):
    study_tables.read_study_tables(tmp_path)


def test_semicolon_table_with_windows_line_ends_is_read(tmp_path):
  rows = table_rows()
  lines = [';'.join(COLUMNS + ['plax_prob'])] + [';'.join(str(r[c]) for c in COLUMNS) + ';0.75' for r in rows]
  (tmp_path / 'labels.csv').write_bytes(('\r\n'.join(lines) + '\r\n').encode())   # as Excel on Windows
  studies = study_tables.read_study_tables(tmp_path)
  assert studies['train'][0].videos[0].plax_prob == pytest.approx(0.75)


def test_study_id_column_is_read_as_the_study(tmp_path):
  rows = [dict(r, study_id=r['acc_num']) for r in table_rows()]
  write_csv(tmp_path / 'labels.csv', rows, ['study_id', 'patient_id', 'av_stenosis', 'split', 'fpath'])
  assert [s.study_id for s in study_tables.read_study_tables(tmp_path)['val']] == ['S3']


def test_same_file_twice_in_a_split_is_an_error(tmp_path):
  rows = table_rows()
  rows.append(dict(rows[1], video_num=9))
  write_per_split(tmp_path, rows)
  with pytest.raises(ValueError, match=r'train: video file listed more than once .*S1_0\.avi'):
    study_tables.read_study_tables(tmp_path)


@pytest.mark.parametrize('how', ['symlink', 'hardlink', 'copy'])
def test_one_video_reached_twice_across_splits_is_leakage(tmp_path, how):
  rows = table_rows()
  videos = tmp_path / 'videos'
  videos.mkdir()
  for i, row in enumerate(rows):
    (videos / row['fpath']).write_bytes(bytes([i]) * (100 + i))   # distinct contents and sizes
  shared = videos / 'S4_0.avi'                                      # a test video ...
  alias = videos / 'S0_0.avi'                                       # ... reached again from train
  alias.unlink()
  {'symlink': lambda: os.symlink(shared, alias), 'hardlink': lambda: os.link(shared, alias),
   'copy': lambda: alias.write_bytes(shared.read_bytes())}[how]()
  write_csv(tmp_path / 'labels.csv', rows, COLUMNS)
  with pytest.raises(ValueError, match=r'video files in several splits \(the same file, a link or a '
                                       r"byte-identical copy\): .*S0_0\.avi = .*S4_0\.avi \['test', 'train'\]"):
    study_tables.read_study_tables(tmp_path)


def test_file_identities_hash_only_equal_sizes(tmp_path, monkeypatch):
  a, b, c = (tmp_path / n for n in 'abc')
  a.write_bytes(b'x' * 10)
  b.write_bytes(b'y' * 10)
  c.write_bytes(b'z' * 11)
  hashed = []
  real = study_checks.builder_common.file_sha256
  monkeypatch.setattr(study_checks.builder_common, 'file_sha256', lambda p: hashed.append(p) or real(p))
  ids = study_checks.file_identities([str(a), str(b), str(c), str(tmp_path / 'missing')])
  assert len(set(ids.values())) == 4 and sorted(hashed) == [str(a), str(b)]


def test_patient_in_two_splits_is_leakage(tmp_path):
  rows = table_rows()
  for row in rows:
    if row['acc_num'] == 'S4':
      row['patient_id'] = 'P0'     # S4 (test) belongs to S0's (train) patient
  write_csv(tmp_path / 'labels.csv', rows, COLUMNS)
  with pytest.raises(ValueError, match=r"patient ids in several splits: P0 \['test', 'train'\]"):
    study_tables.read_study_tables(tmp_path)
  with pytest.warns(UserWarning, match='patient ids in several splits: P0'):
    studies = read(tmp_path, allow_cross_split_studies=True)
  assert studies['test'][0].patient_id == 'P0'


def test_view_filter_by_plax_prob_and_view_column(tmp_path):
  rows = table_rows()
  for i, row in enumerate(rows):
    row['plax_prob'] = ['0.9', '0.3', ''][i % 3]
    row['view'] = ['PLAX', 'A4C', ''][(i + 1) % 3]
  write_csv(tmp_path / 'labels.csv', rows, COLUMNS + ['plax_prob', 'view'])
  everything = study_tables.read_study_tables(tmp_path)
  assert sum(len(s.videos) for v in everything.values() for s in v) == len(rows)
  assert everything.selection['train']['videos_dropped_view'] == 0
  by_prob = read(tmp_path, min_plax_prob=0.5)
  kept = [v.plax_prob for split in by_prob.values() for s in split for v in s.videos]
  assert len(kept) == 8 and all(np.isnan(p) or p >= 0.5 for p in kept)
  assert sum(c['videos_dropped_view'] for c in by_prob.selection.values()) == 4
  assert sum(c['videos_view_unknown'] for c in by_prob.selection.values()) == 4
  assert by_prob.selection['train']['studies_dropped_view'] == 0 and 'S0' in [s.study_id for s in by_prob['train']]
  by_view = read(tmp_path, views=['plax'])
  assert {v.view for split in by_view.values() for s in split for v in s.videos} == {'PLAX', ''}
  both = read(tmp_path, min_plax_prob=0.5, views=['PLAX'])
  assert sum(len(s.videos) for v in both.values() for s in v) < 8
  with pytest.raises(ValueError, match='min_plax_prob must be a number in'):
    study_tables.StudyTableOptions(min_plax_prob=5)


def test_bad_split_layout_and_options(tmp_path):
  write_per_split(tmp_path, table_rows())
  write_csv(tmp_path / 'labels.csv', table_rows(), COLUMNS)
  with pytest.raises(ValueError, match='both per-split CSVs'):
    study_tables.read_study_tables(tmp_path)
  with pytest.raises(ValueError, match=r"\['label_column'\]"):
    study_tables.load_options(tmp_path, {'label_column': 'x'})
  with pytest.raises(ValueError, match="targets \\['grade'\\]"):
    study_tables.StudyTableOptions(columns={'label': 'grade'})
  with pytest.raises(ValueError, match=r"unknown video_checks \['min_frame'\]"):
    study_tables.StudyTableOptions(video_checks={'min_frame': 4})
  (tmp_path / study_tables.OPTIONS_FILE).write_text('{"max_frames": 0}')
  with pytest.raises(ValueError, match='echo_studies.json: max_frames'):
    study_tables.load_options(tmp_path)
  assert study_tables.load_options(tmp_path, {'max_frames': 16}).max_frames == 16   # arguments win
  with pytest.raises(FileNotFoundError, match='no label table'):
    study_tables.read_study_tables(tmp_path / 'empty')


def test_label_csv_helpers():
  assert label_csv.clean_id('\ufeff１２３\u200b ') == '123'
  assert label_csv.id_fold(' Ab C ') == label_csv.id_fold('abc')
  assert label_csv.parse_probability('0.25') == (0.25, None)
  assert np.isnan(label_csv.parse_probability('')[0]) and label_csv.parse_probability('')[1] is None
  assert label_csv.split_name('Validation') == 'val' and label_csv.split_name('tset') is None
  assert label_csv.map_label(' SEVERE ', label_csv.make_label_map()) == 'severe'
  assert label_csv.map_label('', label_csv.make_label_map()) is None
