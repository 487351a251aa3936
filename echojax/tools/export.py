"""Encoder export CLI: `python -m echojax.export --workdir DIR --output OUT` writes the encoder of a run's
latest checkpoint (parameters + batch statistics + JSON architecture spec) in the portable format that
fine-tuning loads as init `ssl` and `echojax.models.load_encoder` serves."""
from __future__ import annotations

import argparse

from echojax.jobs.model_init import export_encoder  # noqa: F401  (public API of this module)


def main(argv=None):
  parser = argparse.ArgumentParser(prog='python -m echojax.export', description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--output', required=True)
  parser.add_argument('--step', type=int, default=None)
  args = parser.parse_args(argv)
  export_encoder(args.workdir, args.output, args.step)


if __name__ == '__main__':
  main()
