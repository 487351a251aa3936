"""The portable encoder artifact: a directory with `encoder_spec.json` + `encoder_variables.msgpack`.

The spec holds ResNet3D's architecture kwargs, the weights' `source` and the `input_normalization` the encoder
expects; the msgpack holds {'params','batch_stats'}. `load_encoder(path)` is the stable public entry point:
it returns a jitted eval-mode function video → features. Only jax/flax/numpy are needed.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping, Optional

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from echojax.models.resnet3d import ResNet3D, encoder_variable_shapes

SPEC_FILE = 'encoder_spec.json'
VARIABLES_FILE = 'encoder_variables.msgpack'
SOURCES = ('torchvision', 'ssl', 'random', 'finetune')
SPEC_KEYS = ('width', 'stage_depths', 'block', 'arch', 'in_channels', 'feature_dim', 'source',
             'input_normalization')
SPEC_DEFAULTS = {'block': 'basic', 'arch': 'r3d'}
# torchvision's Kinetics-400 video models expect [0,1] RGB normalised with these statistics.
KINETICS_NORMALIZATION = {'mean': [0.43216, 0.394666, 0.37645], 'std': [0.22803, 0.22145, 0.216989]}


def make_encoder_spec(width: int = 64, stage_depths=(2, 2, 2, 2), in_channels: int = 1,
                      source: str = 'ssl', input_normalization: Optional[Mapping[str, Any]] = None,
                      **extra) -> dict:
  """A complete, validated spec dict; `extra` keys (e.g. notes, step) are kept verbatim."""
  spec = dict(width=int(width), stage_depths=[int(d) for d in stage_depths], block='basic', arch='r3d',
              in_channels=int(in_channels), feature_dim=int(width) * 2 ** (len(stage_depths) - 1),
              source=source, input_normalization=input_normalization, **extra)
  return validate_spec(spec)


def validate_spec(spec: Mapping[str, Any], where: str = 'encoder spec') -> dict:
  """The spec with defaults filled in (block 'basic', arch 'r3d'); a clear ValueError if it is unusable."""
  spec = {**SPEC_DEFAULTS, **spec}
  missing = [key for key in SPEC_KEYS if key not in spec]
  if missing:
    raise ValueError(f'{where}: missing keys {missing}')
  if spec['source'] not in SOURCES:
    raise ValueError(f'{where}: source must be one of {SOURCES}, got {spec["source"]!r}')
  norm = spec['input_normalization']
  if norm is not None and not (isinstance(norm, Mapping) and set(norm) == {'mean', 'std'}
                               and len(norm['mean']) == len(norm['std']) > 0):
    raise ValueError(f'{where}: input_normalization must be null or {{mean: [...], std: [...]}} of equal '
                     f'length, got {norm!r}')
  expected_dim = spec['width'] * 2 ** (len(spec['stage_depths']) - 1)
  if spec['feature_dim'] != expected_dim:
    raise ValueError(f'{where}: feature_dim {spec["feature_dim"]} != width·2^(stages-1) = {expected_dim}')
  return spec


def encoder_from_spec(spec: Mapping[str, Any], **overrides) -> ResNet3D:
  """ResNet3D for this spec; `overrides` set runtime-only knobs (conv_impl, dtype, remat, bn_momentum)."""
  return ResNet3D(width=spec['width'], stage_depths=tuple(spec['stage_depths']), block=spec['block'],
                  arch=spec['arch'], **overrides)


def _to_numpy_tree(variables: Mapping[str, Any]) -> dict:
  return jax.tree_util.tree_map(lambda leaf: np.asarray(jax.device_get(leaf)),
                                {'params': variables['params'],
                                 'batch_stats': variables.get('batch_stats', {})})


def _check_variables(spec: Mapping[str, Any], variables: Mapping[str, Any], where: str) -> None:
  """Variables must match the spec's architecture exactly (catches mixed-up or truncated artifacts)."""
  expected = encoder_variable_shapes(encoder_from_spec(spec, conv_impl='xla'), spec['in_channels'])
  want = {jax.tree_util.keystr(p): tuple(v.shape)
          for p, v in jax.tree_util.tree_leaves_with_path(expected)}
  got = {jax.tree_util.keystr(p): tuple(np.shape(v))
         for p, v in jax.tree_util.tree_leaves_with_path(
             {'params': variables.get('params', {}), 'batch_stats': variables.get('batch_stats', {})})}
  problems = [f'missing {k} {s}' for k, s in want.items() if k not in got]
  problems += [f'unexpected {k} {s}' for k, s in got.items() if k not in want]
  problems += [f'{k}: shape {got[k]} != spec {s}' for k, s in want.items() if k in got and got[k] != s]
  if problems:
    raise ValueError(f'{where}: variables do not match the spec:\n  ' + '\n  '.join(problems[:20]) +
                     (f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else ''))


def save_encoder(path: str, spec: Mapping[str, Any], variables: Mapping[str, Any]) -> str:
  """Write the artifact directory (created if needed); variables are the encoder's params/batch_stats."""
  path = os.fspath(path)
  spec = validate_spec(spec, where=path)
  variables = _to_numpy_tree(variables)
  _check_variables(spec, variables, where=path)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, VARIABLES_FILE), 'wb') as f:
    f.write(flax.serialization.to_bytes(variables))
  # The spec is written last so a directory with a spec is a complete artifact.
  with open(os.path.join(path, SPEC_FILE), 'w') as f:
    json.dump(spec, f, indent=2, sort_keys=True)
  return path


def read_encoder(path: str) -> tuple[dict, dict]:
  """(spec, {'params','batch_stats'} as numpy) from an artifact directory; errors name what is missing."""
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'encoder artifact directory not found: {path}')
  missing = [name for name in (SPEC_FILE, VARIABLES_FILE) if not os.path.isfile(os.path.join(path, name))]
  if missing:
    raise FileNotFoundError(f'incomplete encoder artifact {path}: missing {", ".join(missing)}')
  spec_path = os.path.join(path, SPEC_FILE)
  try:
    with open(spec_path) as f:
      spec = json.load(f)
  except json.JSONDecodeError as error:
    raise ValueError(f'{spec_path}: not valid JSON ({error})') from error
  spec = validate_spec(spec, where=spec_path)
  variables_path = os.path.join(path, VARIABLES_FILE)
  with open(variables_path, 'rb') as f:
    try:
      variables = flax.serialization.msgpack_restore(f.read())
    except Exception as error:  # msgpack raises several unrelated types on corrupt input
      raise ValueError(f'{variables_path}: cannot decode msgpack ({error})') from error
  _check_variables(spec, variables, where=variables_path)
  return spec, {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}


def normalize_input(x: jax.Array, spec: Mapping[str, Any]) -> jax.Array:
  """Bring a [0,1]-scaled video to the encoder's input: replicate gray to RGB for a 3-channel encoder (as
  the paper did for Kinetics weights), then apply the spec's per-channel mean/std if any."""
  channels = x.shape[-1]
  if channels == 1 and spec['in_channels'] != 1:
    x = jnp.repeat(x, spec['in_channels'], axis=-1)
  elif channels != spec['in_channels']:
    raise ValueError(f'input has {channels} channels, encoder expects {spec["in_channels"]} '
                     '(or 1 to replicate)')
  norm = spec['input_normalization']
  if norm is not None:
    mean = jnp.asarray(norm['mean'], jnp.float32)
    std = jnp.asarray(norm['std'], jnp.float32)
    if mean.shape[0] not in (1, x.shape[-1]):
      raise ValueError(f'input_normalization has {mean.shape[0]} channels, input has {x.shape[-1]}')
    x = (x - mean) / std
  return x


def load_encoder(path: str, conv_impl: str = 'auto', dtype: Any = jnp.float32
                 ) -> Callable[[jax.Array], jax.Array]:
  """Stable API: artifact dir → jitted eval-mode fn, float (B,T,H,W,C) in [0,1] → (B, feature_dim) f32.

  The function applies the spec's input normalisation (and gray→RGB replication for 3-channel encoders).
  It carries `.spec` and `.variables` attributes for callers that need them.
  """
  spec, variables = read_encoder(path)
  model = encoder_from_spec(spec, conv_impl=conv_impl, dtype=dtype)
  variables = jax.tree_util.tree_map(jnp.asarray, variables)

  # Variables are an argument, not closed-over constants, so 33M weights are not baked into the HLO.
  @jax.jit
  def apply(variables, video):
    x = normalize_input(video.astype(jnp.float32), spec)
    return model.apply(variables, x, train=False)

  def features(video):
    if np.ndim(video) != 5:
      raise ValueError(f'encoder from {path} expects (B,T,H,W,C), got shape {np.shape(video)}')
    return apply(variables, video)

  features.spec = spec
  features.variables = variables
  return features
