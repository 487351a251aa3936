"""One self-contained HTML report per evaluated split (`eval/<split>/report.html`): headline metrics with CIs
and notes, every report figure, the full metric tables, the data summary, threshold and calibration, a
Grad-CAM gallery per study, and the run's configuration — images inline as base64, no external resource, so
the file can be mailed or archived alone. Paths in the configuration are redacted (a folder name may carry
patient identifiers)."""
from __future__ import annotations

import base64
import datetime
import html
import json
import os
from typing import Mapping, Optional, Sequence

from echojax.evaluation.plots import ci_text
from echojax.evaluation.reports import _metric_title

SECTIONS = ('headline', 'figures', 'metrics', 'data', 'decision', 'saliency', 'config', 'provenance')
HEADLINE = {'binary': ('auroc', 'average_precision', 'sensitivity@chosen', 'specificity@chosen',
                       'precision@chosen', 'npv@chosen', 'brier', 'ece', 'calibration_slope'),
            'multiclass': ('macro_auroc', 'quadratic_kappa', 'accuracy', 'balanced_accuracy'),
            'regression': ('mae', 'rmse', 'r2', 'bias', 'loa_low', 'loa_high')}
# Nothing may be fetched: images are inline, and a mailed report must not call home or load scripts.
CSP = ('<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
       'style-src \'unsafe-inline\'">')
PATH_KEYS = ('manual_dir', 'data_dir', 'init_path', 'checkpoint', 'output', 'workdir')
FIGURE_CAPTIONS = {
    'roc_curve.png': 'ROC curve (study level) with the operating points at 0.5 and at the threshold chosen on '
                     'validation.',
    'pr_curve.png': 'Precision–recall curve (study level); the dashed line is the prevalence.',
    'reliability.png': 'Reliability diagram: observed fraction of positive studies against the mean '
                       'predicted probability in 10 equal-width bins (counts beside the points).',
    'decision_curve.png': 'Decision curve: net benefit of acting on the model at each threshold probability '
                          'against treating every or no patient.',
    'confusion_matrix.png': 'Confusion matrix (study level).',
    'scatter.png': 'Predicted against true value (study level).',
    'bland_altman.png': 'Bland–Altman plot: difference against mean, with bias and 95 % limits of agreement.',
}
_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;
max-width:1150px;color:#1b1b1b;line-height:1.4}h1{font-size:22px}h2{font-size:17px;border-bottom:1px solid #ddd;
padding-bottom:4px;margin-top:28px}table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ddd;
padding:3px 7px;text-align:left}th{background:#f3f3f3}.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 12px;min-width:150px}.card b{display:block;
font-size:18px}.note{color:#a4470e;font-size:12px}.figs{display:flex;flex-wrap:wrap;gap:14px}
figure{margin:0;max-width:540px}figure img{max-width:100%}figcaption{font-size:12px;color:#555}
figure.saliency{max-width:100%}
pre{background:#f7f7f7;padding:10px;font-size:11px;overflow:auto;max-height:420px}"""


def _img(path: str, alt: str) -> str:
  with open(path, 'rb') as f:
    data = base64.b64encode(f.read()).decode('ascii')
  return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def redact_paths(config):
  """The config with every path-valued key replaced by '<set>' (or '' when empty)."""
  if isinstance(config, Mapping):
    return {k: (('<set>' if v else '') if k in PATH_KEYS and isinstance(v, str) else redact_paths(v))
            for k, v in config.items()}
  if isinstance(config, (list, tuple)):
    return [redact_paths(v) for v in config]
  return config


def _entry_note(entry: Mapping) -> str:
  return '; '.join(x for x in (entry.get('reason'), entry.get('note')) if x)


def _headline(summary: Mapping) -> str:
  metrics = summary['study']['metrics']
  cards = []
  for name in HEADLINE[summary.get('task', 'binary')]:
    if name in metrics:
      entry = metrics[name]
      note = _entry_note(entry) if entry.get('value') is not None else ''   # n/a already gives the reason
      cards.append(f'<div class="card">{html.escape(_metric_title(name))}<b>{html.escape(ci_text(entry))}</b>'
                   + (f'<span class="note">{html.escape(note)}</span>' if note else '') + '</div>')
  pct = round(summary['ci_level'] * 100)
  boot = summary['bootstrap']
  return (f'<p>Study level, {pct}% CIs from {boot["n_resamples"]} {boot.get("resampling", "simple")} '
          f'bootstrap resamples of studies.</p><div class="cards">{"".join(cards)}</div>')


def _metric_row(name: str, entry: Mapping) -> str:
  value = 'n/a' if entry['value'] is None else f"{entry['value']:.3f}"
  ci = '' if not entry['ci'] else f"{entry['ci'][0]:.3f} – {entry['ci'][1]:.3f}"
  return (f'<tr><td>{html.escape(_metric_title(name))}</td><td>{value}</td><td>{ci}</td><td>{entry["n"]}</td>'
          f'<td class="note">{html.escape(_entry_note(entry))}</td></tr>')


def _metric_tables(summary: Mapping) -> str:
  pct = round(summary['ci_level'] * 100)
  out = []
  for level in ('study', 'video'):
    part = summary[level]
    rows = ''.join(_metric_row(n, e) for n, e in part['metrics'].items())
    out.append(f'<h3>{level.capitalize()} level (n = {part["n"]})</h3><table><tr><th>Metric</th><th>Value</th>'
               f'<th>{pct}% CI</th><th>n</th><th>Note</th></tr>{rows}</table>')
  return ''.join(out)


def _table(rows: Mapping) -> str:
  return '<table>' + ''.join(f'<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>'
                             for k, v in rows.items()) + '</table>'


def _decision(summary: Mapping, decision: Mapping) -> str:
  if 'thresholds' not in summary:
    return '<p>No threshold or recalibration: not a binary task.</p>'
  t = summary['thresholds']
  chosen = t['chosen'].get('study')
  rows = {'Decision threshold (study)': (f'{chosen:.4f}, chosen on validation by {t["chosen_method"]}'
                                         if chosen is not None else f'{t["fixed"]:g} (none chosen on validation)')}
  rows.update(decision)
  return _table(rows)


def _gallery(saliency: Sequence[Mapping]) -> str:
  if not saliency:
    return '<p>No saliency maps in this report (eval.report_saliency_studies = 0, or not computed).</p>'
  items = []
  for s in saliency:
    score = ''
    if s.get('scores'):
      e = sum(x['energy'] for x in s['scores']) / len(s['scores'])
      score = f' · Grad-CAM energy in the aortic-valve box {e:.2f}.'
    items.append(f'<figure class="saliency">{_img(s["png"], s.get("caption", "saliency"))}<figcaption>'
                 f'{html.escape(s.get("caption", ""))}{html.escape(score)}</figcaption></figure>')
  return '<div class="figs">' + ''.join(items) + '</div>'


def write_html_report(out_dir: str, summary: Mapping, title: str, *, figures: Mapping[str, str],
                      data_summary: Mapping, config: Optional[Mapping] = None,
                      decision: Optional[Mapping] = None, saliency: Sequence[Mapping] = (),
                      provenance: Optional[Mapping] = None) -> str:
  """Writes out_dir/report.html and returns its path. figures: {file name: PNG path} (from write_report)."""
  figs = ''.join(f'<figure>{_img(p, n)}<figcaption>{html.escape(FIGURE_CAPTIONS.get(n, n))}</figcaption></figure>'
                 for n, p in figures.items() if p.endswith('.png') and os.path.exists(p))
  provenance = {'generated': datetime.datetime.now().isoformat(timespec='seconds'), **(provenance or {})}
  body = {
      'headline': ('Headline', _headline(summary)),
      'figures': ('Figures', f'<div class="figs">{figs}</div>'),
      'metrics': ('All metrics', _metric_tables(summary)),
      'data': ('Data', _table(data_summary)),
      'decision': ('Threshold and calibration', _decision(summary, decision or {})),
      'saliency': ('Saliency (Grad-CAM) by study', _gallery(saliency)),
      'config': ('Configuration (paths redacted)',
                 f'<pre>{html.escape(json.dumps(redact_paths(config or {}), indent=1))}</pre>'),
      'provenance': ('Provenance', _table(provenance)),
  }
  sections = ''.join(f'<section id="{key}"><h2>{html.escape(name)}</h2>{content}</section>'
                     for key, (name, content) in body.items())
  page = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">{CSP}<title>{html.escape(title)}</title>'
          f'<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{sections}</body></html>')
  path = os.path.join(out_dir, 'report.html')
  with open(path, 'w', encoding='utf-8') as f:
    f.write(page)
  return path
