"""Dataset preparation for a run: resolves `data.name` to the project's TFDS builder (with that builder's
own default config unless `data.builder_config` names one of its configs) and builds it on first use. The
caller says which process builds (`is_chief`) and how the others wait (`barrier`)."""
from __future__ import annotations

import os
from typing import Callable, Optional

from echojax.data import pipeline


def builder_config_for(name: str, builder_config: str) -> Optional[str]:
  """`builder_config` when the builder has a config of that name, else None (the builder's default).
  The shared config default ('small') is synthetic_echo's; other builders have their own."""
  if not builder_config:
    return None
  names = pipeline.builder_config_names(name)
  if builder_config in names:
    return builder_config
  if builder_config == 'small' and name != 'synthetic_echo':
    return None
  raise ValueError(f'data.builder_config={builder_config!r} is not a config of {name}; '
                   f'choose one of {", ".join(names) or "(none)"}')


def is_prepared(builder) -> bool:
  return os.path.exists(os.path.join(str(builder.data_dir), 'dataset_info.json'))


class StaleDatasetError(ValueError):
  """The built dataset no longer matches its label tables, options or converter manifest."""


def _builder(data_cfg, config):
  options = {k: data_cfg.get(k) for k in pipeline.run_option_names(data_cfg.name)}
  return pipeline.get_builder(data_cfg.name, config, data_cfg.data_dir or None,
                              **({'options': options} if options else {}))


def prepare_dataset(data_cfg, *, log=print, is_chief: bool = True, barrier: Callable[[], None] = lambda: None):
  """The builder of `data_cfg`, built when absent (auto_build) or asked (rebuild). A built dataset whose
  fingerprint (label tables, options, converter manifest) no longer matches stops the run with the reason."""
  import tensorflow_datasets as tfds
  from echojax.data import builder_common
  name = data_cfg.name
  config = builder_config_for(name, data_cfg.builder_config)
  if name == 'synthetic_echo':
    log(f'dataset: synthetic_echo/{config} (the embedded synthetic PLAX benchmark; no patient data). '
        'Set --config.data.name/--config.data.manual_dir for your own data.')
  builder = _builder(data_cfg, config)
  rebuild = bool(data_cfg.get('rebuild', False))
  if is_prepared(builder) and not rebuild:
    stale = builder_common.check_fingerprint(builder, data_cfg.manual_dir or None)
    if stale:
      raise StaleDatasetError(f'dataset {name} in {builder.data_dir} is stale: {stale}. '
                              'Rebuild it with --config.data.rebuild=True')
  if not is_prepared(builder) or rebuild:
    if not (data_cfg.auto_build or rebuild):
      raise FileNotFoundError(f'dataset {builder.name}/{builder.builder_config and builder.builder_config.name} '
                              f'is not built in {builder.data_dir}; build it or set data.auto_build=True')
    if is_chief:
      log(f'{"rebuilding" if rebuild else "building"} {name} into {builder.data_dir}'
          f'{"" if rebuild else " (first use)"}...')
      mode = tfds.download.GenerateMode
      dl = tfds.download.DownloadConfig(
          manual_dir=data_cfg.manual_dir or None,
          download_mode=mode.REUSE_CACHE_IF_EXISTS if rebuild else mode.REUSE_DATASET_IF_EXISTS)
      builder.download_and_prepare(download_config=dl)
    barrier()
    builder = _builder(data_cfg, config)
  return builder
