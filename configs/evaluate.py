"""Evaluate a fine-tuned checkpoint on any split: `configs/evaluate.py --config.checkpoint=DIR
[--config.splits=test,ext_test]`; writes DIR/eval/<split>/ reports (the run's config.json gives the model)."""
import ml_collections


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.mode = 'evaluate'
  c.variant = 'default'
  c.checkpoint = ''         # a fine-tuning workdir (its best/ weights, else the latest checkpoint)
  c.splits = 'val,test'     # val first: its threshold (max F1 / target sensitivity) is applied to the others
  c.data_dir = ''           # override the dataset location recorded in the run's config
  c.output = ''             # default: <checkpoint>/eval
  c.bootstrap_resamples = 1000
  c.ci_level = 0.95
  return c
