"""Config → objects shared by the trainers: the TFDS dataset (built on first use), the SSL and classifier
models, and the encoder a fine-tuning run starts from (random | kinetics | ssl)."""
from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)


def start_run(cfg, workdir: str):
  """Every trainer's first step: jax.distributed (when asked), the mesh over all devices, the per-process
  batch, and the resolved config saved as DIR/config.json. Returns (mesh, local_batch)."""
  from echojax import config_lib, parallel
  parallel.maybe_initialize_distributed(cfg.distributed)
  mesh = parallel.make_mesh()
  parallel.global_batch_check(cfg.train.global_batch_size, mesh)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    config_lib.dump_config(cfg, os.path.join(workdir, 'config.json'))
  return mesh, cfg.train.global_batch_size // jax.process_count()


def jit_train_step(step_fn, mesh):
  """jit with state replicated, batch sharded over 'data', and the old state's buffers donated."""
  from echojax import parallel
  repl, data = parallel.replicated(mesh), parallel.data_sharding(mesh)
  return jax.jit(step_fn, in_shardings=(repl, data, repl), out_shardings=(repl, repl), donate_argnums=(0,))


def prepare_dataset(data_cfg, log=print):
  """Returns the TFDS builder of `data_cfg`, building it first when absent and allowed (process 0 builds,
  the others wait)."""
  import tensorflow_datasets as tfds
  from jax.experimental import multihost_utils
  from echojax.data import pipeline
  name = data_cfg.name
  if name == 'synthetic_echo' and not data_cfg.get('explicit', False):
    log(f'dataset: synthetic_echo/{data_cfg.builder_config} (the embedded synthetic PLAX benchmark; '
        'no patient data). Set --config.data.name/--config.data.manual_dir for your own data.')
  builder = pipeline.get_builder(name, data_cfg.builder_config or None, data_cfg.data_dir or None)
  if not _is_prepared(builder):
    if not data_cfg.auto_build:
      raise FileNotFoundError(f'dataset {builder.name}/{builder.builder_config and builder.builder_config.name} '
                              f'is not built in {builder.data_dir}; build it or set data.auto_build=True')
    if jax.process_index() == 0:
      log(f'building {name} into {builder.data_dir} (first use)...')
      dl = tfds.download.DownloadConfig(manual_dir=data_cfg.manual_dir or None)
      builder.download_and_prepare(download_config=dl)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('dataset built')
    builder = pipeline.get_builder(name, data_cfg.builder_config or None, data_cfg.data_dir or None)
  return builder


def _is_prepared(builder) -> bool:
  return os.path.exists(os.path.join(str(builder.data_dir), 'dataset_info.json'))


def encoder_kwargs(model_cfg) -> dict:
  return dict(width=model_cfg.width, stage_depths=tuple(model_cfg.stage_depths),
              conv_impl=model_cfg.conv_impl, dtype=jnp.dtype(model_cfg.dtype), remat=model_cfg.remat)


def encoder(model_cfg):
  from echojax.models import ResNet3D
  return ResNet3D(**encoder_kwargs(model_cfg))


def ssl_model(cfg):
  from echojax.models import SSLModel
  num_order = math.factorial(cfg.data.clip_len) if cfg.data.frame_order else 0
  return SSLModel(encoder=encoder_kwargs(cfg.model), projection=cfg.model.projection,
                  proj_hidden=cfg.model.proj_hidden, proj_dim=cfg.model.proj_dim,
                  num_order_classes=num_order, bn_mode=cfg.model.bn_mode)


def _normalized_classifier_cls():
  from echojax.models import Classifier

  class NormalizedClassifier(Classifier):
    """Classifier whose input (grayscale in [0, 1]) is replicated to `in_channels` and standardised with
    the init weights' statistics (Kinetics mean/std for torchvision weights), as the seed code does."""
    input_mean: tuple = (0.0,)
    input_std: tuple = (1.0,)
    in_channels: int = 1

    def __call__(self, video, train: bool, return_feature_map: bool = False):
      if video.shape[-1] != self.in_channels:
        video = jnp.repeat(video[..., :1], self.in_channels, axis=-1)
      mean = jnp.asarray(self.input_mean, video.dtype)
      std = jnp.asarray(self.input_std, video.dtype)
      return super().__call__((video - mean) / std, train, return_feature_map)

  return NormalizedClassifier


def classifier(cfg, spec: dict | None = None):
  """The fine-tuning network; `spec` (an encoder artifact's) fixes architecture and input handling."""
  kwargs = encoder_kwargs(cfg.model)
  norm = None
  if spec is not None:
    kwargs.update(width=int(spec['width']), stage_depths=tuple(spec['stage_depths']))
    norm = spec.get('input_normalization')
  common = dict(encoder_kwargs=kwargs, num_outputs=1, dropout_rate=cfg.task.dropout,
                dropout_on=cfg.task.dropout_on)
  if norm or (spec and int(spec.get('in_channels', 1)) != 1):
    norm = norm or {'mean': [0.0], 'std': [1.0]}
    return _normalized_classifier_cls()(**common, input_mean=tuple(norm['mean']),
                                        input_std=tuple(norm['std']),
                                        in_channels=int(spec.get('in_channels', 1)))
  from echojax.models import Classifier
  return Classifier(**common)


def classifier_with_init(cfg, log=print):
  """(model, encoder variables to load or None) for cfg.init ∈ random | kinetics | ssl."""
  from echojax.models import encoder_io
  if cfg.init == 'random':
    return classifier(cfg), None, None
  if cfg.init not in ('kinetics', 'ssl'):
    raise ValueError(f'init must be random | kinetics | ssl, got {cfg.init!r}')
  path = cfg.init_path
  if not path:
    raise ValueError(f'init={cfg.init} needs init_path (an encoder export or SSL workdir)')
  if not os.path.exists(path):
    raise FileNotFoundError(f'init_path not found: {path}')
  if cfg.init == 'ssl' and os.path.isdir(os.path.join(path, 'checkpoints')):
    from echojax import export
    exported = os.path.join(path, 'encoder')
    if not os.path.exists(os.path.join(exported, 'encoder_spec.json')):
      export.export_encoder(path, exported)
    path = exported
  spec, variables = encoder_io.read_encoder(path)
  log(f'init {cfg.init}: encoder from {path} (width {spec["width"]}, {spec.get("in_channels")} input '
      f'channel(s), normalisation {spec.get("input_normalization")})')
  return classifier(cfg, spec), variables, spec


INIT_SPEC_FILE = 'encoder_init_spec.json'


def load_finetuned(workdir: str):
  """(cfg, model, variables) of a fine-tuning run: its best weights, else its latest checkpoint."""
  import json
  import ml_collections
  from echojax import checkpointing
  cfg_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f'checkpoint directory {workdir!r} has no config.json (not a fine-tuning run?)')
  cfg = ml_collections.ConfigDict(json.load(open(cfg_path)))
  spec_path = os.path.join(workdir, INIT_SPEC_FILE)
  spec = json.load(open(spec_path)) if os.path.exists(spec_path) else None
  model = classifier(cfg, spec)
  subdir = 'best' if os.path.isdir(os.path.join(workdir, 'best')) else 'checkpoints'
  _, raw = checkpointing.restore_raw(workdir, subdir=subdir)
  variables = {'params': raw['params'], 'batch_stats': raw['batch_stats']}
  return cfg, model, variables


def apply_encoder_init(state, variables):
  """Replaces the encoder subtree of a fresh train state; architecture mismatches list keys/shapes."""
  if variables is None:
    return state
  new_params = dict(state.params)
  new_stats = dict(state.batch_stats)
  _check_same_tree('params', state.params['encoder'], variables['params'])
  _check_same_tree('batch_stats', state.batch_stats.get('encoder', {}), variables.get('batch_stats', {}))
  new_params['encoder'] = jax.tree.map(jnp.asarray, variables['params'])
  new_stats['encoder'] = jax.tree.map(jnp.asarray, variables.get('batch_stats', {}))
  state = state.replace(params=new_params, batch_stats=new_stats)
  # optimiser moments were built for the fresh params; same shapes, so they stay valid (zeros).
  return state


def _check_same_tree(kind, expected, got):
  flat = lambda t: {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(np.shape(v))
                    for path, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  a, b = flat(expected), flat(got)
  missing = sorted(set(a) - set(b))
  extra = sorted(set(b) - set(a))
  shapes = sorted(f'{k}: model {a[k]} vs checkpoint {b[k]}' for k in set(a) & set(b) if a[k] != b[k])
  if missing or extra or shapes:
    raise ValueError(f'encoder {kind} do not match the config: missing {missing[:10]}, unexpected '
                     f'{extra[:10]}, shape differences {shapes[:10]}')
