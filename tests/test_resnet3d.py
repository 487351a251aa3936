"""ResNet3D encoder, torch-exact BatchNorm, heads, SSLModel BN modes and Classifier (shapes via eval_shape for
width 64; real forwards at width 4 on 16×16 frames to stay fast on XLA:CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echojax.models import (BatchNorm, Classifier, ClassifierHead, FrameOrderHead, ProjectionHead, ResNet3D,
                            SSLModel, encoder_param_count)
from echojax.models import resnet3d
from echojax.models.conv import conv3d

TINY = dict(width=4, conv_impl='xla')


def init_vars(model, *args, **kwargs):
  # An 'rbg' key: with jax's default partitionable threefry, XLA:CPU needs ~45 s to compile a ResNet init.
  return jax.jit(lambda key: model.init(key, *args, **kwargs))(jax.random.key(0, impl='rbg'))


def random_vars(model, *args, seed=0, **kwargs):
  """Variables of `model` drawn with numpy from eval_shape's tree: XLA:CPU takes tens of seconds to compile
  a real ResNet init (one threefry per parameter), which the tests here do not need."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, **kwargs))
  def draw(path, leaf):
    name, shape = path[-1].key, leaf.shape
    if name == 'kernel':
      value = rng.standard_normal(shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    elif name in ('scale', 'var'):
      value = rng.uniform(0.5, 1.5, shape)
    else:  # bias, mean
      value = 0.1 * rng.standard_normal(shape)
    return jnp.asarray(value, leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def test_param_count_matches_torchvision_r3d_18():
  assert encoder_param_count(width=64, in_channels=3) == 33_166_272
  # One input channel: the stem loses 2 × (64·3·7·7) weights.
  assert encoder_param_count(width=64, in_channels=1) == 33_166_272 - 2 * 64 * 3 * 7 * 7


@pytest.mark.parametrize('frames,feature_t', [(4, 1), (16, 2)])
def test_width64_output_and_feature_map_shapes(frames, feature_t):
  model = ResNet3D(width=64)
  x = jax.ShapeDtypeStruct((2, frames, 112, 112, 1), jnp.float32)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(x.shape), train=False))
  features, fmap = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False, return_feature_map=True), variables, x)
  assert features.shape == (2, 512) and features.dtype == jnp.float32
  assert fmap.shape == (2, feature_t, 7, 7, 512)
  params = variables['params']
  assert params['stem_conv']['kernel'].shape == (3, 7, 7, 1, 64)
  assert params['layer2_0']['downsample_conv']['kernel'].shape == (1, 1, 1, 64, 128)
  assert 'downsample_conv' not in params['layer1_0'] and 'downsample_conv' not in params['layer2_1']
  assert set(variables['batch_stats']['layer4_1']['bn2']) == {'mean', 'var'}


def test_tiny_real_forward_and_explicit_padding():
  model = ResNet3D(**TINY)
  x = jax.random.normal(jax.random.key(1), (2, 4, 16, 16, 3))
  variables = init_vars(model, x, train=False)
  features = model.apply(variables, x, train=False)
  assert features.shape == (2, 32) and bool(jnp.all(jnp.isfinite(features)))
  # torchvision's init: kaiming_normal_(fan_out, relu) kernels, BN weight 1 / bias 0, stats 0 / 1.
  kernel = variables['params']['layer4_1']['conv1']['kernel']
  assert abs(float(jnp.std(kernel)) / np.sqrt(2.0 / (27 * 32)) - 1) < 0.05
  bn = variables['params']['layer4_1']['bn1']
  assert bool(jnp.all(bn['scale'] == 1)) and bool(jnp.all(bn['bias'] == 0))
  assert bool(jnp.all(variables['batch_stats']['stem_bn']['var'] == 1))
  # The stem is a torch-padded conv: (3,7,7) stride (1,2,2) padding (1,3,3) — odd sizes reveal 'SAME'.
  stem = conv3d(x[:, :, :15, :15], variables['params']['stem_conv']['kernel'], (1, 2, 2), (1, 3, 3), 'xla')
  assert stem.shape == (2, 4, 8, 8, 4)


def test_conv_impl_is_passed_to_every_convolution(monkeypatch):
  seen = []
  def recording_conv3d(x, kernel, strides, padding, impl):
    seen.append(impl)
    return conv3d(x, kernel, strides, padding, 'xla')
  monkeypatch.setattr(resnet3d, 'conv3d', recording_conv3d)
  x = jnp.zeros((1, 4, 16, 16, 1))
  jax.eval_shape(lambda: ResNet3D(width=4, conv_impl='gemm').init(jax.random.key(0), x, train=False))
  assert seen == ['gemm'] * 20  # stem + 16 block convs + 3 downsamples


def test_batchnorm_matches_torch_semantics():
  x = jax.random.normal(jax.random.key(2), (3, 2, 4, 4, 5)) * 3.0 + 1.0
  bn = BatchNorm(momentum=0.1, epsilon=1e-5)
  initial = init_vars(bn, x, train=False)
  variables = {'params': {'scale': jnp.arange(1.0, 6.0), 'bias': jnp.full((5,), 0.5)},
               'batch_stats': {'mean': jnp.full((5,), 0.2), 'var': jnp.full((5,), 2.0)}}
  assert jax.tree.structure(initial) == jax.tree.structure(variables)
  y, updates = bn.apply(variables, x, train=True, mutable=['batch_stats'])
  flat = np.asarray(x).reshape(-1, 5)
  mean, biased, unbiased = flat.mean(0), flat.var(0), flat.var(0, ddof=1)
  np.testing.assert_allclose(y, (x - mean) / np.sqrt(biased + 1e-5) * np.arange(1, 6) + 0.5,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(updates['batch_stats']['mean'], 0.9 * 0.2 + 0.1 * mean, rtol=1e-6)
  np.testing.assert_allclose(updates['batch_stats']['var'], 0.9 * 2.0 + 0.1 * unbiased, rtol=1e-6)
  y_eval = bn.apply(variables, x, train=False)
  np.testing.assert_allclose(y_eval, (x - 0.2) / np.sqrt(2.0 + 1e-5) * np.arange(1, 6) + 0.5,
                             rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_close_features():
  x = jax.random.normal(jax.random.key(3), (2, 4, 16, 16, 1))
  variables = random_vars(ResNet3D(**TINY), x, train=False)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
  f32 = ResNet3D(**TINY).apply(variables, x, train=False)
  bf16 = ResNet3D(**TINY, dtype=jnp.bfloat16).apply(variables, x, train=False)
  assert bf16.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(bf16 - f32)) / jnp.max(jnp.abs(f32))) < 0.05


def test_remat_wraps_every_block_and_keeps_values():
  x = jax.random.normal(jax.random.key(4), (2, 4, 16, 16, 1))
  plain, remat = ResNet3D(**TINY), ResNet3D(**TINY, remat=True)
  variables = random_vars(plain, x, train=False)
  assert jax.tree.structure(variables) == jax.tree.structure(random_vars(remat, x, train=False))
  def loss(model, params):
    out, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x, train=True,
                         mutable=['batch_stats'])
    return jnp.sum(out ** 2)
  jaxpr = jax.make_jaxpr(jax.grad(lambda p: loss(remat, p)))(variables['params'])
  assert sum(eqn.primitive.name.startswith(('remat', 'checkpoint')) for eqn in jaxpr.jaxpr.eqns) == 8
  np.testing.assert_allclose(loss(plain, variables['params']), loss(remat, variables['params']), rtol=1e-6)
  # Gradients agree too (checked on a 2-stage net: XLA:CPU compiles conv backward slowly).
  small = dict(TINY, stage_depths=(1, 1))
  small_vars = random_vars(ResNet3D(**small), x, train=False)
  def small_grad(use_remat):
    model = ResNet3D(**small, remat=use_remat)
    f = lambda p: jnp.sum(model.apply({'params': p, 'batch_stats': small_vars['batch_stats']}, x, train=True,
                                      mutable=['batch_stats'])[0] ** 2)
    return jax.jit(jax.grad(f))(small_vars['params'])
  for a, b in zip(jax.tree.leaves(small_grad(False)), jax.tree.leaves(small_grad(True))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


# --- heads -------------------------------------------------------------------------------------------

def test_projection_heads():
  h = jnp.ones((3, 512))
  paper = ProjectionHead()
  variables = paper.init(jax.random.key(0), h)
  assert jax.tree.map(jnp.shape, variables['params']) == {'dense1': {'kernel': (512, 256)},
                                                          'dense2': {'kernel': (256, 128)}}
  assert paper.apply(variables, h).shape == (3, 128)
  v2 = ProjectionHead(kind='simclr_v2', hidden_dim=512)
  variables = v2.init(jax.random.key(0), h)
  assert set(variables['params']) == {'dense1', 'bn1', 'dense2', 'bn2', 'dense3', 'bn3'}
  assert 'bias' not in variables['params']['bn3']  # last BN is not centred (SimCLR v2)
  out, _ = v2.apply(variables, jax.random.normal(jax.random.key(1), (6, 512)), train=True,
                    mutable=['batch_stats'])
  assert out.shape == (6, 128)
  with pytest.raises(ValueError, match="projection kind"):
    ProjectionHead(kind='mlp').init(jax.random.key(0), h)


def test_frame_order_head_has_t_factorial_outputs():
  head = FrameOrderHead(num_classes=24)
  variables = head.init(jax.random.key(0), jnp.ones((2, 512)))
  assert head.apply(variables, jnp.ones((2, 512))).shape == (2, 24)
  assert variables['params']['dense']['bias'].shape == (24,)


@pytest.mark.parametrize('dropout_on', ['logit', 'features'])
def test_classifier_head_dropout_position(dropout_on):
  """Identity-matrix features isolate one weight row per example: row i is W[i] + b undropped, then either
  the whole logit row is zeroed/rescaled ('logit') or only W[i] is ('features'; the bias is never dropped)."""
  features = jnp.eye(64)
  head = ClassifierHead(num_outputs=3, dropout_rate=0.25, dropout_on=dropout_on)
  variables = head.init(jax.random.key(0), features)
  variables = jax.tree.map(lambda v: v + 0.3, variables)  # non-zero bias makes the two positions distinct
  w, b = variables['params']['dense']['kernel'], variables['params']['dense']['bias']
  np.testing.assert_allclose(head.apply(variables, features, train=False), w + b, rtol=1e-6)
  out = head.apply(variables, features, train=True, rngs={'dropout': jax.random.key(5)})
  if dropout_on == 'logit':
    kept, dropped = (w + b) / 0.75, jnp.zeros_like(w)
  else:
    kept, dropped = w / 0.75 + b, jnp.broadcast_to(b, w.shape)
  is_kept = jnp.isclose(out, kept, rtol=1e-5)
  is_dropped = jnp.isclose(out, dropped, atol=1e-6)
  assert bool(jnp.all(is_kept | is_dropped))
  assert 0.1 < float(jnp.mean(is_dropped)) < 0.45  # rate 0.25
  if dropout_on == 'features':  # a dropped feature removes its whole weight row from every logit
    assert bool(jnp.all(jnp.all(is_dropped, 1) | jnp.all(is_kept, 1)))
  else:  # each logit is dropped on its own
    assert bool(jnp.any(jnp.any(is_dropped, 1) & jnp.any(is_kept, 1)))


def test_classifier_feature_map_path_for_grad_cam():
  model = Classifier(encoder_kwargs=TINY, num_outputs=1)
  video = jax.random.normal(jax.random.key(6), (2, 4, 16, 16, 1))
  variables = random_vars(model, video, train=False)
  assert set(variables['params']) == {'encoder', 'head'}
  logits, fmap = model.apply(variables, video, train=False, return_feature_map=True)
  assert logits.shape == (2, 1) and fmap.shape == (2, 1, 1, 1, 32)
  again = model.apply(variables, fmap, method=Classifier.logits_from_feature_map)
  np.testing.assert_allclose(again, logits, rtol=1e-6)
  grads = jax.grad(lambda m: model.apply(variables, m, method=Classifier.logits_from_feature_map).sum())(fmap)
  assert grads.shape == fmap.shape and float(jnp.abs(grads).sum()) > 0
  out = model.apply(variables, video, train=True, rngs={'dropout': jax.random.key(0)},
                    mutable=['batch_stats'])[0]
  assert out.shape == (2, 1)


# --- SSL model -------------------------------------------------------------------------------------------

def stem_stats(kernel, clips):
  """Batch mean and unbiased variance per channel of the stem conv output over `clips`."""
  y = np.asarray(conv3d(clips, kernel, (1, 2, 2), (1, 3, 3), 'xla')).reshape(-1, kernel.shape[-1])
  return y.mean(0), y.var(0, ddof=1)


def test_ssl_model_bn_modes():
  shift = jnp.asarray([0.0, 2.0]).reshape(1, 2, 1, 1, 1, 1)  # the views differ in distribution
  views = jax.random.normal(jax.random.key(7), (3, 2, 4, 16, 16, 1)) + shift
  models = {mode: SSLModel(encoder=TINY, num_order_classes=24, bn_mode=mode)
            for mode in ('global', 'per_view')}
  variables = random_vars(models['global'], views, train=False)
  assert set(variables['params']) == {'encoder', 'projection', 'frame_order'}
  outputs, stats = {}, {}
  for mode, model in models.items():
    outputs[mode], updates = model.apply(variables, views, train=True, mutable=['batch_stats'])
    stats[mode] = updates['batch_stats']['encoder']['stem_bn']
  assert outputs['global']['embeddings'].shape == (3, 2, 128)
  assert outputs['global']['features'].shape == (3, 2, 32)
  assert outputs['global']['order_logits'].shape == (3, 2, 24)

  kernel = variables['params']['encoder']['stem_conv']['kernel']
  old = variables['batch_stats']['encoder']['stem_bn']
  # global: one update with the statistics of all 2B clips together.
  mean_all, var_all = stem_stats(kernel, views.reshape(6, 4, 16, 16, 1))
  np.testing.assert_allclose(stats['global']['mean'], 0.9 * old['mean'] + 0.1 * mean_all,
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats['global']['var'], 0.9 * old['var'] + 0.1 * var_all, rtol=1e-4)
  # per_view: view 0 then view 1, each with its own statistics.
  (m0, v0), (m1, v1) = stem_stats(kernel, views[:, 0]), stem_stats(kernel, views[:, 1])
  np.testing.assert_allclose(stats['per_view']['mean'], 0.81 * old['mean'] + 0.09 * m0 + 0.1 * m1,
                             rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats['per_view']['var'], 0.81 * old['var'] + 0.09 * v0 + 0.1 * v1, rtol=1e-4)

  # per_view features equal the encoder run on each view alone; global ones differ (shared statistics).
  encoder = ResNet3D(**TINY)
  enc_vars = {'params': variables['params']['encoder'], 'batch_stats': variables['batch_stats']['encoder']}
  alone = encoder.apply(enc_vars, views[:, 1], train=True, mutable=['batch_stats'])[0]
  np.testing.assert_allclose(outputs['per_view']['features'][:, 1], alone, rtol=1e-5, atol=1e-6)
  assert not np.allclose(outputs['global']['features'][:, 1], alone, rtol=1e-3)
  # In eval mode both modes are the same function.
  evals = [m.apply(variables, views, train=False)['embeddings'] for m in models.values()]
  np.testing.assert_allclose(evals[0], evals[1], rtol=1e-5, atol=1e-6)


def test_ssl_model_rejects_bad_inputs():
  model = SSLModel(encoder=TINY)
  with pytest.raises(ValueError, match=r'views \(B,2,T,H,W,C\)'):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 4, 16, 16, 1)), train=False))
  with pytest.raises(ValueError, match='bn_mode'):
    jax.eval_shape(lambda: SSLModel(encoder=TINY, bn_mode='sync').init(
        jax.random.key(0), jnp.zeros((1, 2, 4, 16, 16, 1)), train=False))
  out = jax.eval_shape(lambda: SSLModel(encoder=TINY).init_with_output(
      jax.random.key(0), jnp.zeros((1, 2, 4, 16, 16, 1)), train=False))[0]
  assert 'order_logits' not in out
  # Config lists become tuples: the model stays hashable (usable as a static jit argument).
  assert hash(SSLModel(encoder=dict(TINY, stage_depths=[1, 1]))) is not None
  assert hash(Classifier(encoder_kwargs=dict(TINY, stage_depths=[1, 1]))) is not None


def test_motion_stem_init_makes_temporal_difference_filters_and_keeps_the_rest():
  key, shape = jax.random.key(3), (3, 7, 7, 1, 8)
  base = resnet3d.conv_kernel_init(key, shape)
  kernel = resnet3d.motion_stem_init(0.5)(key, shape)
  np.testing.assert_array_equal(kernel[..., 4:], base[..., 4:])     # the other half: torch's draw, untouched
  for c in range(4):
    k = np.asarray(kernel[..., c])
    profile = np.asarray(resnet3d._MOTION_PROFILES[c % 3])
    # Zero temporal sum (blind to a static scene) and one spatial pattern scaled by the difference profile.
    np.testing.assert_allclose(k.sum(0), 0.0, atol=1e-6)
    spatial = np.asarray(base[..., c]).mean(0)
    scale = np.linalg.norm(np.asarray(base[..., c])) / np.linalg.norm(profile[:, None, None, None] * spatial)
    np.testing.assert_allclose(k, profile[:, None, None, None] * spatial * scale, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.linalg.norm(k), np.linalg.norm(np.asarray(base[..., c])), rtol=1e-5)
  np.testing.assert_array_equal(resnet3d.motion_stem_init(0.0)(key, shape), base)


def test_stem_motion_fraction_reaches_the_stem_only():
  x = jnp.zeros((1, 4, 16, 16, 1))
  plain = init_vars(ResNet3D(**TINY), x, train=False)['params']
  motion = init_vars(ResNet3D(**TINY, stem_motion_fraction=0.5), x, train=False)['params']
  stem = np.asarray(motion['stem_conv']['kernel'])
  np.testing.assert_allclose(stem[..., :2].sum(0), 0.0, atol=1e-6)
  assert not np.allclose(stem[..., :2], plain['stem_conv']['kernel'][..., :2])
  np.testing.assert_array_equal(stem[..., 2:], plain['stem_conv']['kernel'][..., 2:])
  for name in plain:
    if name != 'stem_conv':
      jax.tree_util.tree_map(np.testing.assert_array_equal, plain[name], motion[name])
  with pytest.raises(ValueError, match='stem_motion_fraction'):
    init_vars(ResNet3D(**TINY, stem_motion_fraction=1.5), x, train=False)
