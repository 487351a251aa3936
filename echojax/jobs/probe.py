"""SSL monitor: a cheap linear probe (scikit-learn logistic regression on frozen, clip-averaged encoder
features) fitted on a labelled split and scored by study-level AUROC on another."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from echojax.jobs.logging_lib import progress


def encode_videos(cfg, builder, encoder, variables, mesh, split: str, max_videos: int) -> dict:
  """Clip-averaged eval-mode features of up to `max_videos` videos of `split` (eval-mode clips)."""
  from echojax.core import inference
  from echojax.data import pipeline
  n_dev = mesh.size
  batch = max(cfg.probe.batch_size // n_dev, 1) * n_dev // jax.process_count()

  @jax.jit
  def features(v, x):  # x (B, N, T, H, W, C) → clip-averaged (B, F)
    b, n = x.shape[:2]
    f = encoder.apply(v, x.reshape((b * n,) + x.shape[2:]), train=False)
    return f.reshape(b, n, -1).mean(axis=1).astype(jnp.float32)

  apply = lambda x: features(variables, x)

  ds = pipeline.make_dataset(builder, split, 'eval', batch_size=batch, cfg=cfg.data, seed=0,
                             label_key=cfg.probe.label_key)
  n_batches = math.ceil(max_videos / (batch * jax.process_count()))
  ds = ds.take(n_batches)
  batches = progress(pipeline.as_numpy(ds), f'probe features ({split})', n_batches)
  return inference.run_inference(apply, batches, mesh, num_local_batches=n_batches)


def linear_probe_auroc(cfg, builder, model, state, mesh) -> dict:
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import roc_auc_score
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  from echojax.models import factory
  enc = factory.encoder(**cfg.model)
  variables = {'params': state.params['encoder'], 'batch_stats': state.batch_stats['encoder']}
  fit = encode_videos(cfg, builder, enc, variables, mesh, cfg.probe.fit_split, cfg.probe.max_videos)
  ev = encode_videos(cfg, builder, enc, variables, mesh, cfg.probe.split, cfg.probe.max_videos)
  y_fit, y_ev = fit['label'], ev['label']
  keep_fit, keep_ev = y_fit >= 0, y_ev >= 0
  if len(set(y_fit[keep_fit].tolist())) < 2 or len(set(y_ev[keep_ev].tolist())) < 2:
    return {'auroc': float('nan')}  # undefined with one class; logged as NaN, never invented
  clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
  clf.fit(fit['outputs'][keep_fit], y_fit[keep_fit])
  p = clf.predict_proba(ev['outputs'][keep_ev])[:, 1]
  studies = np.asarray(ev['study_id'])[keep_ev]
  uniq, inv = np.unique(studies, return_inverse=True)
  study_p = np.bincount(inv, weights=p) / np.bincount(inv)
  study_y = np.bincount(inv, weights=y_ev[keep_ev]) / np.bincount(inv)
  return {'auroc': float(roc_auc_score(study_y > 0.5, study_p))}
