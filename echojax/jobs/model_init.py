"""Where a fine-tuning network's weights come from: its init (random | kinetics | ssl: an encoder artifact
or an SSL workdir, exported on first use), and a finished fine-tuning run (best weights, else latest) for
evaluation, prediction and saliency."""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from echojax.jobs import checkpointing, tasks
from echojax.models import encoder_io, factory

INIT_SPEC_FILE = 'encoder_init_spec.json'
INIT_KINDS = ('random', 'kinetics', 'ssl')


def classifier_for(cfg, spec: dict | None = None, num_outputs: int = 1):
  """The fine-tuning network of config `cfg` (model block + a task head of `num_outputs` logits)."""
  return factory.classifier(**cfg.model, dropout=cfg.task.dropout, dropout_on=cfg.task.dropout_on,
                            num_outputs=num_outputs, spec=spec)


def export_encoder(workdir: str, output: str, step: int | None = None, log=print) -> str:
  """Writes the encoder of an SSL run's checkpoint (params + batch stats + JSON spec) to `output`."""
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
  log(f'exported encoder of {workdir} (step {step}) → {output}')
  return output


def classifier_with_init(cfg, log=print, num_outputs: int = 1):
  """(model, encoder variables to load or None, encoder spec or None) for cfg.init."""
  if cfg.init not in INIT_KINDS:
    raise ValueError(f'init must be one of {" | ".join(INIT_KINDS)}, got {cfg.init!r}')
  if cfg.init == 'random':
    return classifier_for(cfg, num_outputs=num_outputs), None, None
  path = cfg.init_path
  if not path:
    raise ValueError(f'init={cfg.init} needs init_path (an encoder export or SSL workdir)')
  if not os.path.exists(path):
    raise FileNotFoundError(f'init_path not found: {path}')
  if cfg.init == 'ssl' and os.path.isdir(os.path.join(path, 'checkpoints')):
    exported = os.path.join(path, 'encoder')
    if not os.path.exists(os.path.join(exported, 'encoder_spec.json')):
      export_encoder(path, exported, log=log)
    path = exported
  spec, variables = encoder_io.read_encoder(path)
  log(f'init {cfg.init}: encoder from {path} (width {spec["width"]}, {spec.get("in_channels")} input '
      f'channel(s), normalisation {spec.get("input_normalization")})')
  return classifier_for(cfg, spec, num_outputs), variables, spec


def load_finetuned(workdir: str, with_step: bool = False):
  """(cfg, model, variables) of a fine-tuning run: its best weights, else its latest checkpoint; with_step
  adds the step those weights were saved at (and 'best' or 'checkpoints', where they came from)."""
  import ml_collections
  cfg_path = os.path.join(workdir, 'config.json')
  if not os.path.exists(cfg_path):
    raise FileNotFoundError(f'checkpoint directory {workdir!r} has no config.json (not a fine-tuning run?)')
  cfg = ml_collections.ConfigDict(json.load(open(cfg_path)))
  spec_path = os.path.join(workdir, INIT_SPEC_FILE)
  spec = json.load(open(spec_path)) if os.path.exists(spec_path) else None
  model = classifier_for(cfg, spec, int(tasks.read_state(workdir).get('num_outputs', 1)))  # head size
  subdir = 'best' if os.path.isdir(os.path.join(workdir, 'best')) else 'checkpoints'
  step, raw = checkpointing.restore_raw(workdir, subdir=subdir)
  variables = {'params': raw['params'], 'batch_stats': raw['batch_stats']}
  return (cfg, model, variables, (int(step), subdir)) if with_step else (cfg, model, variables)


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
  # optimiser moments were built for the fresh params; same shapes, so they stay valid (zeros).
  return state.replace(params=new_params, batch_stats=new_stats)


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
