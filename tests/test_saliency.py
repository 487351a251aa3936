"""Grad-CAM on layer4: output shapes, files, and that the map follows a local cue — a tiny classifier is
trained here to detect a small bright blob (a stand-in for the valve), and moving the blob moves the map."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from echojax.evaluation import gradcam as saliency
from echojax.core import steps
from echojax.models import Classifier

T, S = 4, 32


def _clip(rng, blob_at=None):
  clip = rng.uniform(0, 0.3, (T, S, S, 1)).astype(np.float32)
  if blob_at is not None:
    y, x = blob_at
    clip[:, y:y + 6, x:x + 6] = 1.0
  return clip


@pytest.fixture(scope='module')
def blob_model():
  rng = np.random.default_rng(0)
  model = Classifier(encoder_kwargs=dict(width=4, stage_depths=(1, 1, 1, 1), conv_impl='xla'),
                     dropout_rate=0.0)
  tx = optax.adam(3e-3)
  state = steps.create_train_state(model, tx, jax.random.key(0, impl='rbg'), jnp.zeros((2, T, S, S, 1)))
  step = jax.jit(steps.make_finetune_train_step(model, tx))
  for i in range(150):
    labels = rng.integers(0, 2, 16)
    videos = np.stack([_clip(rng, tuple(rng.integers(0, S - 6, 2)) if y else None) for y in labels])
    state, metrics = step(state, {'video': videos, 'label': labels.astype(np.float32)}, jax.random.key(i))
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  return model, variables, float(metrics['accuracy'])


def test_grad_cam_shapes_and_range(blob_model):
  model, variables, _ = blob_model
  logit, cam = saliency.grad_cam(model, variables, jnp.asarray(_clip(np.random.default_rng(1), (4, 4))))
  assert cam.shape == (T, S, S) and logit.shape == ()
  assert float(cam.min()) >= 0 and float(cam.max()) == pytest.approx(1.0, abs=1e-5)


def test_map_moves_with_the_local_cue(blob_model):
  model, variables, accuracy = blob_model
  assert accuracy > 0.8, 'the blob detector did not train'
  rng = np.random.default_rng(2)
  peaks = {}
  for where in [(3, 3), (23, 23), (3, 23), (23, 3)]:
    _, cam = saliency.grad_cam(model, variables, jnp.asarray(_clip(rng, where)))
    proj = np.asarray(cam).max(axis=0)
    peaks[where] = np.unravel_index(np.argmax(proj), proj.shape)
    centre = (where[0] + 3, where[1] + 3)
    assert np.hypot(peaks[where][0] - centre[0], peaks[where][1] - centre[1]) < 10, (where, peaks[where])
  assert len(set(peaks.values())) == 4


def test_write_saliency_files(blob_model, tmp_path):
  model, variables, _ = blob_model
  clip = _clip(np.random.default_rng(3), (10, 10))
  _, cam = saliency.grad_cam(model, variables, jnp.asarray(clip))
  paths = saliency.write_saliency(clip, np.asarray(cam), str(tmp_path / 'v'))
  from PIL import Image
  assert Image.open(paths['png']).size == (3 * S, 3 * S)
  gif = Image.open(paths['gif'])
  assert gif.n_frames == T
