"""End-to-end trainer contracts on tiny data: SSL pretraining writes metrics/config/checkpoints (step 1
logged, rate clocked after compilation), resumes after an interruption with continuing steps, stops on a
NaN injected at one step — found at the next log step, with no per-step host sync — keeping the last
good checkpoint, exports an encoder that `load_encoder` serves; fine-tuning honours label fractions and
writes reports. Preemption, corruption and workdir guards have their own test modules."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from echojax.tools import export
from echojax.jobs import finetune as finetune_trainer, ssl as ssl_trainer
from echojax.data import subsets
from echojax.jobs import logging_lib, startup
from echojax.jobs.logging_lib import NonFiniteLossError
from tests import trainer_fixtures as tf_


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  return tf_.build_ci_dataset(str(tmp_path_factory.mktemp('tfds')))


@pytest.fixture(scope='module')
def ssl_run(data_dir, tmp_path_factory):
  """4 SSL steps, interrupted after 2 and resumed by rerunning the same config on the same workdir."""
  workdir = str(tmp_path_factory.mktemp('ssl'))
  cfg = tf_.ssl_config(data_dir, steps=4)
  cfg.train.stop_after_steps = 2
  first = ssl_trainer.train(cfg, workdir)
  cfg.train.stop_after_steps = -1
  second = ssl_trainer.train(cfg, workdir)
  return workdir, first, second


def _jsonl(path):
  return [json.loads(line) for line in open(path)]


def test_ssl_run_writes_metrics_config_and_checkpoints(ssl_run):
  workdir, first, second = ssl_run
  assert json.load(open(os.path.join(workdir, 'config.json')))['ssl']['temperature'] == 0.05
  rows = [r for r in _jsonl(os.path.join(workdir, 'metrics.jsonl')) if 'train/loss' in r]
  assert [r['step'] for r in rows] == [1, 2, 3, 4]
  # each invocation's first step is logged with its compile time; the rate starts after it
  assert ['first_step_s' in r for r in rows] == [True, False, True, False]
  assert 'eta_s' in rows[1] and 'eta_s' not in rows[2]
  assert all(np.isfinite(r['train/loss']) and 'train/order_acc' in r for r in rows)
  assert any('probe/auroc' in r for r in _jsonl(os.path.join(workdir, 'metrics.jsonl')))
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  assert steps[-1] == 4 and 2 in steps


def test_interrupted_run_resumes_from_its_checkpoint(ssl_run):
  _, first, second = ssl_run
  assert first['step'] == 2 and second['step'] == 4
  # the resumed run restored step 2's state: its optimiser step counter continued from there
  assert int(second['state'].step) == 4


def test_the_non_finite_guard_never_syncs_the_host():
  guard = logging_lib.NonFiniteGuard()
  with jax.transfer_guard_device_to_host('disallow'):
    for step, finite in [(1, 1.0), (2, 1.0), (3, 0.0), (4, 0.0)]:
      guard.update(jnp.float32(finite), step)
  assert guard.first() == 3


def test_nan_at_one_step_is_found_at_the_next_log_step(data_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path / 'nan')
  cfg = tf_.ssl_config(data_dir, steps=8)
  cfg.train.stop_after_steps = 2
  ssl_trainer.train(cfg, workdir)
  cfg.train.stop_after_steps = -1
  cfg.train.log_every_steps = 4
  cfg.train.checkpoint_every_steps = 100
  jit = startup.jit_train_step
  calls = []

  def jit_with_nan_at_step_5(step_fn, mesh):
    compiled = jit(step_fn, mesh)
    def step(state, batch, rng):
      calls.append(1)
      if len(calls) == 3:   # the resumed run's third step: global step 5
        batch = dict(batch, views=batch['views'] * jnp.nan)
      return compiled(state, batch, rng)
    return step

  monkeypatch.setattr(startup, 'jit_train_step', jit_with_nan_at_step_5)
  # logged at steps 3 (first of this invocation) and 8: steps 6 and 7 ran before the host looked
  with pytest.raises(NonFiniteLossError, match=r'first at step 5 \(seen at step 8\).*last good checkpoint: '
                                               r'step 2 '):
    ssl_trainer.train(cfg, workdir)
  assert len(calls) == 6
  steps = sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints')) if d.isdigit())
  assert max(steps) == 2


def test_export_then_load_encoder_round_trip(ssl_run, tmp_path):
  from echojax.models import factory, load_encoder
  workdir, _, second = ssl_run
  out = export.export_encoder(workdir, str(tmp_path / 'enc'))
  encode = load_encoder(out)
  x = jax.random.uniform(jax.random.key(0), (2, 4, 32, 32, 1))
  cfg = tf_.ssl_config('', steps=4)
  state = second['state']
  expected = factory.encoder(**cfg.model).apply(
      {'params': state.params['encoder'], 'batch_stats': state.batch_stats['encoder']}, x, train=False)
  np.testing.assert_allclose(np.asarray(encode(x)), np.asarray(expected), rtol=1e-5, atol=1e-6)
  assert encode(x).shape == (2, 32)


def test_finetune_from_ssl_writes_reports(ssl_run, data_dir, tmp_path):
  workdir = str(tmp_path / 'ft')
  result = finetune_trainer.train(tf_.finetune_config(data_dir, 'ssl', ssl_run[0]), workdir)
  for split in ('val', 'test'):
    d = os.path.join(workdir, 'eval', split)
    for name in ('predictions.csv', 'summary.json', 'summary.md', 'roc_curve.png', 'pr_curve.png',
                 'confusion_matrix.png'):
      assert os.path.exists(os.path.join(d, name)), name
    summary = json.load(open(os.path.join(d, 'summary.json')))
    auroc = summary['study']['metrics']['auroc']
    assert auroc['value'] is None or auroc['ci95'][0] <= auroc['value'] <= auroc['ci95'][1]
  hist = json.load(open(os.path.join(workdir, 'early_stopping.json')))['history']
  assert len(hist) >= 1 and all(np.isfinite(h['val_loss']) for h in hist)
  assert result['train_studies'] == 16


def test_finetune_fraction_without_positives_fails_naming_counts(data_dir, tmp_path):
  cfg = tf_.finetune_config(data_dir, frac=0.01)
  with pytest.raises(subsets.LabelFractionError, match=r'label fraction 0.01 leaves \d+ positive and \d+'):
    finetune_trainer.train(cfg, str(tmp_path / 'bad'))


def test_finetune_missing_init_path_is_named(data_dir, tmp_path):
  cfg = tf_.finetune_config(data_dir, 'ssl', str(tmp_path / 'nowhere'))
  with pytest.raises(FileNotFoundError, match='nowhere'):
    finetune_trainer.train(cfg, str(tmp_path / 'ft'))


def test_finetune_architecture_mismatch_lists_keys(ssl_run, data_dir, tmp_path):
  from echojax.jobs import model_init
  workdir = ssl_run[0]
  cfg = tf_.finetune_config(data_dir, 'ssl', workdir)
  model, variables, spec = model_init.classifier_with_init(cfg)
  bad = jax.tree.map(lambda a: a, variables)
  bad['params']['stem_conv']['kernel'] = np.zeros((3, 7, 7, 1, 5), np.float32)
  from echojax.core import optim, steps
  state = steps.create_train_state(model_init.classifier_for(cfg), optim.make_optimizer(
      cfg.optim, total_steps=1, global_batch_size=8), jax.random.key(0, impl='rbg'),
      jnp.zeros((1, 8, 32, 32, 1)))
  with pytest.raises(ValueError, match=r'stem_conv/kernel: model \(3, 7, 7, 1, 4\) vs checkpoint'):
    model_init.apply_encoder_init(state, bad)


def test_no_order_control_trains_shuffled_views_without_an_order_head(data_dir, tmp_path):
  """configs/ssl.py:echoclr_no_order = EchoCLR but the order loss: shuffled views, no frame_order head, no
  order metric, and the same curriculum (set by label_efficiency for both, applied by the trainer)."""
  from echojax.jobs.checkpointing import restore_raw
  from scripts import label_efficiency as le
  cfg = tf_.ssl_config(data_dir, variant='echoclr_no_order', steps=2)
  cfg.probe.every_steps = 0
  cfg.ssl.order_only_steps = 1
  assert cfg.data.frame_order and not ssl_trainer.has_order_task(cfg)
  assert ssl_trainer.curriculum(cfg) == dict(order_only_steps=1, contrastive_warmup_steps=0)
  workdir = str(tmp_path / 'ssl')
  ssl_trainer.train(cfg, workdir)
  rows = [r for r in _jsonl(os.path.join(workdir, 'metrics.jsonl')) if 'train/loss' in r]
  assert len(rows) == 2 and all('train/order_acc' not in r and np.isfinite(r['train/nt_xent']) for r in rows)
  assert [r['train/contrastive_encoder_share'] for r in rows] == [0.0, 1.0]
  _, state = restore_raw(workdir)
  assert 'frame_order' not in state['params'] and 'projection' in state['params']
  assert ssl_trainer.has_order_task(tf_.ssl_config(data_dir, variant='echoclr', steps=2))
  args = type('A', (), dict(data_dir=data_dir, manual_dir='', no_probe=True))()
  p = le.PRESETS['cpu']
  for method in ('echoclr', 'echoclr_no_order'):
    assert le.ssl_config(method, p, args).ssl.order_only_steps == p['order_only_steps']
  assert le.ssl_config('mi_simclr', p, args).ssl.order_only_steps == 0


def test_separate_order_input_trains_both_heads_through_the_trainer(data_dir, tmp_path):
  """ssl.order_input='separate' reaches the trainer's step (both heads train); GradCache refuses it."""
  from echojax.jobs.checkpointing import restore_raw
  cfg = tf_.ssl_config(data_dir, variant='echoclr', steps=2)
  cfg.probe.every_steps = 0
  cfg.ssl.order_input = 'separate'
  workdir = str(tmp_path / 'ssl')
  ssl_trainer.train(cfg, workdir)
  rows = [r for r in _jsonl(os.path.join(workdir, 'metrics.jsonl')) if 'train/loss' in r]
  assert len(rows) == 2 and all(np.isfinite(r['train/nt_xent']) and 'train/order_acc' in r for r in rows)
  _, state = restore_raw(workdir)
  assert {'frame_order', 'projection', 'encoder'} <= set(state['params'])
  cfg.train.microbatch_size, cfg.model.bn_group_size = 1, 1
  with pytest.raises(ValueError, match='order_input'):
    ssl_trainer.train(cfg, str(tmp_path / 'gradcache'))


def test_freeze_stem_keeps_the_stem_at_its_init_and_trains_the_rest(data_dir, tmp_path):
  """ssl.freeze_stem (the demo's): the stem conv's kernel is the same after every step, the rest trains;
  without it the stem moves too."""
  from echojax.jobs.checkpointing import restore_raw

  def stem_and_layer1(freeze):
    cfg = tf_.ssl_config(data_dir, variant='echoclr', steps=2)
    cfg.probe.every_steps = 0
    cfg.model.stem_motion_fraction = 0.5
    cfg.ssl.freeze_stem = freeze
    cfg.train.checkpoint_every_steps = 1
    workdir = str(tmp_path / f'ssl-{freeze}')
    ssl_trainer.train(cfg, workdir)
    out = []
    for step in (1, 2):
      params = restore_raw(workdir, step=step)[1]['params']['encoder']
      layer1 = next(k for k in params if k.startswith('layer1'))
      out.append((np.asarray(params['stem_conv']['kernel']), jax.tree_util.tree_leaves(params[layer1])))
    return out

  (stem1, rest1), (stem2, rest2) = stem_and_layer1(True)
  np.testing.assert_array_equal(stem1, stem2)
  assert any(not np.array_equal(a, b) for a, b in zip(rest1, rest2))
  (stem1, _), (stem2, _) = stem_and_layer1(False)
  assert not np.array_equal(stem1, stem2)
