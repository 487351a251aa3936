"""conv3d's GEMM path equals lax.conv_general_dilated (value, dx, dkernel) for every R3D-18 conv config."""
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from echojax.models import conv as conv_lib
from echojax.models.conv import conv3d, resolve_conv_impl

# (kernel, stride, padding) of every conv R3D-18 uses.
R3D_CONFIGS = {
    'stem': ((3, 7, 7), (1, 2, 2), (1, 3, 3)),
    'conv3x3': ((3, 3, 3), (1, 1, 1), (1, 1, 1)),
    'conv3x3_s2': ((3, 3, 3), (2, 2, 2), (1, 1, 1)),
    'downsample': ((1, 1, 1), (2, 2, 2), (0, 0, 0)),
}
# (B, T, H, W): odd and even spatial sizes, and T = 1 / 2 where temporal taps only see padding.
SHAPES = [(2, 4, 8, 7), (1, 3, 9, 10), (2, 1, 5, 6), (1, 2, 6, 5)]


@pytest.fixture
def x64():
  previous = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', previous)


def _reference(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, [(p, p) for p in padding],
                                  dimension_numbers=('NDHWC', 'DHWIO', 'NDHWC'),
                                  precision=lax.Precision.HIGHEST)


def _value_and_grads(fn, x, kernel, cotangent):
  y, vjp = jax.vjp(fn, x, kernel)
  return (y, *vjp(cotangent))


def _check_against_xla(shape, config, cin=3, cout=4, seed=0):
  kernel_size, strides, padding = R3D_CONFIGS[config]
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((*shape, cin)), jnp.float64)
  kernel = jnp.asarray(rng.standard_normal((*kernel_size, cin, cout)), jnp.float64)
  expected_y = _reference(x, kernel, strides, padding)
  cotangent = jnp.asarray(rng.standard_normal(expected_y.shape), jnp.float64)
  expected = _value_and_grads(lambda a, b: _reference(a, b, strides, padding), x, kernel, cotangent)
  gemm = jax.jit(lambda a, b, g: _value_and_grads(
      lambda a, b: conv3d(a, b, strides, padding, 'gemm'), a, b, g))
  got = gemm(x, kernel, cotangent)
  for name, want, have in zip(('value', 'dx', 'dkernel'), expected, got):
    assert have.dtype == jnp.float64, name
    assert have.shape == want.shape, (name, have.shape, want.shape)
    scale = float(jnp.max(jnp.abs(want))) or 1.0
    np.testing.assert_allclose(np.asarray(have), np.asarray(want), rtol=0, atol=1e-12 * scale,
                               err_msg=f'{config} {shape}: {name}')


@pytest.mark.parametrize('config', sorted(R3D_CONFIGS))
@pytest.mark.parametrize('shape', SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_gemm_matches_xla_float64(x64, shape, config):
  _check_against_xla(shape, config)


@pytest.mark.parametrize('chunk_bytes', [64, 2000])
@pytest.mark.parametrize('config', sorted(R3D_CONFIGS))
def test_chunked_loops_match_xla(x64, monkeypatch, config, chunk_bytes):
  # Tiny chunk budgets force the scan over rows (64 B) and over batch items/frames (2000 B).
  monkeypatch.setattr(conv_lib, '_CHUNK_BYTES', chunk_bytes)
  _check_against_xla((2, 4, 8, 7), config, cin=3, cout=5, seed=1)


def test_dead_temporal_taps_get_exactly_zero_gradient(x64):
  # T = 1 with padding 1: the first and last temporal taps only ever multiply zeros.
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((2, 1, 5, 5, 3)))
  kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 3, 4)))
  dk = jax.grad(lambda k: jnp.sum(conv3d(x, k, (1, 1, 1), (1, 1, 1), 'gemm') ** 2))(kernel)
  assert np.all(np.asarray(dk[0]) == 0) and np.all(np.asarray(dk[2]) == 0)
  assert np.any(np.asarray(dk[1]) != 0)


@pytest.mark.parametrize('config', sorted(R3D_CONFIGS))
def test_bfloat16_input_keeps_dtype_and_matches_float32(config):
  kernel_size, strides, padding = R3D_CONFIGS[config]
  rng = np.random.default_rng(3)
  x16 = jnp.asarray(rng.standard_normal((2, 4, 8, 8, 8)), jnp.bfloat16)
  kernel = jnp.asarray(rng.standard_normal((*kernel_size, 8, 8)) * 0.1, jnp.float32)
  conv = lambda a, k: conv3d(a, k, strides, padding, 'gemm')
  y16 = jax.jit(conv)(x16, kernel)
  # A jitted sum loss makes the cotangent a constant that XLA could fold into the (bf16) GEMMs.
  dx16, dk = jax.jit(jax.grad(lambda a, k: jnp.sum(conv(a, k).astype(jnp.float32)), (0, 1)))(x16, kernel)
  assert y16.dtype == jnp.bfloat16 and dx16.dtype == jnp.bfloat16 and dk.dtype == jnp.float32
  k16 = kernel.astype(jnp.bfloat16).astype(jnp.float32)
  y32 = _reference(x16.astype(jnp.float32), k16, strides, padding)
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), rtol=0.02, atol=0.02)
  dk32 = jax.grad(lambda k: jnp.sum(_reference(x16.astype(jnp.float32), k, strides, padding)))(k16)
  np.testing.assert_allclose(np.asarray(dk), np.asarray(dk32), rtol=0.02, atol=0.02 * float(jnp.max(jnp.abs(dk32))))


def test_resolve_conv_impl():
  assert resolve_conv_impl('auto') == ('gemm' if jax.default_backend() == 'cpu' else 'xla')
  assert resolve_conv_impl('xla') == 'xla' and resolve_conv_impl('gemm') == 'gemm'
  with pytest.raises(ValueError, match="'cudnn'"):
    resolve_conv_impl('cudnn')


def test_bad_shapes_are_rejected():
  x = jnp.zeros((1, 4, 8, 8, 3))
  with pytest.raises(ValueError, match='channels'):
    conv3d(x, jnp.zeros((3, 3, 3, 4, 8)), (1, 1, 1), (1, 1, 1), 'gemm')
  with pytest.raises(ValueError, match='B,T,H,W,C'):
    conv3d(x[0], jnp.zeros((3, 3, 3, 3, 8)), (1, 1, 1), (1, 1, 1), 'gemm')


def test_custom_vjp_under_remat_and_jit(x64):
  # Flax's nn.remat blocks wrap conv3d in jax.checkpoint: the custom VJP must survive rematerialisation.
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((2, 4, 6, 6, 3)))
  kernel = jnp.asarray(rng.standard_normal((3, 3, 3, 3, 3)) * 0.2)
  def grads(impl):
    block = jax.checkpoint(lambda a, k: jnp.tanh(conv3d(a, k, (1, 1, 1), (1, 1, 1), impl)))
    return jax.jit(jax.grad(lambda a, k: jnp.sum(block(block(a, k), k) ** 2), (0, 1)))(x, kernel)
  for want, have in zip(grads('xla'), grads('gemm')):
    np.testing.assert_allclose(np.asarray(have), np.asarray(want), rtol=1e-10, atol=1e-12)


def test_every_r3d18_conv_is_covered():
  # Guard: the configs above are exactly the distinct convs of R3D-18 (stem + 3 block kinds).
  from scripts.bench_train import r3d_convs
  used = {(k, s, p) for _, _, k, s, p, _ in r3d_convs(16, 112)}
  assert used == set(R3D_CONFIGS.values())
