"""torchvision r3d_18 state dict ⇄ ResNet3D variables, and state-dict file reading (.npz/.safetensors/.pth).

Needs only numpy/jax (torch only to read .pth). Key mapping: `stem.0` → `stem_conv`, `stem.1` → `stem_bn`,
`layerI.J.conv1.0/.1` → `layerI_J/conv1`/`bn1`, `conv2.0/.1` → `conv2`/`bn2`, `downsample.0/.1` →
`downsample_conv`/`downsample_bn`; BN weight/bias → params scale/bias, running_mean/var → batch_stats
mean/var.
Conv weights O,I,D,H,W → D,H,W,I,O. `fc.*` and `num_batches_tracked` are ignored.
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import Any, Mapping, Optional, Sequence

import numpy as np

_BLOCK_MODULES = {'conv1.0': 'conv1', 'conv1.1': 'bn1', 'conv2.0': 'conv2', 'conv2.1': 'bn2',
                  'downsample.0': 'downsample_conv', 'downsample.1': 'downsample_bn'}
_CONV_MODULES = ('stem_conv', 'conv1', 'conv2', 'downsample_conv')
_BN_LEAVES = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
              'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}
_BLOCK_KEY = re.compile(r'^layer(\d+)\.(\d+)\.(conv1\.[01]|conv2\.[01]|downsample\.[01])\.(\w+)$')
_IGNORED_KEY = re.compile(r'^fc\.(weight|bias)$|\.num_batches_tracked$')
_CONV_TO_FLAX = (2, 3, 4, 1, 0)  # O,I,D,H,W → D,H,W,I,O
_CONV_TO_TORCH = (4, 3, 0, 1, 2)


def _torch_key_to_flax(key: str) -> Optional[tuple[str, tuple[str, ...]]]:
  """'layer2.0.downsample.1.running_var' → ('batch_stats', ('layer2_0', 'downsample_bn', 'var'))."""
  if key.startswith('stem.'):
    parts = key.split('.')
    if len(parts) != 3 or parts[1] not in ('0', '1'):
      return None
    module, leaf = ('stem_conv' if parts[1] == '0' else 'stem_bn'), parts[2]
    path: tuple[str, ...] = (module,)
  else:
    match = _BLOCK_KEY.match(key)
    if not match:
      return None
    stage, index, module, leaf = match.groups()
    module = _BLOCK_MODULES[module]
    path = (f'layer{stage}_{index}', module)
  if module in _CONV_MODULES:
    return ('params', path + ('kernel',)) if leaf == 'weight' else None
  if leaf not in _BN_LEAVES:
    return None
  collection, name = _BN_LEAVES[leaf]
  return collection, path + (name,)


def _flax_to_torch_key(collection: str, path: Sequence[str]) -> str:
  *modules, leaf = path
  inverse_blocks = {v: k for k, v in _BLOCK_MODULES.items()}
  inverse_leaves = {v: k for k, v in _BN_LEAVES.items()}
  if modules[0] in ('stem_conv', 'stem_bn'):
    prefix = 'stem.0' if modules[0] == 'stem_conv' else 'stem.1'
  else:
    stage, index = re.fullmatch(r'layer(\d+)_(\d+)', modules[0]).groups()
    prefix = f'layer{stage}.{index}.{inverse_blocks[modules[1]]}'
  name = 'weight' if leaf == 'kernel' else inverse_leaves[(collection, leaf)]
  return f'{prefix}.{name}'


def _flatten(tree: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(_flatten(value, prefix + (key,)))
    else:
      flat[prefix + (key,)] = value
  return flat


def _set_path(tree: dict, path: Sequence[str], value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def infer_architecture(state_dict: Mapping[str, Any]) -> tuple[int, int, tuple[int, ...]]:
  """(width, in_channels, stage_depths) read off the stem kernel and the layerI.J keys present."""
  if 'stem.0.weight' not in state_dict:
    raise ValueError('state dict has no stem.0.weight; is it a torchvision r3d_18 state dict? '
                     f'first keys: {sorted(state_dict)[:8]}')
  stem_shape = np.shape(state_dict['stem.0.weight'])
  if len(stem_shape) != 5:
    raise ValueError(f'stem.0.weight must be 5-D (O,I,D,H,W), got shape {stem_shape}')
  depths: dict[int, int] = {}
  for key in state_dict:
    match = re.match(r'^layer(\d+)\.(\d+)\.', key)
    if match:
      stage, index = int(match.group(1)), int(match.group(2))
      depths[stage] = max(depths.get(stage, 0), index + 1)
  stages = max(depths, default=0)
  return int(stem_shape[0]), int(stem_shape[1]), tuple(depths.get(s, 0) for s in range(1, stages + 1))


def expected_torch_shapes(width: int = 64, in_channels: int = 3,
                          stage_depths: Sequence[int] = (2, 2, 2, 2)) -> dict[str, tuple[int, ...]]:
  """Torch state-dict key → shape our ResNet3D of this architecture maps to (fc and counters excluded)."""
  from echojax.models.resnet3d import ResNet3D, encoder_variable_shapes
  model = ResNet3D(width=width, stage_depths=tuple(stage_depths), conv_impl='xla')
  shapes = encoder_variable_shapes(model, in_channels)
  expected = {}
  for collection in ('params', 'batch_stats'):
    for path, leaf in _flatten(shapes[collection]).items():
      shape = tuple(leaf.shape)
      if path[-1] == 'kernel':
        shape = tuple(shape[i] for i in _CONV_TO_TORCH)
      expected[_flax_to_torch_key(collection, path)] = shape
  return expected


def torchvision_to_flax(state_dict: Mapping[str, Any], fold_rgb_to_gray: bool = False) -> dict:
  """torchvision r3d_18 state dict (numpy arrays) → {'params', 'batch_stats'} of ResNet3D (float32).

  Width, input channels and stage depths are read from the keys. `fold_rgb_to_gray` sums the stem kernel over
  its input channels: a 1-channel encoder that equals the RGB one on gray frames replicated to RGB (before
  any per-channel normalisation). Unknown or missing keys and shape mismatches raise one ValueError
  listing all of them.
  """
  width, in_channels, depths = infer_architecture(state_dict)
  expected = expected_torch_shapes(width, in_channels, depths)
  problems = []
  for key, value in state_dict.items():
    if _IGNORED_KEY.search(key):
      continue
    if key not in expected:
      problems.append(f'unknown key {key!r} shape {tuple(np.shape(value))}')
    elif tuple(np.shape(value)) != expected[key]:
      problems.append(f'shape mismatch {key!r}: got {tuple(np.shape(value))}, expected {expected[key]}')
  problems += [f'missing key {key!r} shape {shape}' for key, shape in expected.items()
               if key not in state_dict]
  if problems:
    raise ValueError(f'cannot convert r3d state dict (width {width}, in_channels {in_channels}, '
                     f'stage_depths {depths}):\n  ' + '\n  '.join(problems))

  variables: dict = {'params': {}, 'batch_stats': {}}
  for key in expected:
    collection, path = _torch_key_to_flax(key)
    value = np.asarray(state_dict[key], dtype=np.float32)
    if path[-1] == 'kernel':
      value = value.transpose(_CONV_TO_FLAX)
      if fold_rgb_to_gray and path[0] == 'stem_conv':
        value = value.sum(axis=3, keepdims=True)
    _set_path(variables[collection], path, np.ascontiguousarray(value))
  return variables


def flax_to_torchvision(variables: Mapping[str, Any],
                        num_batches_tracked: Optional[int] = 0) -> dict[str, np.ndarray]:
  """Inverse of `torchvision_to_flax`: ResNet3D variables → state dict (no fc) loadable into r3d_18.

  `num_batches_tracked` (int64 scalars, as torch stores them) is added per BN unless None.
  """
  state_dict: dict[str, np.ndarray] = {}
  for collection in ('params', 'batch_stats'):
    for path, value in _flatten(variables[collection]).items():
      key = _flax_to_torch_key(collection, path)
      value = np.asarray(value)
      state_dict[key] = value.transpose(_CONV_TO_TORCH) if path[-1] == 'kernel' else value
      if num_batches_tracked is not None and path[-1] == 'mean':
        counter_key = key.rsplit('.', 1)[0] + '.num_batches_tracked'
        state_dict[counter_key] = np.asarray(num_batches_tracked, dtype=np.int64)
  return state_dict


# safetensors dtype codes → numpy dtypes (BF16 via ml_dtypes, which ships with jax).
def _safetensors_dtypes() -> dict[str, Any]:
  import ml_dtypes
  return {'F64': np.float64, 'F32': np.float32, 'F16': np.float16, 'BF16': ml_dtypes.bfloat16,
          'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8, 'U8': np.uint8,
          'BOOL': np.bool_}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Parse a .safetensors file (8-byte LE header length, JSON header, raw little-endian buffer)."""
  with open(path, 'rb') as f:
    data = f.read()
  if len(data) < 8:
    raise ValueError(f'{path}: too short to be a safetensors file')
  (header_len,) = struct.unpack('<Q', data[:8])
  if 8 + header_len > len(data):
    raise ValueError(f'{path}: header length {header_len} exceeds file size {len(data)}')
  header = json.loads(data[8:8 + header_len])
  buffer = memoryview(data)[8 + header_len:]
  dtypes = _safetensors_dtypes()
  tensors = {}
  for name, info in header.items():
    if name == '__metadata__':
      continue
    if info['dtype'] not in dtypes:
      raise ValueError(f'{path}: tensor {name!r} has unsupported dtype {info["dtype"]}')
    begin, end = info['data_offsets']
    dtype = np.dtype(dtypes[info['dtype']]).newbyteorder('<')
    array = np.frombuffer(buffer[begin:end], dtype=dtype)
    tensors[name] = array.reshape(info['shape']).astype(dtype.newbyteorder('='))
  return tensors


def write_safetensors(path: str, tensors: Mapping[str, np.ndarray]) -> None:
  """Write numpy arrays as .safetensors (used by tests and for handing weights to torch users)."""
  codes = {np.dtype(v): k for k, v in _safetensors_dtypes().items()}
  header, chunks, offset = {}, [], 0
  for name, value in tensors.items():
    value = np.ascontiguousarray(value)
    raw = value.astype(value.dtype.newbyteorder('<')).tobytes()
    header[name] = {'dtype': codes[value.dtype], 'shape': list(value.shape),
                    'data_offsets': [offset, offset + len(raw)]}
    chunks.append(raw)
    offset += len(raw)
  header_bytes = json.dumps(header).encode()
  header_bytes += b' ' * (-len(header_bytes) % 8)
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(header_bytes)) + header_bytes + b''.join(chunks))


def _read_pth(path: str) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError as error:
    raise ImportError(f'reading {path} needs PyTorch (pip install torch), or convert it elsewhere to '
                      '.npz/.safetensors') from error
  obj = torch.load(path, map_location='cpu', weights_only=True)
  for wrapper in ('state_dict', 'model'):
    if isinstance(obj, Mapping) and wrapper in obj and isinstance(obj[wrapper], Mapping):
      obj = obj[wrapper]
  if not isinstance(obj, Mapping):
    raise ValueError(f'{path}: expected a state dict, got {type(obj).__name__}')
  out = {}
  for key, value in obj.items():
    if not isinstance(value, torch.Tensor):
      raise ValueError(f'{path}: entry {key!r} is a {type(value).__name__}, not a tensor')
    value = value.detach().cpu()
    out[key] = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
  return out


def load_state_dict_file(path: str) -> dict[str, np.ndarray]:
  """Read a state dict from .npz, .safetensors or .pth/.pt (the last needs torch) as numpy arrays."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'state dict file not found: {path}')
  extension = os.path.splitext(path)[1].lower()
  if extension == '.npz':
    with np.load(path, allow_pickle=False) as archive:
      return {key: archive[key] for key in archive.files}
  if extension == '.safetensors':
    return read_safetensors(path)
  if extension in ('.pth', '.pt'):
    return _read_pth(path)
  raise ValueError(f'{path}: unsupported state dict format {extension!r} (use .npz, .safetensors or .pth)')
