"""Label-efficiency experiment (the paper's Figure 2): pretrain each SSL method once, fine-tune every init
on nested fractions of labelled training studies × seeds, evaluate study-level test AUROC with 95 %
bootstrap CIs, and compare every pair of inits on the same test studies (paired study bootstrap of the
AUROC difference, DeLong's test, pooled over seeds); writes results.csv, paired.csv, paired_pooled.csv,
results.md and label_efficiency.png.

  python scripts/label_efficiency.py --preset cpu --workers 2 [--out runs/label_efficiency] [--kinetics DIR]

Rerunning resumes: finished pretraining/fine-tuning runs are reused. `--workers N` trains the runs in N
single-threaded processes that claim runs one at a time (OUT/claims/, a dead worker's claim is taken
over), then writes the report; another process may join with `--workers 1` (it works the same queue).
Presets only change budgets and sizes (never the evaluation); `cpu` runs on synthetic_echo/benchmark with
a tiny encoder at 64² (stated in its output) so that it finishes on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time


import ml_collections  # noqa: E402

PRESETS = {
    # CPU-feasible: tiny R3D (width 8, one block per stage), 64×64 frames, 8-frame fine-tuning/eval clips
    # instead of 16 (and 4-frame SSL clips as the paper); half the stem's filters start as temporal
    # differences for every init (model.stem_motion_fraction: without it frame order never leaves chance at
    # this size). 1,000 SSL steps, the same for every method. 1 %, 2 % and 100 %: the 10 % cell was dropped
    # to fit 5 seeds at 1–2 % for five inits into ≈ 2.6 h on two cores (`--workers 2`; README).
    'cpu': dict(dataset='synthetic_echo', builder_config='benchmark', width=8, depths=(1, 1, 1, 1),
                image_size=64, clip_len=8, ssl_steps=1000, ssl_batch=32, ssl_lr=1e-3, stem_motion_fraction=0.5,
                # EchoCLR's frame-order-first curriculum (configs/ssl.py): order alone for 250 steps, then
                # NT-Xent ramps in over 50; within the same 1,000 steps as the other methods
                order_only_steps=250, contrastive_warmup_steps=50,
                fractions=(0.01, 0.02, 1.0), seeds=(0,), ft_epochs=3, ft_batch=32, ft_lr=3e-4,
                ft_patience=3, ft_steps_per_epoch=40,
                # echoclr_no_order: EchoCLR in every setting but the order loss — the control that isolates
                # the order task (EchoCLR − MI-SimCLR also carries the shuffle and the curriculum)
                methods=('echoclr', 'mi_simclr', 'echoclr_no_order', 'simclr'),
                # 15 and 30 labelled studies (≈ 3 and 6 positive) are the noisiest cells: which studies
                # are drawn moved random init by 0.23 AUROC at 2 % (README), so 5 seeds there.
                fraction_seeds={0.01: (0, 1, 2, 3, 4), 0.02: (0, 1, 2, 3, 4)}),
    # A quick smoke preset (used by the tests): tiny everything.
    # XLA's own conv: it compiles faster than the CPU GEMM path and these steps are too small to care.
    'smoke': dict(dataset='synthetic_echo', builder_config='ci', width=4, depths=(1, 1, 1, 1),
                  image_size=32, clip_len=8, ssl_steps=4, ssl_batch=8, ssl_lr=1e-3, fractions=(0.5, 1.0),
                  seeds=(0,),
                  fraction_seeds={0.5: (0, 1)}, ft_epochs=1, ft_batch=8, ft_lr=1e-3, ft_patience=1,
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
  cfg.model.stem_motion_fraction = p.get('stem_motion_fraction', cfg.model.stem_motion_fraction)


def ssl_config(method, p, args):
  from configs import ssl
  cfg = ssl.get_config(method)
  _apply_data(cfg, p, args)
  cfg.train.global_batch_size = p['ssl_batch']
  cfg.train.num_steps = p['ssl_steps']
  cfg.train.log_every_steps = max(p['ssl_steps'] // 20, 1) if p['ssl_steps'] > 0 else 50
  cfg.train.checkpoint_every_steps = max(p['ssl_steps'] // 4, 1) if p['ssl_steps'] > 0 else 1000
  cfg.optim.lr = p['ssl_lr']
  if cfg.data.frame_order:   # EchoCLR and its no-order control share the schedule
    cfg.ssl.order_only_steps = p.get('order_only_steps', cfg.ssl.order_only_steps)
    cfg.ssl.contrastive_warmup_steps = p.get('contrastive_warmup_steps', cfg.ssl.contrastive_warmup_steps)
  cfg.probe.every_steps = 0 if args.no_probe else cfg.probe.every_steps  # 0: no probe
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
  parser.add_argument('--workers', type=int, default=1,
                      help='train the runs in N single-threaded worker processes (one per core), then report')
  parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)   # k/N: set by --workers
  parser.add_argument('--only', default='',
                      help='comma-separated inits (random,simclr,...): train only their runs; the report '
                           'still covers every finished run')
  parser.add_argument('--resampling', choices=('stratified', 'simple'), default='stratified',
                      help='paired bootstrap: keep each class count of the test split (default) or not')
  args = parser.parse_args(argv)
  p = PRESETS[args.preset]
  out = args.out or os.path.join('runs', f'label_efficiency-{args.preset}')
  os.makedirs(out, exist_ok=True)
  from echojax.tools import export
  from echojax.jobs import finetune as finetune_trainer, ssl as ssl_trainer
  from echojax.data.subsets import LabelFractionError
  from echojax.evaluation.reports import auroc_row, format_auroc_table
  t0 = time.time()
  print(f'label efficiency, preset {args.preset}: {json.dumps(p)}', flush=True)
  if args.workers > 1 and args.worker is None and not args.report_only:
    _run_workers(args, argv)   # every run trained by N single-threaded worker processes; then report
    args.report_only = True
  if not args.report_only:
    _enable_compilation_cache(out)

  encoders = {m: os.path.join(out, f'ssl-{m}', 'encoder') for m in p['methods']}
  inits = [('random', '')] + [(m, encoders[m]) for m in p['methods']]
  if args.kinetics:
    inits.append(('kinetics', args.kinetics))
  fts = _finetune_order(p, inits)
  if not args.report_only:
    jobs = _select_jobs([('ssl', m) for m in _ssl_order(p['methods'])] + [('ft', item) for item in fts],
                        args.only, [name for name, _ in inits])
    _work(jobs, out, p, args, encoders, ssl_trainer, export, finetune_trainer, LabelFractionError)
    if args.worker is not None:
      return   # the parent writes the report once every worker is done

  rows, run_dirs, skipped = [], {}, []
  for frac, (name, path), seed in fts:
    wd = os.path.join(out, f'ft-{name}-frac{frac:g}-seed{seed}')
    summary_path = os.path.join(wd, 'eval', 'test', 'summary.json')
    if os.path.exists(os.path.join(wd, SKIPPED)):
      skipped.append(open(os.path.join(wd, SKIPPED)).read().strip())
      continue
    if not os.path.exists(summary_path):
      print(f'{name} frac={frac:g} seed={seed}: not run yet', flush=True)
      continue
    summary = json.load(open(summary_path))
    run_dirs[frac, name, seed] = wd
    rows.append({'init': name, 'frac': frac, 'seed': seed, **auroc_row(summary)})
    r = rows[-1]
    auc = 'undefined' if r['auroc'] is None else f'{r["auroc"]:.3f} [{r["ci_lo"]:.3f}, {r["ci_hi"]:.3f}]'
    print(f'{name} frac={frac:g} seed={seed}: study-level test AUROC {auc}', flush=True)
  if not rows:
    print('no finished run to report yet', flush=True)
    return

  rows.sort(key=lambda r: (r['frac'], r['seed']))  # table rows by fraction; inits keep their column order
  with open(os.path.join(out, 'results.csv'), 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
  table = format_auroc_table(rows)
  per_seed, pooled, comparisons = _paired_report(out, run_dirs, [name for name, _ in inits],
                                                 args.resampling)
  wall = time.time() - t0
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write(f'Preset `{args.preset}` — study-level test AUROC [95 % bootstrap CI over studies]\n\n'
            f'{table}\n' + ''.join(f'\n- not trained: {s}' for s in skipped) +
            f'\n\n## Paired comparisons on the same test studies\n\n{PAIRED_METHOD}\n\n{comparisons}\n'
            f'wall time {wall / 60:.1f} min\n')
  _figure(rows, per_seed, pooled, os.path.join(out, 'label_efficiency.png'), args.preset)
  print(table)
  print(comparisons)
  print(f'wrote {out}/results.csv, paired.csv, paired_pooled.csv, results.md, label_efficiency.png in '
        f'{wall / 60:.1f} min', flush=True)


SKIPPED = 'SKIPPED.txt'   # a fine-tune that cannot exist (its subset drew one class): the reason, for the table


def _ssl_order(methods):
  """Pretraining order: EchoCLR last, so the comparisons that need no frame-order model start first."""
  return sorted(methods, key=lambda m: m == 'echoclr')


def _finetune_order(p, inits):
  """(frac, (init, path), seed) of every fine-tune. Seed 0 at the smallest and the largest fraction first,
  then the other seeds of the multi-seed fractions, then the remaining fractions: if a run is cut short,
  the comparisons that matter most are already on disk (rerunning resumes)."""
  fracs = sorted(p['fractions'])
  seeds_of = {f: tuple(p.get('fraction_seeds', {}).get(f, p['seeds'])) for f in fracs}
  extremes = [fracs[0], fracs[-1]] if len(fracs) > 1 else fracs
  multi = [f for f in fracs if len(seeds_of[f]) > 1]
  rank0 = extremes + [f for f in multi if f not in extremes]
  order = [(f, init, seeds_of[f][0]) for f in rank0 for init in inits]
  order += [(f, init, seed) for rank in range(1, max(map(len, seeds_of.values())))
            for f in multi for init in inits for seed in seeds_of[f][rank:rank + 1]]
  order += [(f, init, seed) for f in fracs if f not in rank0 for init in inits for seed in seeds_of[f]]
  return order


def _select_jobs(jobs, only, init_names):
  """The jobs of the inits named in `only` (comma-separated; '' = all); an unknown name is an error."""
  wanted = [n.strip() for n in only.split(',') if n.strip()]
  unknown = sorted(set(wanted) - set(init_names))
  if unknown:
    raise SystemExit(f'--only: unknown init(s) {unknown}; this preset has {init_names}')
  if not wanted:
    return jobs
  return [(kind, item) for kind, item in jobs if (item if kind == 'ssl' else item[1][0]) in wanted]


def _enable_compilation_cache(out):
  """Every fine-tune compiles the same step shapes: XLA's persistent cache compiles them once per grid."""
  import jax
  jax.config.update('jax_compilation_cache_dir', os.path.join(out, 'jax_cache'))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def _claim(out, name):
  """Atomically claim a run for this process (a claim file holding its pid); a dead holder's claim is
  taken over. False when a live process holds it."""
  claims = os.path.join(out, 'claims')
  os.makedirs(claims, exist_ok=True)
  path = os.path.join(claims, name)
  for _ in range(2):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      try:
        pid = int(open(path).read() or 0)
      except (OSError, ValueError):
        pid = 0
      if pid == os.getpid():
        return True
      if pid and _alive(pid):
        return False
      try:
        os.remove(path)   # stale: its holder died (a killed worker); retry once
      except FileNotFoundError:
        pass
      continue
    with os.fdopen(fd, 'w') as f:
      f.write(str(os.getpid()))
    return True
  return False


def _alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _release(out, name):
  try:
    os.remove(os.path.join(out, 'claims', name))
  except FileNotFoundError:
    pass


def _work(jobs, out, p, args, encoders, ssl_trainer, export, finetune_trainer, LabelFractionError):
  """Run every unfinished job this process can claim, in order; a fine-tune waits until its encoder is
  exported (another worker may be pretraining it). Returns when every job is done or held elsewhere and
  nothing is left to wait for."""
  def done(job):
    kind, item = job
    if kind == 'ssl':
      return os.path.exists(os.path.join(encoders[item], 'encoder_spec.json'))
    wd = _ft_dir(out, item)
    return os.path.exists(os.path.join(wd, 'eval', 'test', 'summary.json')) or os.path.exists(
        os.path.join(wd, SKIPPED))

  def name(job):
    kind, item = job
    return f'ssl-{item}' if kind == 'ssl' else os.path.basename(_ft_dir(out, item))

  while True:
    pending = [j for j in jobs if not done(j)]
    if not pending:
      return
    ran = False
    for job in pending:
      kind, item = job
      if kind == 'ft' and item[1][0] in encoders and not done(('ssl', item[1][0])):
        continue   # its encoder is still being pretrained
      if done(job) or not _claim(out, name(job)):
        continue
      try:
        if not done(job):
          _run_job(job, out, p, args, encoders, ssl_trainer, export, finetune_trainer, LabelFractionError)
          if not done(job):   # never loop retraining a run whose output does not appear
            raise RuntimeError(f'label efficiency: {name(job)} finished without writing its result')
      finally:
        _release(out, name(job))
      ran = True
      break   # re-scan: earlier jobs may have become runnable
    if not ran:
      held = [j for j in pending if os.path.exists(os.path.join(out, 'claims', name(j)))]
      if not held:
        raise RuntimeError(f'label efficiency: {len(pending)} runs cannot start (their encoder is missing '
                           f'and nobody is pretraining it): {[name(j) for j in pending][:5]}')
      time.sleep(5)


def _ft_dir(out, item):
  frac, (name, _), seed = item
  return os.path.join(out, f'ft-{name}-frac{frac:g}-seed{seed}')


def _run_job(job, out, p, args, encoders, ssl_trainer, export, finetune_trainer, LabelFractionError):
  kind, item = job
  if kind == 'ssl':
    wd = os.path.join(out, f'ssl-{item}')
    ssl_trainer.train(ssl_config(item, p, args), wd)
    export.export_encoder(wd, encoders[item])
    return
  frac, (name, path), seed = item
  wd = _ft_dir(out, item)
  init = 'random' if name == 'random' else ('kinetics' if name == 'kinetics' else 'ssl')
  try:
    finetune_trainer.train(finetune_config(init, path, frac, seed, p, args), wd)
  except LabelFractionError as e:  # a tiny subset drew one class: that seed has no run to compare
    os.makedirs(wd, exist_ok=True)
    with open(os.path.join(wd, SKIPPED), 'w') as f:
      f.write(f'{name} {100 * frac:g}% seed {seed}: {e}\n')
    print(f'{name} frac={frac:g} seed={seed}: skipped ({e})', flush=True)


def _run_workers(args, argv):
  """N copies of this command as `--worker k/N`, each single-threaded on its own core: the tiny models
  here leave a second thread of one process mostly idle (input pipeline, evaluation and compilation are
  largely serial), two independent runs do not. Each worker's log: OUT/worker-k.log."""
  import subprocess
  out = args.out or os.path.join('runs', f'label_efficiency-{args.preset}')
  argv = list(sys.argv[1:] if argv is None else argv)
  cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else []
  env = dict(os.environ, XLA_FLAGS=(os.environ.get('XLA_FLAGS', '') +
                                    ' --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'),
             TF_NUM_INTRAOP_THREADS='1', TF_NUM_INTEROP_THREADS='2')
  procs = []
  for k in range(args.workers):
    log = open(os.path.join(out, f'worker-{k}.log'), 'a')
    cmd = [sys.executable, os.path.abspath(__file__), *argv, '--worker', f'{k}/{args.workers}']
    if cpus:
      cmd = ['taskset', '-c', str(cpus[k % len(cpus)])] + cmd if _has_taskset() else cmd
    procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
    time.sleep(2)   # staggered: the first claims the first run
  codes = [proc.wait() for proc in procs]
  if any(codes):
    raise SystemExit(f'label efficiency: worker exit codes {codes}; see {out}/worker-*.log (rerun resumes)')


def _has_taskset():
  import shutil
  return shutil.which('taskset') is not None


PAIRED_RESAMPLES = 2000
PAIRED_METHOD = (
    'Δ = AUROC(a) − AUROC(b) on the same test studies. Per seed: the paired study bootstrap (the same '
    f'{PAIRED_RESAMPLES:,} resamples of test studies for both inits and for every run, class counts kept '
    'unless --resampling simple; 95 % percentile CI) and DeLong\'s test for correlated AUROCs (two-sided). '
    'Across seeds (the seed draws the labelled subset, the head init and the data order): mean ± sd of '
    'the per-seed Δ, and the pooled Δ = their mean with a 95 % CI from a two-level bootstrap (seeds drawn '
    'with replacement × the shared test-study resamples), which carries both the between-subset spread and '
    'the test-set sampling. p-values are per comparison, not adjusted for the number of comparisons.')


def _paired_report(out, run_dirs, names, resampling):
  """Every pair of inits at every fraction → paired.csv, paired_pooled.csv and their Markdown tables."""
  import itertools
  from echojax.evaluation import paired
  tables = {key: paired.read_study_predictions(os.path.join(wd, 'eval', 'test', 'study_predictions.csv'))
            for key, wd in run_dirs.items()}
  ordered = names[1:] + names[:1]  # random last: every Δ reads "method − random", "echoclr − mi_simclr"
  per_seed, pooled = paired.compare_grid(tables, list(itertools.combinations(ordered, 2)),
                                         n_resamples=PAIRED_RESAMPLES, resampling=resampling)
  for name, table_rows in (('paired.csv', per_seed), ('paired_pooled.csv', pooled)):
    with open(os.path.join(out, name), 'w', newline='') as f:
      if table_rows:
        w = csv.DictWriter(f, fieldnames=list(table_rows[0]))
        w.writeheader()
        w.writerows(table_rows)
  text = paired.format_paired_tables(per_seed, pooled) if pooled else '(no pair of runs to compare yet)\n'
  return per_seed, pooled, text


def _dodged(position, slot, n_slots, rank=0, n_ranks=1):
  """x of a marker: inits side by side around the fraction's tick, seeds side by side within an init."""
  width = 0.8 / n_slots
  return position + (slot - (n_slots - 1) / 2) * width + (rank - (n_ranks - 1) / 2) * 0.75 * width / n_ranks


# Method-vs-method pairs drawn beside the "vs random" ones: EchoCLR over MI-SimCLR (the paper's comparison;
# it carries the shuffle and the curriculum too) and over its no-order control (the order task alone).
FIGURE_PAIRS = (('echoclr', 'mi_simclr'), ('echoclr', 'echoclr_no_order'))


def _figure(rows, per_seed, pooled, path, preset):
  """Left: AUROC per init (thin bars: each run's bootstrap CI; hollow marker and thick bar: mean ± sd
  over seeds). Right: paired Δ vs random and FIGURE_PAIRS (thin: per-seed paired CI; diamond and
  thick bar: pooled Δ and its two-level CI)."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np
  from matplotlib.lines import Line2D
  rows = [r for r in rows if r['auroc'] is not None]  # undefined AUROCs (one-class split): table only
  fracs = sorted({r['frac'] for r in rows})
  at = {frac: i for i, frac in enumerate(fracs)}  # evenly spaced ticks: 1 % and 2 % need the room
  colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
  fig, (ax, dax) = plt.subplots(1, 2, figsize=(12, 5.6))

  inits = list(dict.fromkeys(r['init'] for r in rows))
  for slot, init in enumerate(inits):
    color, centre, means = colors[slot % len(colors)], [], []
    for frac in fracs:
      runs = sorted((r for r in rows if r['init'] == init and r['frac'] == frac), key=lambda r: r['seed'])
      if not runs:
        continue
      for rank, r in enumerate(runs):
        x = _dodged(at[frac], slot, len(inits), rank, len(runs))
        ax.errorbar([x], [r['auroc']], yerr=[[r['auroc'] - r['ci_lo']], [r['ci_hi'] - r['auroc']]], fmt='.',
                    color=color, ms=4, lw=0.8, alpha=0.8)
      values = [r['auroc'] for r in runs]
      centre.append(_dodged(at[frac], slot, len(inits)))
      means.append(np.mean(values))
      if len(runs) > 1:
        ax.errorbar([centre[-1]], [means[-1]], yerr=[np.std(values, ddof=1)], fmt='none', color=color,
                    lw=6, alpha=0.3, zorder=3)
        ax.plot([centre[-1]], [means[-1]], 'o', mfc='white', mec=color, mew=1.5, ms=7, zorder=4)
    ax.plot(centre, means, '-', color=color, lw=1.2, label=init)
  ax.axhline(0.5, ls='--', color='grey', lw=1)
  handles = ax.get_legend_handles_labels()[0] + [
      Line2D([], [], color='grey', ls='--', lw=1, label='chance (0.5)'),
      Line2D([], [], color='k', marker='.', lw=0.8, label="one run: 95 % study-bootstrap CI"),
      Line2D([], [], color='grey', marker='o', mfc='white', mec='k', lw=6, label='mean ± sd over seeds')]
  ax.legend(handles=handles, fontsize=8, loc='upper center', bbox_to_anchor=(0.5, -0.13), ncol=3)
  ax.set(ylabel='study-level test AUROC', title=f'Label efficiency ({preset} preset)')

  pairs = [(a, b) for a, b in dict.fromkeys((r['init_a'], r['init_b']) for r in pooled)
           if b == 'random' or (a, b) in FIGURE_PAIRS]
  for slot, (a, b) in enumerate(pairs):
    # Δ vs random in the method's colour; a method-vs-method pair in a colour no init uses, hollow.
    color = colors[(inits.index(a) if b == 'random' else len(inits) + slot) % len(colors)]
    marker_fill = 'white' if b != 'random' else color
    for frac in fracs:
      runs = [r for r in per_seed if (r['init_a'], r['init_b'], r['frac']) == (a, b, frac)
              and r['difference'] is not None]
      for rank, r in enumerate(runs):
        x = _dodged(at[frac], slot, len(pairs), rank, len(runs))
        lo, hi = (r['ci_lo'], r['ci_hi']) if r['ci_lo'] is not None else (r['difference'],) * 2
        dax.errorbar([x], [r['difference']], yerr=[[r['difference'] - lo], [hi - r['difference']]], fmt='.',
                     color=color, ms=4, lw=0.8, alpha=0.8)
      pool = next((r for r in pooled if (r['init_a'], r['init_b'], r['frac']) == (a, b, frac)), None)
      if pool and pool['n_seeds'] > 1 and pool['ci_lo'] is not None:
        x, m = _dodged(at[frac], slot, len(pairs)), pool['mean']
        dax.errorbar([x], [m], yerr=[[m - pool['ci_lo']], [pool['ci_hi'] - m]], fmt='none', color=color, lw=6,
                     alpha=0.3, zorder=3)
        dax.plot([x], [m], 'D', mfc=marker_fill, mec=color, mew=1.5, ms=6, zorder=4)
    dax.plot([], [], 'D', color=color, mfc=marker_fill, label=f'{a} − {b}')
  dax.axhline(0, ls='--', color='grey', lw=1)
  handles = dax.get_legend_handles_labels()[0] + [
      Line2D([], [], color='grey', ls='--', lw=1, label='no difference'),
      Line2D([], [], color='k', marker='.', lw=0.8, label='one seed: 95 % paired bootstrap CI'),
      Line2D([], [], color='grey', marker='D', mfc='k', mec='k', lw=6, label='pooled over seeds: 95 % CI')]
  dax.legend(handles=handles, fontsize=8, loc='upper center', bbox_to_anchor=(0.5, -0.13), ncol=3)
  dax.set(ylabel='Δ study-level test AUROC (a − b)', title='Paired differences on the same test studies')
  for axis in (ax, dax):
    axis.set_xticks(range(len(fracs)), [f'{100 * f:g}%' for f in fracs])
    axis.set_xlim(-0.55, len(fracs) - 0.45)
    axis.set_xlabel('labelled training studies (% of the training split; evenly spaced)')
    axis.grid(alpha=0.3, axis='y')
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


if __name__ == '__main__':
  main()
