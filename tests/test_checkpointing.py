"""Restore survives corruption: each kind of damage to the latest step (truncated file, zeroed file, broken
metadata, emptied step directory) is logged naming the step and the reason, moved aside as
`<step>.corrupt-<time>` and the previous step restored; the same step can then be saved again; with no
readable step the error says so; a readable step of another model is refused, not moved."""
import glob
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from echojax.jobs import checkpointing
from echojax.jobs.checkpointing import CheckpointError, CheckpointMismatch, Checkpointer


def _state(value: float) -> dict:
  return {'params': {'w': jnp.full((64, 32), value), 'b': jnp.full((32,), value)}, 'step': jnp.int32(value)}


def _largest_data_file(step_dir: str) -> str:
  files = [f for f in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
           if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def _truncate(step_dir):
  with open(_largest_data_file(step_dir), 'r+b') as f:
    f.truncate(10)


def _zero(step_dir):
  path = _largest_data_file(step_dir)
  with open(path, 'r+b') as f:
    f.write(b'\0' * os.path.getsize(path))


def _break_metadata(step_dir):
  with open(os.path.join(step_dir, 'state', '_METADATA'), 'w') as f:
    f.write('{"tree_metadata": ')


def _empty(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


@pytest.fixture
def two_steps(tmp_path):
  ckpt = Checkpointer(str(tmp_path), keep=5, save_every=2, async_save=False)
  for step in (2, 4):
    ckpt.save(step, {'state': _state(step)}, meta={'seen': step})
  ckpt.close()
  return str(tmp_path)


@pytest.mark.parametrize('corrupt', [_truncate, _zero, _break_metadata, _empty],
                         ids=['truncated', 'zeroed', 'broken-metadata', 'emptied'])
def test_corrupt_latest_falls_back_and_the_step_is_saved_again(two_steps, corrupt, capsys):
  directory = os.path.join(two_steps, 'checkpoints')
  corrupt(os.path.join(directory, '4'))
  ckpt = Checkpointer(two_steps, keep=5, save_every=2)
  try:
    step, items = ckpt.restore_latest({'state': _state(0)})
    assert step == 2 and items['meta'] == {'seen': 2}
    np.testing.assert_array_equal(items['state']['params']['w'], np.full((64, 32), 2.0))
    lines = [line for line in capsys.readouterr().out.splitlines() if 'unreadable' in line]
    assert len(lines) == 1 and 'checkpoint step 4 ' in lines[0] and 'Error' in lines[0], lines
    moved = [d for d in os.listdir(directory) if d.startswith('4.corrupt-')]
    assert len(moved) == 1 and moved[0] in lines[0]       # kept for inspection, never deleted
    assert ckpt.save(4, {'state': _state(40)}, meta={'seen': 40})
    ckpt.wait()
    step, items = ckpt.restore_latest({'state': _state(0)})
    assert step == 4 and items['meta'] == {'seen': 40}
  finally:
    ckpt.close()


def test_no_readable_step_is_a_clear_error(two_steps):
  directory = os.path.join(two_steps, 'checkpoints')
  _empty(os.path.join(directory, '4'))
  _truncate(os.path.join(directory, '2'))
  ckpt = Checkpointer(two_steps, keep=5)
  try:
    with pytest.raises(CheckpointError, match=r'no readable checkpoint in .*moved aside 4\.corrupt-.*2\.corrupt-'):
      ckpt.restore_latest({'state': _state(0)})
  finally:
    ckpt.close()
  assert checkpointing.completed_steps(directory) == []


def test_a_readable_step_of_another_model_is_refused_not_moved(two_steps):
  ckpt = Checkpointer(two_steps, keep=5)
  other = {'params': {'w': jnp.zeros((64, 16)), 'b': jnp.zeros((16,))}, 'step': jnp.int32(0)}
  try:
    with pytest.raises(CheckpointMismatch, match='do not match'):
      ckpt.restore_latest({'state': other})
  finally:
    ckpt.close()
  assert checkpointing.completed_steps(os.path.join(two_steps, 'checkpoints')) == [2, 4]


def test_restore_raw_skips_an_unreadable_latest_without_moving_it(two_steps, capsys):
  directory = os.path.join(two_steps, 'checkpoints')
  _zero(os.path.join(directory, '4'))
  step, raw = checkpointing.restore_raw(two_steps)
  assert step == 2 and float(np.asarray(raw['params']['b'])[0]) == 2.0
  assert 'checkpoint step 4 ' in capsys.readouterr().out
  assert checkpointing.completed_steps(directory) == [2, 4]


def test_items_missing_from_a_step_are_absent_not_corrupt(tmp_path):
  ckpt = Checkpointer(str(tmp_path), keep=2, async_save=False)
  try:
    ckpt.save(1, {'state': _state(1)})
    step, items = ckpt.restore_latest({'state': _state(0), 'best': {'w': jnp.zeros(3)}})
    assert step == 1 and set(items) == {'state'}
  finally:
    ckpt.close()


def test_restore_raw_skips_broken_metadata(two_steps):
  _break_metadata(os.path.join(two_steps, 'checkpoints', '4'))
  step, raw = checkpointing.restore_raw(two_steps)
  assert step == 2 and raw['params']['w'].shape == (64, 32)
