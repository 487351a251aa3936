"""The per-split HTML report: self-contained (inline PNGs only, a no-network CSP), every section present,
paths redacted, the model card; and rendered in a real headless Chromium (skipped when it is not installed:
`apt-get install -y chromium`): no image fails to load, every section has height, the screenshot is not
blank."""
import base64
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from echojax.evaluation import bootstrap as ev
from echojax.evaluation import gradcam, html_report, model_card

CHROMIUM = shutil.which('chromium') or shutil.which('chromium-browser')


def _report(tmp_path, kind='binary'):
  rng = np.random.default_rng(0)
  n = 40
  labels = np.r_[np.zeros(28, int), np.ones(12, int)]
  if kind == 'binary':
    outputs, aggregation = rng.normal(size=(n, 2)) + 1.5 * labels[:, None] - 1, 'logits'
  else:
    labels = rng.uniform(20, 70, n)
    outputs, aggregation = labels[:, None] + rng.normal(0, 5, (n, 2)), 'values'
  ids = [f'study{i}' for i in range(n)]
  videos, studies = ev.aggregate_predictions(outputs, ids, ids, labels, outputs=aggregation)
  summary = ev.evaluate_task(kind, videos, studies, threshold=0.45 if kind == 'binary' else None,
                             threshold_method='max_f1 on val', n_resamples=100)
  out = tmp_path / 'eval' / 'test'
  figures = ev.write_report(str(out), (videos, studies), summary, title='Severe AS — test split',
                            class_names=('not severe', 'severe AS'), unit='EF (%)')
  frames = rng.integers(0, 255, (6, 112, 112)).astype(np.uint8)
  png = gradcam.study_figure([{'frame': frames[2], 'cam': rng.random((112, 112)), 'mask': np.ones((112, 112), bool),
                               'title': 'video v0, frame 2 of 6 (peak saliency)'}],
                             'Study study3 · severe AS: score 0.81, threshold 0.45 → positive',
                             str(tmp_path / 'study3.png'), 1.0, 'Grad-CAM')
  config = {'data': {'name': 'echo_studies', 'manual_dir': '/exports/DOE_JOHN_12345/echo'},
            'init_path': '/home/me/encoders', 'task': {'kind': kind}}
  path = html_report.write_html_report(
      str(out), summary, 'Severe AS — test split', figures=figures, config=config,
      data_summary={'Studies': n, 'Positive studies': 12},
      decision={'Recalibration': 'platt, fitted on val'},
      saliency=[{'png': png, 'caption': 'Study study3 · severe AS', 'scores': [{'energy': 0.4}]}],
      provenance={'best step': 12})
  return path, summary


def test_report_is_self_contained_with_every_section_and_no_paths(tmp_path):
  path, _ = _report(tmp_path)
  page = open(path, encoding='utf-8').read()
  for section in html_report.SECTIONS:
    assert f'<section id="{section}">' in page, section
  sources = re.findall(r'src="([^"]*)"', page)
  assert len(sources) >= 6 and all(s.startswith('data:image/png;base64,') for s in sources)
  for s in sources:
    assert base64.b64decode(s.split(',', 1)[1])[:8] == b'\x89PNG\r\n\x1a\n'
  assert not re.search(r'(href|src)="(https?:|//|/)', page) and '<script' not in page and '<link' not in page
  assert "default-src 'none'" in page
  assert 'DOE_JOHN' not in page and '/home/me' not in page and '&lt;set&gt;' in page
  assert 'CI rests on' not in page or 'unstable' in page
  assert 'energy in the aortic-valve box 0.40' in page and 'Calibration slope' in page and 'NPV' in page


def test_regression_report_and_model_card(tmp_path):
  path, summary = _report(tmp_path, 'regression')
  page = open(path, encoding='utf-8').read()
  assert 'Bland' in page and 'MAE' in page and 'No threshold or recalibration' in page
  cfg = {'data': {'name': 'echonet_dynamic', 'builder_config': 'default', 'train_split': 'train',
                  'val_split': 'val', 'test_split': 'test', 'eval_num_clips': 4, 'eval_clip_len': 16,
                  'image_size': 112, 'manual_dir': '/exports/DOE_JOHN'},
         'task': {'kind': 'regression', 'name': 'Ejection fraction', 'label_key': 'ef'},
         'model': {'width': 64, 'stage_depths': [2, 2, 2, 2]}, 'init': 'ssl', 'frac': 0.1, 'subset_seed': 0}
  card = model_card.write_model_card(str(tmp_path), cfg, {'kind': 'regression', 'unit': 'EF (%)'},
                                     {'test': summary})
  text = open(card, encoding='utf-8').read()
  for heading in ('## Model', '## Intended use', '## Data', '## Evaluation', '## Limits'):
    assert heading in text
  assert 'Not a medical device' in text and '| MAE |' in text and 'DOE_JOHN' not in text


def _chromium(*args, timeout=120):
  return subprocess.run([CHROMIUM, '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars',
                         '--no-first-run', '--disable-dev-shm-usage', *args], capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason='chromium not installed (apt-get install -y chromium)')
def test_report_renders_in_headless_chromium(tmp_path):
  path, _ = _report(tmp_path)
  page = open(path, encoding='utf-8').read()
  # A copy with a load-time probe: the report's CSP forbids scripts, so the copy allows inline ones only.
  probe = """<script>window.addEventListener('load', () => {
    const broken = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).length;
    const heights = [...document.querySelectorAll('section')].map(s => s.id + '=' +
        Math.round(s.getBoundingClientRect().height)).join(',');
    document.body.setAttribute('data-probe',
        'images=' + document.images.length + ';broken=' + broken + ';' + heights);
  });</script>"""
  checked = page.replace("default-src 'none';", "default-src 'none'; script-src 'unsafe-inline';")
  checked = checked.replace('</body>', probe + '</body>')
  probe_path = tmp_path / 'probe.html'
  probe_path.write_text(checked, encoding='utf-8')
  dom = _chromium('--virtual-time-budget=10000', '--dump-dom', probe_path.as_uri()).stdout
  found = re.search(r'data-probe="([^"]*)"', dom)
  assert found, dom[-2000:]
  fields = dict(part.split('=') for part in found.group(1).replace(';', ',').split(','))
  assert int(fields['images']) >= 6 and fields['broken'] == '0', fields
  for section in html_report.SECTIONS:
    assert int(fields[section]) > 20, (section, fields)

  shot = tmp_path / 'report.png'
  _chromium('--window-size=1280,1600', f'--screenshot={shot}', 'file://' + os.path.abspath(path))
  from PIL import Image
  image = np.asarray(Image.open(shot).convert('L'), np.float32)
  assert image.shape == (1600, 1280) and image.std() > 10   # text and figures, not a blank page
