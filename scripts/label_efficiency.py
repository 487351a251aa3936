"""Label-efficiency experiment (the paper's Figure 2): pretrain each SSL method once, fine-tune every init
on nested fractions of labelled training studies × seeds, evaluate study-level test AUROC with 95 %
bootstrap CIs; writes results.csv, results.md and label_efficiency.png.

  python scripts/label_efficiency.py --preset cpu [--out runs/label_efficiency] [--kinetics DIR]

Rerunning resumes: finished pretraining/fine-tuning runs are reused. Presets only change budgets and
sizes (never the evaluation); `cpu` runs on synthetic_echo/benchmark with a tiny encoder at 64² (stated
in its output) so that it finishes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ml_collections  # noqa: E402

PRESETS = {
    # CPU-feasible: tiny R3D (width 8, one block per stage), 64×64 frames, 8-frame fine-tuning/eval clips
    # instead of 16 (and 4-frame SSL clips as the paper). 1,500 SSL steps: at 500 the EchoCLR-vs-random
    # gap at 2 % was 0.14 with touching CIs (README); the budget is the same for every method.
    'cpu': dict(dataset='synthetic_echo', builder_config='benchmark', width=8, depths=(1, 1, 1, 1),
                image_size=64, clip_len=8, ssl_steps=1500, ssl_batch=32, ssl_lr=1e-3,
                fractions=(0.02, 0.1, 1.0), seeds=(0,), ft_epochs=5, ft_batch=32, ft_lr=3e-4,
                ft_patience=3, ft_steps_per_epoch=30, methods=('echoclr', 'mi_simclr', 'simclr'),
                # The 30-study subset at 2 % is the noisiest cell (which studies, init, data order): 3 seeds.
                smallest_fraction_seeds=(0, 1, 2)),
    # A quick smoke preset (used by the tests): tiny everything.
    # XLA's own conv: it compiles faster than the CPU GEMM path and these steps are too small to care.
    'smoke': dict(dataset='synthetic_echo', builder_config='ci', width=4, depths=(1, 1, 1, 1),
                  image_size=32, clip_len=8, ssl_steps=4, ssl_batch=8, ssl_lr=1e-3, fractions=(0.5, 1.0),
                  seeds=(0,),
                  smallest_fraction_seeds=(0, 1), ft_epochs=1, ft_batch=8, ft_lr=1e-3, ft_patience=1,
                  ft_steps_per_epoch=2, methods=('echoclr',), conv_impl='xla'),
    # The paper's grid (GPU/TPU): R3D-18 at 112², paper hyperparameters.
    'paper': dict(dataset='echo_studies', builder_config='', width=64, depths=(2, 2, 2, 2), image_size=112,
                  clip_len=16,
                  ssl_steps=-1, ssl_batch=392, ssl_lr=0.1, fractions=(0.01, 0.05, 0.10, 0.25, 0.5, 0.75, 1.0),
                  seeds=(0, 1, 2), ft_epochs=30, ft_batch=88, ft_lr=1e-4, ft_patience=5,
                  ft_steps_per_epoch=-1, methods=('simclr', 'mi_simclr', 'echoclr')),
}


def _apply_data(cfg, p, args):
  cfg.data.name = p['dataset']
  cfg.data.builder_config = p['builder_config']
  cfg.data.image_size = p['image_size']
  cfg.data.finetune_clip_len = cfg.data.eval_clip_len = p['clip_len']
  if args.data_dir:
    cfg.data.data_dir = args.data_dir
  if args.manual_dir:
    cfg.data.manual_dir = args.manual_dir
  cfg.model.width = p['width']
  cfg.model.stage_depths = p['depths']
  cfg.model.conv_impl = p.get('conv_impl', cfg.model.conv_impl)


def ssl_config(method, p, args):
  from configs import ssl
  cfg = ssl.get_config(method)
  _apply_data(cfg, p, args)
  cfg.train.global_batch_size = p['ssl_batch']
  cfg.train.num_steps = p['ssl_steps']
  cfg.train.log_every_steps = max(p['ssl_steps'] // 20, 1) if p['ssl_steps'] > 0 else 50
  cfg.train.checkpoint_every_steps = max(p['ssl_steps'] // 4, 1) if p['ssl_steps'] > 0 else 1000
  cfg.optim.lr = p['ssl_lr']
  cfg.probe.every_steps = -1 if args.no_probe else cfg.probe.every_steps
  return cfg


def finetune_config(init, init_path, frac, seed, p, args):
  from configs import finetune
  cfg = finetune.get_config('paper')
  _apply_data(cfg, p, args)
  cfg.init, cfg.init_path, cfg.frac = init, init_path, frac
  cfg.subset_seed, cfg.seed = seed, seed
  cfg.train.global_batch_size = p['ft_batch']
  cfg.train.num_epochs = p['ft_epochs']
  cfg.train.patience = p['ft_patience']
  cfg.train.steps_per_epoch = p['ft_steps_per_epoch']
  cfg.optim.lr = p['ft_lr']
  cfg.eval.splits = ('val', 'test')
  return cfg


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--preset', choices=sorted(PRESETS), default='cpu')
  parser.add_argument('--out', default=None)
  parser.add_argument('--kinetics', default='', help='converted torchvision r3d_18 (adds the kinetics init)')
  parser.add_argument('--data-dir', default='')
  parser.add_argument('--manual-dir', default='')
  parser.add_argument('--no-probe', action='store_true')
  parser.add_argument('--report-only', action='store_true',
                      help='write the tables/figure from the runs finished so far; train nothing')
  args = parser.parse_args(argv)
  p = PRESETS[args.preset]
  out = args.out or os.path.join('runs', f'label_efficiency-{args.preset}')
  os.makedirs(out, exist_ok=True)
  from echojax import export, finetune_trainer, ssl_trainer
  from echojax.reports import auroc_row, format_auroc_table
  t0 = time.time()
  print(f'label efficiency, preset {args.preset}: {json.dumps(p)}', flush=True)

  encoders = {}
  for method in p['methods']:
    wd = os.path.join(out, f'ssl-{method}')
    enc = os.path.join(wd, 'encoder')
    if not os.path.exists(os.path.join(enc, 'encoder_spec.json')) and not args.report_only:
      ssl_trainer.train(ssl_config(method, p, args), wd)
      export.export_encoder(wd, enc)
    encoders[method] = enc
  inits = [('random', '')] + [(m, encoders[m]) for m in p['methods']]
  if args.kinetics:
    inits.append(('kinetics', args.kinetics))

  # The extremes first (smallest and largest fraction), random and the first method first, extra seeds
  # last: if a run is cut short, the comparisons that matter most are already on disk (rerunning resumes).
  fracs = sorted(p['fractions'])
  frac_order = [fracs[0], fracs[-1]] + fracs[1:-1] if len(fracs) > 1 else fracs
  seeds_of = {f: p['seeds'] for f in fracs}
  seeds_of[fracs[0]] = p.get('smallest_fraction_seeds', p['seeds'])
  order = [(f, init, seed) for seed_rank in range(max(map(len, seeds_of.values())))
           for f in frac_order for init in inits for seed in seeds_of[f][seed_rank:seed_rank + 1]]
  rows = []
  for frac, (name, path), seed in order:
    wd = os.path.join(out, f'ft-{name}-frac{frac:g}-seed{seed}')
    summary_path = os.path.join(wd, 'eval', 'test', 'summary.json')
    if not os.path.exists(summary_path) and args.report_only:
      print(f'{name} frac={frac:g} seed={seed}: not run yet', flush=True)
      continue
    if not os.path.exists(summary_path):
      init = 'random' if name == 'random' else ('kinetics' if name == 'kinetics' else 'ssl')
      finetune_trainer.train(finetune_config(init, path, frac, seed, p, args), wd)
    summary = json.load(open(summary_path))
    rows.append({'init': name, 'frac': frac, 'seed': seed, **auroc_row(summary)})
    r = rows[-1]
    auc = 'undefined' if r['auroc'] is None else f'{r["auroc"]:.3f} [{r["ci_lo"]:.3f}, {r["ci_hi"]:.3f}]'
    print(f'{name} frac={frac:g} seed={seed}: study-level test AUROC {auc}', flush=True)

  rows.sort(key=lambda r: (r['frac'], r['seed']))  # table rows by fraction; inits keep their column order
  with open(os.path.join(out, 'results.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  table = format_auroc_table(rows)
  wall = time.time() - t0
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write(f'Preset `{args.preset}` — study-level test AUROC [95 % bootstrap CI over studies]\n\n'
            f'{table}\n\nwall time {wall / 60:.1f} min\n')
  _figure(rows, os.path.join(out, 'label_efficiency.png'), args.preset)
  print(table)
  print(f'wrote {out}/results.csv, results.md, label_efficiency.png in {wall / 60:.1f} min', flush=True)


def _figure(rows, path, preset):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np
  rows = [r for r in rows if r['auroc'] is not None]  # undefined AUROCs (one-class split): table only
  fig, ax = plt.subplots(figsize=(6, 4))
  for init in dict.fromkeys(r['init'] for r in rows):
    mine = [r for r in rows if r['init'] == init]
    fracs = sorted(set(r['frac'] for r in mine))
    mean = [np.mean([r['auroc'] for r in mine if r['frac'] == f]) for f in fracs]
    lo = [np.mean([r['ci_lo'] for r in mine if r['frac'] == f]) for f in fracs]
    hi = [np.mean([r['ci_hi'] for r in mine if r['frac'] == f]) for f in fracs]
    x = [100 * f for f in fracs]
    line = ax.errorbar(x, mean, yerr=[np.subtract(mean, lo), np.subtract(hi, mean)], marker='o', capsize=3,
                       label=init)
    seeds = [(100 * r['frac'], r['auroc']) for r in mine if sum(q['frac'] == r['frac'] for q in mine) > 1]
    if seeds:  # several seeds: the line is their mean (bars: mean CI); each seed is a faint dot
      ax.scatter(*zip(*seeds), s=12, alpha=0.45, color=line[0].get_color())
  ax.set_xscale('log')
  ax.set_xlabel('% of labelled training studies')
  ax.set_ylabel('study-level test AUROC (95 % CI; mean over seeds)')
  ax.set_title(f'Label efficiency ({preset} preset)')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


if __name__ == '__main__':
  main()
