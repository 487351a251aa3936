"""Builds one of the project's TFDS datasets, as `tfds build data_builders/NAME` does but without the extra
packages the TFDS 4.9 command line imports (apache-beam, mlcroissant): `python -m echojax.data.build NAME
--manual_dir DIR --data_dir DIR [--config NAME] [--overwrite]`. A built dataset whose fingerprint no
longer matches its inputs is not reused silently: the command stops with the reason (--overwrite rebuilds).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from echojax.data import builder_common, pipeline


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('name', help='a folder of data_builders/ (echo_studies, echonet_dynamic, echonet_lvh, '
                                   'synthetic_echo), or its path')
  parser.add_argument('--manual_dir', '--manual-dir', default=None, help='the input files (not needed by '
                                                                        'synthetic_echo)')
  parser.add_argument('--data_dir', '--data-dir', default=None, help='where datasets are written (default: '
                                                                    "TFDS's, ~/tensorflow_datasets)")
  parser.add_argument('--config', default=None, help="one of the builder's configs (default: its own)")
  parser.add_argument('--overwrite', action='store_true', help='rebuild even if built (e.g. after a label fix)')
  parser.add_argument('--file_format', '--file-format', default=None, choices=('tfrecord', 'array_record'))
  args = parser.parse_args(argv)
  import tensorflow_datasets as tfds   # pylint: disable=g-import-not-at-top (after --help)

  name = os.path.basename(os.path.normpath(args.name))
  known = pipeline.project_builders()
  if name not in known:
    parser.error(f'unknown builder {args.name!r}; the project builders are {", ".join(known)}')
  configs = pipeline.builder_config_names(name)
  if args.config and args.config not in configs:
    parser.error(f'{name} has no config {args.config!r}; its configs: {", ".join(configs) or "(none)"}')
  if args.manual_dir and not os.path.isdir(args.manual_dir):
    parser.error(f'--manual_dir {args.manual_dir} is not a folder')
  builder = pipeline.get_builder(name, args.config, args.data_dir)
  reason = builder_common.check_fingerprint(builder, args.manual_dir)
  if reason and not args.overwrite:
    print(f'error: {reason}.\n{name}: rebuild with --overwrite', file=sys.stderr)
    return 1
  mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if args.overwrite
          else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=args.manual_dir, download_mode=mode),
        file_format=args.file_format)
  except (FileNotFoundError, ValueError) as e:   # bad tables, no usable video: the reason, not a traceback
    print(f'error: {name}: {e}', file=sys.stderr)
    return 1
  print(f'{name}: built in {builder.data_dir}')
  summary = os.path.join(str(builder.data_dir), builder_common.SUMMARY_FILE)
  if os.path.exists(summary):
    print(f'  build summary: {summary}; rejected files: '
          f'{os.path.join(str(builder.data_dir), builder_common.REJECTS_FILE)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
