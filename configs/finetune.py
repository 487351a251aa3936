"""Fine-tuning configs: `configs/finetune.py[:paper|demo|linear_probe|ef_regression|as_grade|lvh]`
(severe AS by default). Task variants: `ef_regression` (EchoNet-Dynamic ejection fraction, regression),
`as_grade` (AS none/mild/moderate/severe, multiclass; synthetic_echo, or --config.data.name=echo_studies),
`lvh` (EchoNet-LVH, binary: IVSd >= 1.1 cm).

Set `init` (random | kinetics | ssl), `init_path` (converted torchvision artifact, exported encoder, or an
SSL workdir) and `frac` (fraction of training STUDIES, nested across fractions for one `subset_seed`).
"""
import ml_collections

from configs import common

VARIANTS = ('paper', 'demo', 'linear_probe', 'ef_regression', 'as_grade', 'lvh')


def get_config(arg=None):
  from echojax.jobs.config_lib import parse_variant
  variant = parse_variant(arg, VARIANTS, 'paper')
  c = ml_collections.ConfigDict()
  c.mode = 'finetune'
  c.variant = variant
  c.seed = 0
  c.data = common.data_config(clip_len=4)
  c.model = common.model_config(width=64)
  c.init = 'random'            # random | kinetics | ssl
  c.init_path = ''             # kinetics: scripts/convert_torchvision.py output; ssl: export dir or SSL workdir
  c.task = ml_collections.ConfigDict(dict(
      kind='binary',           # binary | multiclass | regression
      label_key='severe_as',   # the record feature holding the study label
      name='Severe aortic stenosis',      # what reports, plots and predict call the target
      class_names=('not severe', 'severe AS'),  # binary: (0, 1) names; multiclass: the classes in output
                               # order ((): the label's ClassLabel names minus 'unknown')
      binarize_at=-1.0,        # binary from a continuous label: 1 when label >= this (-1: already 0/1)
      unit='',                 # regression: the target's unit in reports, e.g. 'EF (%)'
      standardize_target=True,  # regression: train on (y - mean) / sd of the training videos
      dropout=0.25, dropout_on='logit',   # seed code drops out the logit
      label_smoothing=0.0, class_weighted=True, freeze_encoder=False))
  c.frac = 1.0
  c.subset_seed = 0
  c.optim = common.optim_config('adam', lr=1e-4)
  c.train = ml_collections.ConfigDict(dict(
      global_batch_size=88, num_epochs=30, num_steps=-1, steps_per_epoch=-1,
      early_stopping_metric='val_loss',   # val_loss (paper) | val_auroc (classification) | val_mae
      patience=5, log_every_steps=20, keep_checkpoints=2, stop_after_steps=-1,
      accumulate_steps=1,        # > 1: the global batch in that many chunks per device, gradients summed
                                 # before one update (memory of one chunk); needs model.bn_group_size
                                 # dividing each chunk; 1 = off
  ))
  c.eval = ml_collections.ConfigDict(dict(
      splits=('val', 'test'), batch_size=16, bootstrap_resamples=1000, ci_level=0.95,
      threshold_method='max_f1', target_sensitivity=0.9, bootstrap_seed=0,
      bootstrap='stratified',  # stratified (class-preserving resamples of studies) | simple
      calibration='none',      # binary: none | platt | isotonic, fitted on val study probabilities
      html_report=True,        # eval/<split>/report.html (self-contained) and DIR/MODEL_CARD.md
      report_saliency_studies=4))  # studies with a Grad-CAM panel in each HTML report (0: none)
  c.distributed = common.distributed_config()
  if variant == 'ef_regression':
    c.data.name = 'echonet_dynamic'
    c.task.update(kind='regression', label_key='ef', name='Left ventricular ejection fraction',
                  class_names=(), unit='EF (%)', dropout_on='features', class_weighted=False)
  if variant == 'as_grade':
    c.task.update(kind='multiclass', label_key='av_stenosis', name='Aortic stenosis grade',
                  class_names=('none', 'mild', 'moderate', 'severe'), class_weighted=False,
                  dropout_on='features')
  if variant == 'lvh':
    c.data.name = 'echonet_lvh'
    c.task.update(label_key='ivsd', binarize_at=1.1, name='Left ventricular hypertrophy (IVSd >= 1.1 cm)',
                  class_names=('no LVH', 'LVH'))
  if variant != 'demo':
    c.data.min_plax_prob = 0.5   # paper: PLAX videos only (view classifier's top class); no-op on synthetic_echo
  if variant == 'linear_probe':
    c.task.freeze_encoder = True
    c.optim.lr = 1e-3
  if variant == 'demo':
    c.model.width = 8
    c.model.stage_depths = (1, 1, 1, 1)
    c.data.image_size = 64
    c.data.finetune_clip_len = 16
    c.train.global_batch_size = 16
    c.train.num_epochs = 6
    c.train.patience = 3
    c.optim.lr = 1e-3
    c.eval.bootstrap_resamples = 1000
    c.eval.calibration = 'platt'   # the demo reports calibrated probabilities
  return c
