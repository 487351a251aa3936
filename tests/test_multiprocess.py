"""Two JAX processes on 127.0.0.1 (2 CPU devices each, gloo collectives) running one jitted SSL step on their
halves of a fixed global batch give the single-process loss, gradients, parameters and BN statistics; and the
batched-inference loop, fed unequal numbers of batches per process, gathers every video's row once."""
import os
import socket
import subprocess
import sys

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
