"""Two JAX processes on 127.0.0.1 (2 CPU devices each, gloo collectives) running one jitted SSL step on their
halves of a fixed global batch give the single-process loss, gradients, parameters and BN statistics; the
batched-inference loop, fed unequal numbers of batches per process, gathers every video's row once; a
killed or stopped peer ends the survivor within the peer timeout (exit 76, naming the lost process) with
the last completed checkpoint intact; and SIGTERM to one process stops both at the same step (exit 75)."""
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from echojax.core import parallel

HERE = os.path.dirname(os.path.abspath(__file__))
from tests import multiprocess_worker as worker  # noqa: E402

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
TIMEOUT_S = 120


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def worker_env() -> dict[str, str]:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS='cpu', JAX_NUM_CPU_DEVICES=str(DEVICES_PER_PROCESS),
             XLA_FLAGS=f'--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}',
             PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), env.get('PYTHONPATH', '')]))
  for key in ('JAX_COORDINATOR_ADDRESS', 'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID'):
    env.pop(key, None)
  return env


def run_workers(out_dir) -> list[dict[str, np.ndarray]]:
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, os.path.join(HERE, 'multiprocess_worker.py'), '--process-id', str(i),
       '--num-processes', str(NUM_PROCESSES), '--port', str(port), '--out', str(out_dir)],
      env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(NUM_PROCESSES)]
  logs, failed = [], False
  for i, proc in enumerate(procs):
    try:
      stdout, stderr = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
      for other in procs:
        other.kill()
      stdout, stderr = proc.communicate()
      stderr += f'\n[timed out after {TIMEOUT_S} s]'
    failed |= proc.returncode != 0
    logs.append(f'--- process {i} (rc={proc.returncode})\n{stdout}\n{stderr}')
  if failed:
    pytest.fail('multi-process worker failed:\n' + '\n'.join(logs))
  return [dict(np.load(os.path.join(out_dir, f'process_{i}.npz'))) for i in range(NUM_PROCESSES)]


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  """One launch of the two workers serves both tests (each launch costs ~10 s of process start-up)."""
  return run_workers(tmp_path_factory.mktemp('workers'))


def test_two_processes_match_single_process(results):
  reference = worker.ssl_step_outputs(parallel.make_mesh(devices=jax.devices()[:1]), worker.fixed_ssl_batch())
  assert float(reference['finite']) == 1.0 and np.abs(reference['grads']).max() > 1e-3
  for i, result in enumerate(results):
    assert int(result['num_global_devices']) == NUM_PROCESSES * DEVICES_PER_PROCESS
    assert int(result['num_local_devices']) == DEVICES_PER_PROCESS
    for name in ('loss', 'grads', 'params', 'batch_stats', 'step', 'finite'):
      np.testing.assert_allclose(result[name], reference[name], rtol=1e-5, atol=1e-6,
                                 err_msg=f'process {i}: {name}')


def test_two_process_inference_gathers_every_row_once(results):
  reference = worker.inference_outputs(parallel.make_mesh(devices=jax.devices()[:1]),
                                       worker.inference_batches(None))
  assert len(reference['video_id']) == 7 and np.abs(reference['outputs']).max() > 0.1
  order = np.argsort(reference['video_id'])
  for i, result in enumerate(results):
    got = np.argsort(result['inference_video_id'])
    assert sorted(result['inference_video_id'].tolist()) == sorted(reference['video_id']), f'process {i}'
    np.testing.assert_allclose(result['inference_outputs'][got], reference['outputs'][order], rtol=1e-6,
                               err_msg=f'process {i}: outputs')
    np.testing.assert_array_equal(result['inference_label'][got], reference['label'][order])
    np.testing.assert_array_equal(result['inference_study_id'][got], np.asarray(reference['study_id'])[order])


PEER_TIMEOUT_S = 5


def launch_training(out_dir) -> list[subprocess.Popen]:
  port = free_port()
  return [subprocess.Popen(
      [sys.executable, os.path.join(HERE, 'multiprocess_worker.py'), '--process-id', str(i),
       '--num-processes', str(NUM_PROCESSES), '--port', str(port), '--out', str(out_dir), '--train',
       '--peer-timeout-s', str(PEER_TIMEOUT_S)],
      env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(NUM_PROCESSES)]


def wait_for_checkpoint(procs, directory, step: int, timeout_s: float = TIMEOUT_S) -> None:
  from echojax.jobs import checkpointing
  deadline = time.time() + timeout_s
  while time.time() < deadline:
    if any(p.poll() is not None for p in procs):
      logs = [p.communicate() for p in procs if p.poll() is not None]
      pytest.fail(f'a worker exited early: {logs}')
    if checkpointing.completed_steps(directory) and checkpointing.completed_steps(directory)[-1] >= step:
      return
    time.sleep(0.2)
  for p in procs:
    p.kill()
  pytest.fail(f'no checkpoint {step} in {directory} after {timeout_s} s')


# (lost process, fault). A killed process 0 is not here: it hosts JAX's coordination service, and JAX
# itself aborts every other process within a second (exit 134) before any Python code can run.
@pytest.mark.parametrize('lost, fault', [(1, signal.SIGKILL), (1, signal.SIGSTOP), (0, signal.SIGSTOP)],
                         ids=['killed', 'hung', 'hung-coordinator'])
def test_a_lost_peer_ends_the_survivor_naming_it(tmp_path, lost, fault):
  from echojax.jobs import checkpointing, errors
  procs = launch_training(tmp_path)
  directory = str(tmp_path / 'checkpoints')
  survivor = 1 - lost
  try:
    wait_for_checkpoint(procs, directory, 4)
    before = checkpointing.completed_steps(directory)[-1]
    procs[lost].send_signal(fault)
    t0 = time.time()
    _, stderr = procs[survivor].communicate(timeout=PEER_TIMEOUT_S + 30)
    elapsed = time.time() - t0
  finally:
    for p in procs:
      p.kill()
      p.communicate()
  assert procs[survivor].returncode == errors.EXIT_PEER_LOST, stderr[-3000:]
  assert elapsed < PEER_TIMEOUT_S + 15, elapsed
  assert f'process {survivor} of 2: lost process {lost}' in stderr, stderr[-3000:]
  assert 'last completed checkpoint: step' in stderr
  step, state = checkpointing.restore_raw(str(tmp_path))
  assert step >= before and int(np.asarray(state['step'])) == step


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
  from echojax.jobs import checkpointing, errors
  procs = launch_training(tmp_path)
  directory = str(tmp_path / 'checkpoints')
  try:
    wait_for_checkpoint(procs, directory, 2)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=60) for p in procs]
  finally:
    for p in procs:
      p.kill()
  assert [p.returncode for p in procs] == [errors.EXIT_PREEMPTED] * 2, [o[1][-2000:] for o in outs]
  stops = {line for _, err in outs for line in err.splitlines() if line.startswith('echojax: preempted at step')}
  assert len(stops) == 1, stops
  step = int(stops.pop().split('preempted at step ')[1].split(':')[0])
  assert checkpointing.completed_steps(directory)[-1] == step
