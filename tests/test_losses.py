"""echojax.losses against float64 NumPy references (and torch where importable)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echojax.core import losses, parallel


def np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def np_nt_xent(z_a, z_b, temperature):
  """Float64 SimCLR NT-Xent: 2N anchors, positive = pair, self excluded; returns (loss, top-1 accuracy)."""
  z = np.concatenate([z_a, z_b]).astype(np.float64)
  z = z / np.linalg.norm(z, axis=1, keepdims=True)
  n2 = len(z)
  n = n2 // 2
  losses_, correct = [], []
  for i in range(n2):
    positive = (i + n) % n2
    candidates = [j for j in range(n2) if j != i]
    sims = np.array([z[i] @ z[j] / temperature for j in candidates])
    pos_sim = z[i] @ z[positive] / temperature
    losses_.append(-pos_sim + np.log(np.exp(sims - sims.max()).sum()) + sims.max())
    correct.append(candidates[int(np.argmax(sims))] == positive)
  return np.mean(losses_), np.mean(correct)


@pytest.mark.parametrize('n,d,temperature', [(1, 3, 0.5), (4, 8, 0.05), (7, 5, 0.1), (16, 32, 1.0)])
def test_nt_xent_matches_numpy_reference(n, d, temperature):
  rng = np.random.default_rng(n * 100 + d)
  z_a = rng.normal(size=(n, d)).astype(np.float32)
  z_b = (z_a + rng.normal(scale=1.0, size=(n, d))).astype(np.float32)
  loss, metrics = losses.nt_xent_with_metrics(jnp.asarray(z_a), jnp.asarray(z_b), temperature)
  ref_loss, ref_acc = np_nt_xent(z_a, z_b, temperature)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(losses.nt_xent(z_a, z_b, temperature)), ref_loss, rtol=1e-5, atol=1e-6)
  assert float(metrics['contrastive_acc']) == pytest.approx(ref_acc, abs=1e-7)


def test_contrastive_acc_partial_and_matches_reference():
  # Half of the pairs match exactly, half are swapped with another pair's view: accuracy strictly in (0, 1).
  rng = np.random.default_rng(3)
  z_a = rng.normal(size=(8, 16)).astype(np.float32)
  z_b = z_a.copy()
  z_b[4:] = rng.normal(size=(4, 16))
  _, metrics = losses.nt_xent_with_metrics(z_a, z_b, 0.1)
  ref_loss, ref_acc = np_nt_xent(z_a, z_b, 0.1)
  assert 0.0 < ref_acc < 1.0
  assert float(metrics['contrastive_acc']) == pytest.approx(ref_acc, abs=1e-7)


def test_perfect_pairs_give_low_loss_and_full_accuracy():
  z = np.eye(8, 16, dtype=np.float32) * 3.0  # orthogonal embeddings, identical views
  loss, metrics = losses.nt_xent_with_metrics(z, z, 0.05)
  # 14 negatives at cosine 0 vs a positive at cosine 1: loss = log(1 + 14 e^{-20}).
  np.testing.assert_allclose(float(loss), np.log1p(14 * np.exp(-20.0)), rtol=1e-3, atol=1e-7)
  assert float(loss) < 1e-6
  assert float(metrics['contrastive_acc']) == 1.0
  random_loss = losses.nt_xent(np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32), z, 0.05)
  assert float(random_loss) > 1.0


def test_pair_permutation_and_view_swap_invariance():
  rng = np.random.default_rng(5)
  z_a, z_b = rng.normal(size=(2, 10, 6)).astype(np.float32)
  loss = float(losses.nt_xent(z_a, z_b, 0.2))
  order = rng.permutation(10)
  np.testing.assert_allclose(float(losses.nt_xent(z_a[order], z_b[order], 0.2)), loss, rtol=1e-6)
  np.testing.assert_allclose(float(losses.nt_xent(z_b, z_a, 0.2)), loss, rtol=1e-6)
  # Permuting only one side breaks the pairing and changes the loss.
  assert abs(float(losses.nt_xent(z_a[order], z_b, 0.2)) - loss) > 1e-3


def test_nt_xent_scale_invariant_gradient_matches_finite_differences_and_zero_vector_is_finite():
  rng = np.random.default_rng(7)
  z_a, z_b = rng.normal(size=(2, 5, 4))
  np.testing.assert_allclose(float(losses.nt_xent(3.0 * z_a.astype(np.float32), z_b.astype(np.float32), 0.3)),
                             np_nt_xent(z_a, z_b, 0.3)[0], rtol=1e-5)
  grad_fn = jax.jit(jax.grad(losses.nt_xent), static_argnums=2)
  grad = np.asarray(grad_fn(jnp.asarray(z_a, jnp.float32), jnp.asarray(z_b, jnp.float32), 0.3))
  eps = 1e-5
  numeric = np.zeros_like(z_a)
  for idx in np.ndindex(*z_a.shape):
    plus, minus = z_a.copy(), z_a.copy()
    plus[idx] += eps
    minus[idx] -= eps
    numeric[idx] = (np_nt_xent(plus, z_b, 0.3)[0] - np_nt_xent(minus, z_b, 0.3)[0]) / (2 * eps)
  np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)
  zeros = jnp.zeros((3, 4)).at[1:].set(1.0)
  value, grad = jax.jit(jax.value_and_grad(losses.nt_xent), static_argnums=2)(zeros, jnp.ones((3, 4)), 0.1)
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad)))


def test_nt_xent_under_jit_with_sharded_batch_is_the_global_loss():
  mesh = parallel.make_mesh()
  rng = np.random.default_rng(11)
  z_a, z_b = rng.normal(size=(2, 16, 8)).astype(np.float32)
  sharding = parallel.data_sharding(mesh)
  sharded = jax.jit(lambda a, b: losses.nt_xent(a, b, 0.05))(jax.device_put(z_a, sharding),
                                                               jax.device_put(z_b, sharding))
  np.testing.assert_allclose(float(sharded), np_nt_xent(z_a, z_b, 0.05)[0], rtol=1e-5)


def test_nt_xent_rejects_bad_inputs():
  with pytest.raises(ValueError, match='equal shape'):
    losses.nt_xent(jnp.ones((4, 3)), jnp.ones((5, 3)), 0.1)
  with pytest.raises(ValueError, match='temperature'):
    losses.nt_xent(jnp.ones((4, 3)), jnp.ones((4, 3)), 0.0)


def test_frame_order_loss_matches_numpy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(6, 2, 24)).astype(np.float32)
  labels = rng.integers(0, 24, size=(6, 2))
  labels[:3] = logits[:3].argmax(-1)  # at least half right
  loss, acc = losses.frame_order_loss(jnp.asarray(logits), jnp.asarray(labels))
  log_probs = np_log_softmax(logits.astype(np.float64))
  ref = -np.take_along_axis(log_probs, labels[..., None], -1).mean()
  np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
  assert float(acc) == pytest.approx(np.mean(logits.argmax(-1) == labels))
  with pytest.raises(ValueError, match='do not match'):
    losses.frame_order_loss(jnp.asarray(logits), jnp.asarray(labels[:, 0]))


def np_weighted_bce(logits, labels, pos_weight):
  x, y = logits.astype(np.float64), labels.astype(np.float64)
  sig = 1 / (1 + np.exp(-x))
  return -(pos_weight * y * np.log(sig) + (1 - y) * np.log(1 - sig))


def test_weighted_bce_matches_numpy_with_mask_and_is_stable():
  rng = np.random.default_rng(4)
  logits = rng.normal(scale=3, size=12).astype(np.float32)
  labels = rng.integers(0, 2, size=12).astype(np.float32)
  mask = np.array([1] * 9 + [0] * 3, np.float32)
  per_row = np_weighted_bce(logits, labels, 3.5)
  np.testing.assert_allclose(float(losses.weighted_bce(logits, labels, 3.5)), per_row.mean(), rtol=1e-5)
  np.testing.assert_allclose(float(losses.weighted_bce(logits, labels, 3.5, mask=mask)), per_row[:9].mean(),
                             rtol=1e-5)
  assert float(losses.weighted_bce(logits, labels, 3.5, mask=np.zeros(12))) == 0.0
  big = losses.weighted_bce(jnp.array([200.0, -200.0]), jnp.array([0.0, 1.0]), 2.0)
  np.testing.assert_allclose(float(big), (200.0 + 2.0 * 200.0) / 2, rtol=1e-6)
  with pytest.raises(ValueError, match='differ'):
    losses.weighted_bce(logits, labels[:5], 1.0)
  with pytest.raises(ValueError, match='label_smoothing'):
    losses.weighted_bce(logits, labels, 1.0, label_smoothing=1.0)


def test_weighted_bce_and_softmax_ce_match_torch():
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(6)
  logits = rng.normal(scale=2, size=10).astype(np.float32)
  labels = rng.integers(0, 2, size=10).astype(np.float32)
  criterion = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(2.7))
  expected = criterion(torch.from_numpy(logits), torch.from_numpy(labels)).item()
  np.testing.assert_allclose(float(losses.weighted_bce(logits, labels, 2.7)), expected, rtol=1e-5)
  smoothed = labels * 0.8 + 0.1
  expected = criterion(torch.from_numpy(logits), torch.from_numpy(smoothed)).item()
  np.testing.assert_allclose(float(losses.weighted_bce(logits, labels, 2.7, label_smoothing=0.2)), expected,
                             rtol=1e-5)
  multi = rng.normal(size=(10, 4)).astype(np.float32)
  classes = rng.integers(0, 4, size=10)
  for smoothing in (0.0, 0.1):
    expected = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)(
        torch.from_numpy(multi), torch.from_numpy(classes)).item()
    np.testing.assert_allclose(float(losses.softmax_ce(multi, classes, label_smoothing=smoothing)), expected,
                               rtol=1e-5)


def test_softmax_ce_masks_rows():
  rng = np.random.default_rng(8)
  logits = rng.normal(size=(6, 3)).astype(np.float32)
  labels = np.array([0, 1, 2, 1, -1, 0])
  mask = labels >= 0
  ref = -np_log_softmax(logits[mask].astype(np.float64))[np.arange(5), labels[mask]].mean()
  np.testing.assert_allclose(float(losses.softmax_ce(logits, labels, mask=mask)), ref, rtol=1e-5)


def test_ssl_loss_combines_terms_and_reports_metrics():
  rng = np.random.default_rng(9)
  outputs = {'embeddings': jnp.asarray(rng.normal(size=(5, 2, 8)), jnp.float32),
             'order_logits': jnp.asarray(rng.normal(size=(5, 2, 24)), jnp.float32)}
  batch = {'order_label': jnp.asarray(rng.integers(0, 24, size=(5, 2)))}
  total, metrics = losses.ssl_loss(outputs, batch, temperature=0.05, order_weight=0.5)
  contrastive = np_nt_xent(np.asarray(outputs['embeddings'][:, 0]), np.asarray(outputs['embeddings'][:, 1]),
                           0.05)
  order_loss, order_acc = losses.frame_order_loss(outputs['order_logits'], batch['order_label'])
  np.testing.assert_allclose(float(total), contrastive[0] + 0.5 * float(order_loss), rtol=1e-5)
  assert set(metrics) == {'loss', 'nt_xent', 'contrastive_acc', 'order_loss', 'order_acc', 'order_acc_rev'}
  assert float(metrics['loss']) == float(total)
  np.testing.assert_allclose(float(metrics['nt_xent']), contrastive[0], rtol=1e-5)
  assert float(metrics['order_acc']) == float(order_acc)

  simclr_total, simclr_metrics = losses.ssl_loss({'embeddings': outputs['embeddings']}, {}, 0.05, 1.0)
  assert set(simclr_metrics) == {'loss', 'nt_xent', 'contrastive_acc'}
  np.testing.assert_allclose(float(simclr_total), contrastive[0], rtol=1e-5)
  with pytest.raises(KeyError, match='order_label'):
    losses.ssl_loss(outputs, {}, 0.05, 1.0)
  with pytest.raises(ValueError, match=r'\(B, 2, D\)'):
    losses.ssl_loss({'embeddings': outputs['embeddings'][:, :1]}, batch, 0.05, 1.0)
