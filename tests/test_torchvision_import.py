"""torchvision r3d_18 ⇄ ResNet3D conversion, state-dict files, the converter script, the encoder artifact,
and numerical parity with a plain-PyTorch r3d_18 (skipped when torch is not installed)."""
import json
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echojax.models import encoder_io
from echojax.models.resnet3d import ResNet3D, encoder_variable_shapes
from echojax.models.torchvision_import import (expected_torch_shapes, flax_to_torchvision,
                                               load_state_dict_file, read_safetensors,
                                               torchvision_to_flax, write_safetensors)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = os.path.join(REPO, '..', 'shared', 'fixtures', 'torchvision_r3d_18_state_dict_shapes.json')


def random_state_dict(shapes, seed=0):
  rng = np.random.default_rng(seed)
  out = {}
  for key, shape in shapes.items():
    if key.endswith('num_batches_tracked'):
      out[key] = np.asarray(7, np.int64)
    elif key.endswith('running_var'):
      out[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
    elif len(shape) == 5:  # He-scaled conv weights keep activations O(1) through 18 layers
      out[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[1:]))).astype(np.float32)
    else:
      out[key] = rng.standard_normal(shape).astype(np.float32)
  return out


def tiny_state_dict(width=4, in_channels=3, seed=0):
  return random_state_dict(expected_torch_shapes(width, in_channels), seed)


def load_script_main():
  import importlib.util
  spec = importlib.util.spec_from_file_location('convert_torchvision',
                                                os.path.join(REPO, 'scripts', 'convert_torchvision.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


def shapes_of(tree):
  return jax.tree.map(lambda leaf: tuple(np.shape(leaf)), tree)


# --- the real torchvision manifest -------------------------------------------------------------------

@pytest.mark.skipif(not os.path.exists(MANIFEST), reason=f'shared fixture absent: {MANIFEST}')
def test_manifest_round_trip_matches_resnet3d_width64():
  with open(MANIFEST) as f:
    manifest = {key: tuple(shape) for key, shape in json.load(f).items()}
  assert 'fc.weight' in manifest and 'stem.1.num_batches_tracked' in manifest
  state_dict = random_state_dict(manifest)

  variables = torchvision_to_flax(state_dict)
  expected = encoder_variable_shapes(ResNet3D(width=64), in_channels=3)
  assert shapes_of(variables) == jax.tree.map(lambda s: tuple(s.shape), dict(expected))
  # Orientation: torch O,I,D,H,W → our D,H,W,I,O.
  np.testing.assert_array_equal(variables['params']['stem_conv']['kernel'],
                                state_dict['stem.0.weight'].transpose(2, 3, 4, 1, 0))
  np.testing.assert_array_equal(variables['batch_stats']['layer2_0']['downsample_bn']['var'],
                                state_dict['layer2.0.downsample.1.running_var'])

  back = flax_to_torchvision(variables)
  assert set(back) == {key for key in manifest if not key.startswith('fc.')}
  for key, value in back.items():
    if key.endswith('num_batches_tracked'):
      assert value.shape == () and value.dtype == np.int64
    else:
      assert value.shape == manifest[key], key
      np.testing.assert_array_equal(value, state_dict[key], err_msg=key)


# --- converter errors and options -----------------------------------------------------------------------

def test_missing_unknown_and_misshapen_keys_are_all_listed():
  state_dict = tiny_state_dict()
  del state_dict['layer3.1.conv2.1.running_mean']
  state_dict['layer1.0.conv1.0.weight'] = np.zeros((4, 4, 3, 3, 2), np.float32)
  state_dict['layer1.0.conv1.0.bias'] = np.zeros((4,), np.float32)
  with pytest.raises(ValueError) as error:
    torchvision_to_flax(state_dict)
  message = str(error.value)
  assert "missing key 'layer3.1.conv2.1.running_mean'" in message
  assert "shape mismatch 'layer1.0.conv1.0.weight': got (4, 4, 3, 3, 2), expected (4, 4, 3, 3, 3)" in message
  assert "unknown key 'layer1.0.conv1.0.bias'" in message


def test_not_an_r3d_state_dict_is_rejected():
  with pytest.raises(ValueError, match='no stem.0.weight'):
    torchvision_to_flax({'conv1.weight': np.zeros((4, 3, 7, 7))})


def test_fc_and_counters_are_ignored_and_width_inferred():
  state_dict = tiny_state_dict(width=4)
  state_dict['fc.weight'] = np.zeros((400, 32), np.float32)
  state_dict['fc.bias'] = np.zeros((400,), np.float32)
  variables = torchvision_to_flax(state_dict)
  assert variables['params']['layer4_0']['conv2']['kernel'].shape == (3, 3, 3, 32, 32)
  assert 'fc' not in variables['params']


def test_fold_rgb_to_gray_sums_the_stem_over_input_channels():
  state_dict = tiny_state_dict(width=4)
  folded = torchvision_to_flax(state_dict, fold_rgb_to_gray=True)
  kernel = folded['params']['stem_conv']['kernel']
  assert kernel.shape == (3, 7, 7, 1, 4)
  np.testing.assert_allclose(kernel[..., 0, :], state_dict['stem.0.weight'].sum(1).transpose(1, 2, 3, 0),
                             rtol=1e-6)
  # Only the stem changes.
  np.testing.assert_array_equal(folded['params']['layer1_0']['conv1']['kernel'],
                                torchvision_to_flax(state_dict)['params']['layer1_0']['conv1']['kernel'])


# --- state-dict files -------------------------------------------------------------------------------------

def test_npz_and_safetensors_files_round_trip(tmp_path):
  state_dict = tiny_state_dict(width=4)
  np.savez(tmp_path / 'w.npz', **state_dict)
  write_safetensors(str(tmp_path / 'w.safetensors'), state_dict)
  for name in ('w.npz', 'w.safetensors'):
    loaded = load_state_dict_file(str(tmp_path / name))
    assert set(loaded) == set(state_dict), name
    for key in state_dict:
      np.testing.assert_array_equal(loaded[key], state_dict[key], err_msg=f'{name}:{key}')
      assert loaded[key].dtype == state_dict[key].dtype


def test_safetensors_reader_follows_the_format_spec(tmp_path):
  """A file assembled by hand from the published layout (incl. metadata, BF16, offsets out of order)."""
  a = np.arange(6, dtype=np.float32).reshape(2, 3)
  b = np.asarray([1.5, -2.0], np.float32)
  b_bf16 = (b.view(np.uint32) >> 16).astype('<u2').tobytes()  # exact: both values fit bfloat16
  header = {'__metadata__': {'format': 'pt'},
            'b': {'dtype': 'BF16', 'shape': [2], 'data_offsets': [0, 4]},
            'a': {'dtype': 'F32', 'shape': [2, 3], 'data_offsets': [4, 28]}}
  raw = json.dumps(header).encode()
  (tmp_path / 'x.safetensors').write_bytes(
      struct.pack('<Q', len(raw)) + raw + b_bf16 + a.astype('<f4').tobytes())
  loaded = read_safetensors(str(tmp_path / 'x.safetensors'))
  np.testing.assert_array_equal(loaded['a'], a)
  np.testing.assert_array_equal(loaded['b'].astype(np.float32), b)


def test_unreadable_files_give_clear_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope.npz'):
    load_state_dict_file(str(tmp_path / 'nope.npz'))
  (tmp_path / 'w.h5').write_bytes(b'x')
  with pytest.raises(ValueError, match="unsupported state dict format '.h5'"):
    load_state_dict_file(str(tmp_path / 'w.h5'))
  (tmp_path / 'bad.safetensors').write_bytes(struct.pack('<Q', 1000) + b'{}')
  with pytest.raises(ValueError, match='header length 1000 exceeds'):
    load_state_dict_file(str(tmp_path / 'bad.safetensors'))


def test_pth_file(tmp_path):
  torch = pytest.importorskip('torch')
  state_dict = tiny_state_dict(width=4)
  torch.save({'state_dict': {k: torch.from_numpy(v) for k, v in state_dict.items()}}, tmp_path / 'w.pth')
  loaded = load_state_dict_file(str(tmp_path / 'w.pth'))
  np.testing.assert_array_equal(loaded['stem.0.weight'], state_dict['stem.0.weight'])
  assert set(loaded) == set(state_dict)


# --- converter script and the portable artifact ----------------------------------------------------------

def test_convert_script_writes_a_loadable_artifact(tmp_path):
  main = load_script_main()
  state_dict = {'module.' + k: v for k, v in tiny_state_dict(width=4).items()}
  np.savez(tmp_path / 'w.npz', **state_dict)
  assert main(['--input', str(tmp_path / 'w.npz'), '--output', str(tmp_path / 'rgb'),
               '--strip-prefix', 'module.']) == 0
  spec, variables = encoder_io.read_encoder(str(tmp_path / 'rgb'))
  assert (spec['width'], spec['in_channels'], spec['feature_dim']) == (4, 3, 32)
  assert spec['source'] == 'torchvision'
  assert spec['stage_depths'] == [2, 2, 2, 2]
  assert spec['input_normalization'] == encoder_io.KINETICS_NORMALIZATION
  np.testing.assert_array_equal(variables['batch_stats']['stem_bn']['var'],
                                state_dict['module.stem.1.running_var'])

  main(['--input', str(tmp_path / 'w.npz'), '--output', str(tmp_path / 'gray'), '--strip-prefix', 'module.',
        '--fold-rgb-to-gray'])
  spec, variables = encoder_io.read_encoder(str(tmp_path / 'gray'))
  assert spec['in_channels'] == 1 and len(spec['input_normalization']['mean']) == 1
  assert variables['params']['stem_conv']['kernel'].shape[3] == 1
  with pytest.raises(ValueError, match="keys without prefix 'encoder.'"):
    main(['--input', str(tmp_path / 'w.npz'), '--output', str(tmp_path / 'x'), '--strip-prefix', 'encoder.'])


def test_encoder_artifact_round_trip_equals_direct_apply(tmp_path):
  model = ResNet3D(width=4, conv_impl='xla')
  video = jax.random.uniform(jax.random.key(1), (2, 4, 16, 16, 1))
  variables = torchvision_to_flax(tiny_state_dict(width=4, in_channels=1, seed=3))
  norm = {'mean': [0.4], 'std': [0.25]}
  spec = encoder_io.make_encoder_spec(width=4, in_channels=1, source='ssl', input_normalization=norm)
  encoder_io.save_encoder(str(tmp_path / 'enc'), spec, variables)
  assert json.load(open(tmp_path / 'enc' / 'encoder_spec.json'))['feature_dim'] == 32

  from echojax.models import load_encoder
  encode = load_encoder(str(tmp_path / 'enc'), conv_impl='xla')
  got = np.asarray(encode(video))
  want = np.asarray(model.apply(variables, (video - 0.4) / 0.25, train=False))
  assert got.shape == (2, 32)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_three_channel_artifact_replicates_gray_and_normalises_per_channel(tmp_path):
  variables = torchvision_to_flax(tiny_state_dict(width=4, in_channels=3, seed=4))
  spec = encoder_io.make_encoder_spec(width=4, in_channels=3, source='torchvision',
                                      input_normalization=encoder_io.KINETICS_NORMALIZATION)
  encoder_io.save_encoder(str(tmp_path / 'enc'), spec, variables)
  gray = jax.random.uniform(jax.random.key(2), (1, 4, 16, 16, 1))
  rgb = (jnp.repeat(gray, 3, -1) - jnp.asarray(encoder_io.KINETICS_NORMALIZATION['mean'])) / jnp.asarray(
      encoder_io.KINETICS_NORMALIZATION['std'])
  want = ResNet3D(width=4, conv_impl='xla').apply(variables, rgb, train=False)
  encode = encoder_io.load_encoder(str(tmp_path / 'enc'), conv_impl='xla')
  np.testing.assert_allclose(encode(gray), want, rtol=1e-5, atol=1e-6)


def test_artifact_errors_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match='not found: .*absent'):
    encoder_io.read_encoder(str(tmp_path / 'absent'))
  variables = torchvision_to_flax(tiny_state_dict(width=4))
  spec = encoder_io.make_encoder_spec(width=4, in_channels=3, source='torchvision')
  encoder_io.save_encoder(str(tmp_path / 'enc'), spec, variables)
  os.remove(tmp_path / 'enc' / 'encoder_variables.msgpack')
  with pytest.raises(FileNotFoundError,
                     match=r'incomplete encoder artifact .*enc: missing encoder_variables'):
    encoder_io.read_encoder(str(tmp_path / 'enc'))
  with pytest.raises(ValueError, match='variables do not match the spec'):
    encoder_io.save_encoder(str(tmp_path / 'enc8'), encoder_io.make_encoder_spec(width=8, in_channels=3),
                            variables)
  with pytest.raises(ValueError, match='missing keys'):
    encoder_io.save_encoder(str(tmp_path / 'x'), {'width': 4}, variables)


# --- numerical parity with PyTorch ----------------------------------------------------------------------

def relative_error(got, want):
  return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def torch_model(width, in_channels=3, seed=0):
  torch = pytest.importorskip('torch')
  from echojax.models import torch_reference
  torch.manual_seed(seed)
  model = torch_reference.make_torch_r3d18(width=width, in_channels=in_channels)
  torch_reference.randomize_batchnorm(model, seed)
  return model


@pytest.mark.parametrize('conv_impl', ['xla', pytest.param('gemm', marks=pytest.mark.slow)])
def test_parity_tiny_width_eval(conv_impl):
  from echojax.models import torch_reference
  model = torch_model(width=8)
  video = np.random.default_rng(0).standard_normal((2, 4, 32, 32, 3)).astype(np.float32)
  want = torch_reference.torch_features(model, video)
  variables = torchvision_to_flax(torch_reference.state_dict_numpy(model))
  got = ResNet3D(width=8, conv_impl=conv_impl).apply(variables, video, train=False)
  assert relative_error(got, want) <= 1e-4


def test_parity_tiny_width_train_mode_updates_running_stats_like_torch():
  from echojax.models import torch_reference
  model = torch_model(width=8, seed=1)
  variables = torchvision_to_flax(torch_reference.state_dict_numpy(model))
  video = np.random.default_rng(1).standard_normal((2, 4, 32, 32, 3)).astype(np.float32)
  want = torch_reference.torch_features(model, video, train=True)
  got, updates = ResNet3D(width=8, conv_impl='xla').apply(variables, video, train=True,
                                                          mutable=['batch_stats'])
  assert relative_error(got, want) <= 1e-4
  after = torchvision_to_flax(torch_reference.state_dict_numpy(model))['batch_stats']
  for (path, ours), theirs in zip(jax.tree_util.tree_leaves_with_path(updates['batch_stats']),
                                  jax.tree_util.tree_leaves(after)):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  # The update really happened (not just the initial stats on both sides).
  assert not np.allclose(after['layer4_1']['bn2']['var'], variables['batch_stats']['layer4_1']['bn2']['var'])


def test_parity_full_width64_eval():
  from echojax.models import torch_reference
  model = torch_model(width=64, seed=2)
  assert sum(p.numel() for n, p in model.named_parameters() if not n.startswith('fc.')) == 33_166_272
  video = np.random.default_rng(2).standard_normal((1, 4, 112, 112, 3)).astype(np.float32)
  want = torch_reference.torch_features(model, video)
  variables = torchvision_to_flax(torch_reference.state_dict_numpy(model))
  got = ResNet3D(width=64, conv_impl='xla').apply(variables, video, train=False)
  assert got.shape == (1, 512)
  assert relative_error(got, want) <= 1e-4


def test_folded_gray_stem_equals_torch_on_gray_replicated_to_rgb():
  from echojax.models import torch_reference
  model = torch_model(width=8, seed=3)
  gray = np.random.default_rng(3).uniform(size=(2, 4, 32, 32, 1)).astype(np.float32)
  want = torch_reference.torch_features(model, np.repeat(gray, 3, axis=-1))
  variables = torchvision_to_flax(torch_reference.state_dict_numpy(model), fold_rgb_to_gray=True)
  got = ResNet3D(width=8, conv_impl='xla').apply(variables, gray, train=False)
  assert relative_error(got, want) <= 1e-4


def test_our_weights_load_into_torch_strictly():
  torch = pytest.importorskip('torch')
  from echojax.models import torch_reference
  variables = torchvision_to_flax(tiny_state_dict(width=4, seed=5))
  model = torch_reference.make_torch_r3d18(width=4, num_classes=10)
  state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in flax_to_torchvision(variables).items()}
  state.update({k: v for k, v in model.state_dict().items() if k.startswith('fc.')})
  model.load_state_dict(state, strict=True)
