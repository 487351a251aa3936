"""Test setup: 8 simulated CPU devices (set before JAX is imported) and quiet TensorFlow."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault('JAX_NUM_CPU_DEVICES', '8')
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# No test reads or writes the user's ~/tensorflow_datasets: builds without an explicit data_dir go here.
os.environ['TFDS_DATA_DIR'] = tempfile.mkdtemp(prefix='echojax-tests-tfds-')
atexit.register(shutil.rmtree, os.environ['TFDS_DATA_DIR'], ignore_errors=True)   # one per session, not left behind
