"""Convert a torchvision r3d_18 state dict (.pth/.npz/.safetensors) into the portable encoder artifact.

  python scripts/convert_torchvision.py --input r3d_18-b3b3357e.pth --output /tmp/r3d18_kinetics
  python scripts/convert_torchvision.py --input r3d_18.npz --output DIR --fold-rgb-to-gray
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import numpy as np

# Runnable as `python scripts/convert_torchvision.py` from a checkout without installing the package.

from echojax.models.encoder_io import KINETICS_NORMALIZATION, make_encoder_spec, save_encoder
from echojax.models.torchvision_import import (infer_architecture, load_state_dict_file,
                                               torchvision_to_flax)


def gray_normalization(rgb: dict) -> dict:
  """One-channel stand-in for RGB mean/std: their channel averages (Kinetics' differ by < 15 %)."""
  return {'mean': [float(np.mean(rgb['mean']))], 'std': [float(np.mean(rgb['std']))]}


def convert(input_path: str, output_dir: str, fold_rgb_to_gray: bool = False, strip_prefix: str = '',
            normalization: Optional[dict] = KINETICS_NORMALIZATION) -> dict:
  """Convert and write; returns the spec written."""
  state_dict = load_state_dict_file(input_path)
  if strip_prefix:
    outside = sorted(k for k in state_dict if not k.startswith(strip_prefix))
    if outside:
      raise ValueError(f'{input_path}: keys without prefix {strip_prefix!r}: {outside[:10]}')
    state_dict = {k[len(strip_prefix):]: v for k, v in state_dict.items()}
  variables = torchvision_to_flax(state_dict, fold_rgb_to_gray=fold_rgb_to_gray)
  width, in_channels, depths = infer_architecture(state_dict)
  extra = {'converted_from': str(input_path)}
  if fold_rgb_to_gray and normalization is not None:
    normalization = gray_normalization(normalization)
    extra['notes'] = ('stem folded RGB→gray by summing input channels; input_normalization is the channel '
                      'average of the RGB statistics (exact parity needs the unfolded 3-channel encoder)')
  spec = make_encoder_spec(width=width, stage_depths=depths,
                           in_channels=1 if fold_rgb_to_gray else in_channels, source='torchvision',
                           input_normalization=normalization, **extra)
  save_encoder(output_dir, spec, variables)
  return spec


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--input', required=True,
                      help='r3d_18 state dict: .pth (needs torch), .npz, .safetensors')
  parser.add_argument('--output', required=True, help='artifact directory to write')
  parser.add_argument('--fold-rgb-to-gray', action='store_true',
                      help='sum the stem over RGB so the encoder takes 1-channel video')
  parser.add_argument('--strip-prefix', default='', help="key prefix to remove first, e.g. 'module.'")
  parser.add_argument('--no-normalization', action='store_true',
                      help='record input_normalization null instead of the Kinetics-400 mean/std')
  args = parser.parse_args(argv)
  spec = convert(args.input, args.output, args.fold_rgb_to_gray, args.strip_prefix,
                 None if args.no_normalization else KINETICS_NORMALIZATION)
  print(f'wrote {args.output}: width {spec["width"]}, stages {spec["stage_depths"]}, '
        f'in_channels {spec["in_channels"]}, feature_dim {spec["feature_dim"]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
