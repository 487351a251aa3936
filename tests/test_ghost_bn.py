"""Ghost BatchNorm (`model.bn_group_size`): a group of G rows is normalised exactly as if it were its own
batch, the running statistics move by the mean of the groups' updates, eval mode ignores the groups, and
SSLModel / Classifier count G in pairs / clips; plus the factory's `dtype='auto'` resolution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echojax.models import factory
from echojax.models.batchnorm import BatchNorm
from echojax.models.heads import Classifier, SSLModel

TINY = {'width': 4, 'stage_depths': (1,), 'conv_impl': 'xla'}


def bn_apply(group_size, x, stats=None):
  bn = BatchNorm(momentum=0.3, group_size=group_size)
  variables = bn.init(jax.random.key(0), x, train=False)
  params = {'scale': jnp.linspace(0.5, 1.5, x.shape[-1]), 'bias': jnp.linspace(-1, 1, x.shape[-1])}
  stats = stats or {'mean': jnp.full((x.shape[-1],), 0.2), 'var': jnp.full((x.shape[-1],), 1.5)}
  variables = {'params': params, 'batch_stats': stats}
  y, mutated = bn.apply(variables, x, train=True, mutable=['batch_stats'])
  return y, mutated['batch_stats'], bn.apply(variables, x, train=False)


def test_ghost_bn_group_equals_its_own_batch_and_running_stats_average():
  with jax.enable_x64(True):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(6, 3, 5, 4)) * np.arange(1, 7)[:, None, None, None])
    y, stats, y_eval = bn_apply(2, x)
    parts = [bn_apply(0, x[i:i + 2]) for i in range(0, 6, 2)]
    np.testing.assert_allclose(y, np.concatenate([p[0] for p in parts]), rtol=1e-13)
    for key in ('mean', 'var'):
      np.testing.assert_allclose(stats[key], np.mean([p[1][key] for p in parts], axis=0), rtol=1e-13)
    # Eval mode uses the running statistics only: the group size plays no part.
    np.testing.assert_allclose(y_eval, bn_apply(0, x)[2], rtol=1e-13)
    # One group of the whole batch is plain (global) BatchNorm.
    whole, plain = bn_apply(6, x), bn_apply(0, x)
    np.testing.assert_allclose(whole[0], plain[0], rtol=1e-13)
    np.testing.assert_allclose(whole[1]['var'], plain[1]['var'], rtol=1e-13)
    assert not np.allclose(y, plain[0])  # the groups really differ from global statistics


def test_ghost_bn_rejects_a_batch_that_is_not_whole_groups():
  with pytest.raises(ValueError, match='batch 5 is not a multiple of group_size 2'):
    bn_apply(2, jnp.ones((5, 4)))


def ssl_outputs(model, views, variables):
  outputs, mutated = model.apply(variables, views, train=True, mutable=['batch_stats'])
  return outputs['embeddings'], mutated['batch_stats']


@pytest.mark.parametrize('bn_mode', ['global', 'per_view'])
def test_ssl_model_groups_count_pairs(bn_mode):
  """G pairs per group: the embeddings of 6 pairs with G = 2 are those of three separate 2-pair batches
  (both views of a pair in one group in 'global' mode; one view's G clips in 'per_view' mode)."""
  views = jnp.asarray(np.random.default_rng(1).uniform(size=(6, 2, 4, 16, 16, 1)).astype(np.float32))
  common = dict(encoder=TINY, proj_hidden=8, proj_dim=8, projection='simclr_v2', bn_mode=bn_mode)
  ghost, plain = SSLModel(**common, bn_group_size=2), SSLModel(**common, bn_group_size=0)
  variables = ghost.init(jax.random.key(0), views[:2], train=False)
  z, stats = ssl_outputs(ghost, views, variables)
  parts = [ssl_outputs(plain, views[i:i + 2], variables) for i in range(0, 6, 2)]
  np.testing.assert_allclose(z, np.concatenate([p[0] for p in parts]), rtol=2e-5, atol=2e-6)
  mean_stats = jax.tree_util.tree_map(lambda *s: np.mean(s, axis=0), *[p[1] for p in parts])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), stats, mean_stats)
  assert not np.allclose(z, ssl_outputs(plain, views, variables)[0], atol=1e-4)


def test_classifier_groups_count_clips_and_factory_passes_the_key():
  video = jnp.asarray(np.random.default_rng(2).uniform(size=(4, 4, 16, 16, 1)).astype(np.float32))
  model = factory.classifier(dropout=0.0, dropout_on='logit', bn_group_size=2, width=4, stage_depths=(1,),
                             conv_impl='xla', dtype='float32', remat=False)
  assert model.bn_group_size == 2 and Classifier(encoder_kwargs=TINY).bn_group_size == 0
  plain = Classifier(encoder_kwargs=TINY, dropout_rate=0.0)
  variables = model.init(jax.random.key(0), video[:2], train=False)
  logits, _ = model.apply(variables, video, train=True, mutable=['batch_stats'])
  parts = [plain.apply(variables, video[i:i + 2], train=True, mutable=['batch_stats'])[0] for i in (0, 2)]
  np.testing.assert_allclose(logits, np.concatenate(parts), rtol=2e-5, atol=2e-6)
  ssl = factory.ssl_model(projection='paper', proj_hidden=8, proj_dim=8, bn_mode='global', num_order_classes=0,
                          bn_group_size=3, width=4, stage_depths=(1,), conv_impl='xla', dtype='auto', remat=False)
  assert ssl.bn_group_size == 3


def test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_cpu():
  assert factory.resolve_dtype('auto', 'cpu') == jnp.float32
  assert factory.resolve_dtype('auto', 'gpu') == jnp.bfloat16
  assert factory.resolve_dtype('auto', 'tpu') == jnp.bfloat16
  assert factory.resolve_dtype('float32', 'gpu') == jnp.float32
  assert factory.resolve_dtype('auto') == jnp.float32  # this test machine is CPU-only
  encoder = factory.encoder(width=4, stage_depths=(1,), conv_impl='xla', dtype='auto', remat=False)
  assert encoder.dtype == jnp.float32
