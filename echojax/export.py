"""Encoder export: `python -m echojax.export --workdir DIR --output OUT` writes the encoder of a run's
latest checkpoint (parameters + batch statistics + JSON architecture spec) in the portable format that
fine-tuning loads as init `ssl` and `echojax.models.load_encoder` serves."""
from __future__ import annotations

import argparse
import json
import os

import numpy as np


def export_encoder(workdir: str, output: str, step: int | None = None) -> str:
  from echojax import checkpointing
  from echojax.models import encoder_io
  cfg_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f'{cfg_path} not found: is {workdir!r} an echojax run directory?')
  cfg = json.load(open(cfg_path))
  step, raw = checkpointing.restore_raw(workdir, step)
  params, stats = raw['params'], raw.get('batch_stats', {})
  if 'encoder' not in params:
    raise KeyError(f'checkpoint step {step} in {workdir} has no "encoder" parameters '
                   f'(top-level keys: {sorted(params)})')
  model = cfg['model']
  # The stem kernel is (kt, kh, kw, Cin, Cout): its Cin is the encoder's input channel count.
  in_channels = int(np.shape(params['encoder']['stem_conv']['kernel'])[-2])
  spec = encoder_io.make_encoder_spec(model['width'], model['stage_depths'], in_channels, source='ssl',
                                      trained_steps=int(step), ssl_variant=cfg.get('variant'))
  encoder_io.save_encoder(output, spec, {'params': params['encoder'],
                                         'batch_stats': stats.get('encoder', {})})
  print(f'exported encoder of {workdir} (step {step}) → {output}', flush=True)
  return output


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--output', required=True)
  parser.add_argument('--step', type=int, default=None)
  args = parser.parse_args(argv)
  export_encoder(args.workdir, args.output, args.step)


if __name__ == '__main__':
  main()
