"""The README's one-command demo on synthetic_echo small (CPU, ≈ 15 min on 2 free cores): EchoCLR pretraining,
fine-tuning from the SSL encoder and from random init at a small label fraction, evaluation with 95 % CIs,
and a Grad-CAM image. Override any stage: `--config.pretrain.train.num_steps=50`, `--config.frac=0.2`."""
import ml_collections

from configs import finetune, ssl


def get_config(arg=None):
  c = ml_collections.ConfigDict()
  c.mode = 'demo'
  c.variant = 'default'
  c.frac = 0.1                       # fraction of training studies with labels
  c.inits = ('ssl', 'random')
  c.pretrain = ssl.get_config('demo')
  c.finetune = finetune.get_config('demo')
  c.data = c.pretrain.data           # one dataset for every stage: demo.run copies it into both
  c.saliency_split = 'test'
  return c
