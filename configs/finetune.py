"""Fine-tuning configs: `configs/finetune.py[:paper|demo|linear_probe]` (severe AS by default).

Set `init` (random | kinetics | ssl), `init_path` (converted torchvision artifact, exported encoder, or an
SSL workdir) and `frac` (fraction of training STUDIES, nested across fractions for one `subset_seed`).
"""
import ml_collections

from configs import common

VARIANTS = ('paper', 'demo', 'linear_probe')


def get_config(arg=None):
  from echojax.config_lib import parse_variant
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
      kind='binary',           # binary (severe_as or any 0/1 study label)
      label_key='severe_as', dropout=0.25, dropout_on='logit',   # seed code drops out the logit
      label_smoothing=0.0, class_weighted=True, freeze_encoder=False))
  c.frac = 1.0
  c.subset_seed = 0
  c.optim = common.optim_config('adam', lr=1e-4)
  c.train = ml_collections.ConfigDict(dict(
      global_batch_size=88, num_epochs=30, num_steps=-1, steps_per_epoch=-1,
      early_stopping_metric='val_loss',   # val_loss (paper) | val_auroc
      patience=5, log_every_steps=20, keep_checkpoints=2, stop_after_steps=-1))
  c.eval = ml_collections.ConfigDict(dict(
      splits=('val', 'test'), batch_size=16, bootstrap_resamples=1000, ci_level=0.95,
      threshold_method='max_f1', target_sensitivity=0.9, bootstrap_seed=0))
  c.distributed = common.distributed_config()
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
  return c
