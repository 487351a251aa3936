"""The one-command demo: build synthetic_echo small if absent → EchoCLR pretraining → export → fine-tune
from SSL and from random init on a small label fraction (Platt-recalibrated on validation) → study-level
AUROC table with 95 % CIs, the calibration and operating-point metrics → one Grad-CAM figure and the
Grad-CAM valve-box score against random maps. Each stage is the real trainer with its own workdir under the
demo's workdir."""
from __future__ import annotations

import json
import math
import os
import time

import ml_collections

from echojax.jobs.logging_lib import log

VALVE_VIDEOS = 24   # severe-AS test videos scored for the valve-box localisation


def run(cfg, workdir: str) -> dict:
  from echojax.evaluation import reports
  from echojax.jobs import evaluate as evaluate_job
  from echojax.jobs import finetune as finetune_trainer
  from echojax.jobs import model_init
  from echojax.jobs import ssl as ssl_trainer
  t0 = time.time()
  data = ml_collections.ConfigDict(cfg.data.to_dict())
  pre = ml_collections.ConfigDict(cfg.pretrain.to_dict())
  pre.data = data
  ssl_dir = os.path.join(workdir, 'ssl')
  log(f'[demo 1/4] EchoCLR pretraining → {ssl_dir}')
  ssl_trainer.train(pre, ssl_dir)
  export_dir = os.path.join(ssl_dir, 'encoder')
  model_init.export_encoder(ssl_dir, export_dir, log=log)

  rows, runs, results = [], {}, {}
  for i, init in enumerate(cfg.inits):
    ft = ml_collections.ConfigDict(cfg.finetune.to_dict())
    ft.data = ml_collections.ConfigDict(data.to_dict())
    ft.init = init
    ft.init_path = export_dir if init == 'ssl' else ''
    ft.frac = cfg.frac
    ft_dir = os.path.join(workdir, f'finetune-{init}')
    log(f'[demo {2 + i}/4] fine-tune from {init} init on {cfg.frac:.0%} of training studies → {ft_dir}')
    result = finetune_trainer.train(ft, ft_dir)
    runs[init], results[init] = ft_dir, result
    summary = result['reports'][data.test_split]
    rows.append({'init': init, 'frac': cfg.frac, **reports.auroc_row(summary)})

  log('[demo 4/4] Grad-CAM saliency of the SSL-initialised model, and its valve-box localisation score')
  sal_dir = os.path.join(workdir, 'saliency')
  explained = runs[cfg.inits[0]]
  sal = evaluate_job.saliency_for_split(explained, split=cfg.saliency_split, out_dir=sal_dir, max_videos=1)
  try:
    valve = evaluate_job.valve_localisation(explained, split=cfg.saliency_split, max_videos=VALVE_VIDEOS)
  except ValueError as e:   # a dataset without valve boxes (not synthetic_echo)
    valve = None
    log(f'no valve-box score: {e}')
  table = reports.format_auroc_table(rows)
  pretraining = pretraining_summary(os.path.join(ssl_dir, 'metrics.jsonl'), pre.data.clip_len)
  with open(os.path.join(workdir, 'demo_results.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(workdir, 'demo_results.json'), 'w') as f:
    json.dump({'rows': rows, 'valve_localisation': valve, 'pretraining': pretraining}, f, indent=1)
  if pretraining:
    log(pretraining_line(pretraining))
  log('\nStudy-level test AUROC (95 % bootstrap CI over studies):\n' + table)
  log(clinical_lines(results[cfg.inits[0]]['reports'][data.test_split], cfg.inits[0]))
  if valve:
    log(valve_line(valve))
  log(f'\nreports: {", ".join(os.path.join(d, "eval", data.test_split, "report.html") for d in runs.values())}\n'
      f'saliency: {", ".join(r["png"] for r in sal)}\nsummary: {os.path.join(workdir, "demo_results.md")}\n'
      f'demo finished in {time.time() - t0:.0f} s')
  return {'rows': rows, 'runs': runs, 'saliency': sal, 'valve_localisation': valve}


def pretraining_summary(metrics_path: str, clip_len: int = 4) -> dict | None:
  """What the SSL stage learned, from its metrics.jsonl: NT-Xent when it first counts fully, its mean over the
  first and the last quarter of steps, and frame-order accuracy (exact, up to reversal) in the last quarter,
  next to chance."""
  if not os.path.exists(metrics_path):
    return None
  with open(metrics_path) as f:
    logged = [r for r in map(json.loads, f) if 'train/nt_xent' in r]
  if not logged:
    return None
  last_step = logged[-1]['step']
  tail = [r for r in logged if r['step'] > 0.75 * last_step] or logged[-1:]
  head = [r for r in logged if r['step'] <= 0.25 * last_step] or logged[:1]
  full = next((r for r in logged if r.get('train/contrastive_encoder_share', 1.0) >= 1.0), logged[0])
  mean = lambda key, rows=tail: sum(r[key] for r in rows) / len(rows) if all(key in r for r in rows) else None
  out = {'steps': last_step, 'last_quarter_from_step': tail[0]['step'], 'first_quarter_to_step': head[-1]['step'],
         'nt_xent_at_full_weight': full['train/nt_xent'], 'nt_xent_at_full_weight_step': full['step'],
         'nt_xent_first_quarter': mean('train/nt_xent', head), 'nt_xent_last_quarter': mean('train/nt_xent')}
  if mean('train/order_acc') is not None:
    num_classes = math.factorial(clip_len)   # the reversal metric counts 2 of the clip_len! permutations
    out.update(order_acc_last_quarter=mean('train/order_acc'), order_acc_rev_last_quarter=mean('train/order_acc_rev'),
               order_chance=1 / num_classes, order_rev_chance=2 / num_classes)
  return out


def pretraining_line(p: dict) -> str:
  first = (f"mean {p['nt_xent_first_quarter']:.3f} over steps ≤ {p['first_quarter_to_step']}, "
           if p.get('nt_xent_first_quarter') is not None else '')
  line = (f"\nEchoCLR pretraining, {p['steps']} steps: NT-Xent {p['nt_xent_at_full_weight']:.3f} at full weight "
          f"(step {p['nt_xent_at_full_weight_step']}; {first}ln(2B−1) when embeddings carry no signal) → "
          f"{p['nt_xent_last_quarter']:.3f} (mean of steps ≥ {p['last_quarter_from_step']})")
  if 'order_acc_last_quarter' in p:
    line += (f"; frame-order accuracy over those steps {p['order_acc_last_quarter']:.3f} exact, "
             f"{p['order_acc_rev_last_quarter']:.3f} up to time reversal (chance {p['order_chance']:.3f} / "
             f"{p['order_rev_chance']:.3f})")
  return line


def clinical_lines(summary: dict, init: str) -> str:
  """The test split's calibration and operating-point metrics of one run, with CIs."""
  from echojax.evaluation.plots import ci_text
  metrics = summary['study']['metrics']
  t = summary['thresholds']['chosen'].get('study')
  names = [('brier', 'Brier'), ('ece', 'ECE'), ('calibration_slope', 'calibration slope'),
           ('calibration_intercept', 'calibration intercept')]
  if t is not None:
    names += [(f'{m}@chosen', label) for m, label in (('sensitivity', 'sensitivity'), ('specificity', 'specificity'),
                                                     ('precision', 'PPV'), ('npv', 'NPV'))]
  header = (f"\n{init} init, test split ({summary.get('calibration') or 'uncalibrated scores'}"
            + (f'; threshold {t:.3f} chosen on validation' if t is not None else '') + '):')
  return header + ''.join(f'\n  {label:22s} {ci_text(metrics.get(key))}' for key, label in names)


def valve_line(valve: dict) -> str:
  return (f"\nGrad-CAM on the aortic valve ({valve['n_videos']} severe-AS test videos): energy in the valve box "
          f"{valve['energy_in_box']:.3f} vs {valve['energy_in_box_random']:.3f} for random maps (the box is "
          f"{100 * valve['box_area_share']:.1f} % of the sector); pointing game {valve['pointing_game']:.2f} vs "
          f"{valve['pointing_game_random']:.2f}")
