"""Tiny configs and a shared tiny dataset (synthetic_echo/ci) for the trainer, demo and CLI tests."""
from __future__ import annotations

import os

from configs import demo, finetune, ssl

TINY_MODEL = dict(width=4, stage_depths=(1, 1, 1, 1), conv_impl='xla')


def build_ci_dataset(data_dir: str) -> str:
  from echojax.data import pipeline
  builder = pipeline.get_builder('synthetic_echo', 'ci', data_dir)
  if not os.path.exists(os.path.join(str(builder.data_dir), 'dataset_info.json')):
    builder.download_and_prepare()
  return data_dir


def _tiny(cfg, data_dir):
  cfg.data.builder_config = 'ci'
  cfg.data.data_dir = data_dir
  cfg.data.image_size = 32
  cfg.data.finetune_clip_len = 8
  cfg.data.eval_clip_len = 8
  cfg.data.eval_num_clips = 2
  cfg.data.shuffle_buffer = 64
  for k, v in TINY_MODEL.items():
    cfg.model[k] = v
  return cfg


def ssl_config(data_dir, variant='echoclr', steps=4):
  cfg = _tiny(ssl.get_config(variant), data_dir)
  cfg.train.global_batch_size = 8
  cfg.train.num_steps = steps
  cfg.train.log_every_steps = 1
  cfg.train.checkpoint_every_steps = 2
  cfg.optim.lr = 1e-3
  cfg.probe.every_steps = steps
  cfg.probe.max_videos = 16
  cfg.probe.batch_size = 8
  return cfg


def finetune_config(data_dir, init='random', init_path='', frac=1.0):
  cfg = _tiny(finetune.get_config('paper'), data_dir)
  cfg.init, cfg.init_path, cfg.frac = init, init_path, frac
  cfg.train.global_batch_size = 8
  cfg.train.num_epochs = 2
  cfg.train.steps_per_epoch = 2
  cfg.train.patience = 1
  cfg.train.log_every_steps = 1
  cfg.optim.lr = 1e-3
  cfg.eval.batch_size = 8
  cfg.eval.bootstrap_resamples = 200
  return cfg


def demo_config(data_dir):
  cfg = demo.get_config()
  cfg.pretrain = ssl_config(data_dir, 'demo', steps=2)
  cfg.finetune = finetune_config(data_dir)
  cfg.finetune.train.num_epochs = 1
  cfg.data = cfg.pretrain.data
  cfg.frac = 0.5
  return cfg
