"""The JAX side (models, losses, optimisers, steps, parallel helpers, conv) must import and run with only
jax/flax/optax/numpy: TensorFlow, TFDS, CLU, scikit-learn and torch are blocked in a fresh interpreter."""
import subprocess
import sys
import textwrap

JAX_SIDE = ['echojax.models', 'echojax.models.resnet3d', 'echojax.models.heads', 'echojax.models.conv',
            'echojax.models.encoder_io', 'echojax.models.torchvision_import', 'echojax.losses',
            'echojax.optim', 'echojax.steps', 'echojax.parallel']


def test_jax_side_imports_and_runs_without_tensorflow():
  code = textwrap.dedent(f"""
      import sys, importlib.abc
      BLOCKED = ('tensorflow', 'tensorflow_datasets', 'clu', 'sklearn', 'torch', 'cv2', 'pydicom')
      class Block(importlib.abc.MetaPathFinder):
          def find_spec(self, name, path, target=None):
              if name.split('.')[0] in BLOCKED:
                  raise ImportError('blocked in this test: ' + name)
      sys.meta_path.insert(0, Block())
      import importlib
      for m in {JAX_SIDE!r}:
          importlib.import_module(m)
      import jax, jax.numpy as jnp, optax
      from echojax import models, losses, steps
      model = models.SSLModel(encoder=dict(width=2, stage_depths=(1, 1, 1, 1), conv_impl='xla'),
                              num_order_classes=24)
      tx = optax.adam(1e-3)
      views = jnp.ones((2, 2, 4, 16, 16, 1))
      state = steps.create_train_state(model, tx, jax.random.key(0), views)
      step = jax.jit(steps.make_ssl_train_step(model, tx, temperature=0.1))
      batch = dict(views=views, order_label=jnp.zeros((2, 2), jnp.int32))
      state, metrics = step(state, batch, jax.random.key(1))
      assert bool(metrics['finite']), metrics
      print('OK', sorted(m for m in sys.modules if m.split('.')[0] in BLOCKED))
  """)
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'OK []' in out.stdout
