"""The layer table of docs/architecture.md, enforced: every import in echojax (module level and inside
functions) goes down the table, the import graph has no cycle, no sys.path edits, and the pure-JAX layers
import and run with TensorFlow, TFDS, CLU, scikit-learn, torch, OpenCV and pydicom blocked."""
import ast
import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

# layer → the layers it may import (besides itself). Lower layers never import upper ones.
ALLOWED = {
    'models': set(),
    'core': {'models'},
    'data': set(),
    'evaluation': {'core', 'models'},
    'jobs': {'core', 'models', 'data', 'evaluation'},
    'tools': {'core', 'models', 'data', 'evaluation', 'jobs'},
    'top': {'core', 'models', 'data', 'evaluation', 'jobs', 'tools'},   # main.py and documented re-exports
}
PURE_JAX = ('models', 'core')


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT).with_suffix('')
  parts = list(rel.parts)
  if parts[-1] == '__init__':
    parts = parts[:-1]
  return '.'.join(parts)


def _layer(module: str) -> str:
  parts = module.split('.')
  return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in ALLOWED) else 'top'


def _echojax_imports(path: pathlib.Path, module: str) -> set[str]:
  """Every echojax module `path` imports, at any depth of the file (functions included)."""
  tree = ast.parse(path.read_text())
  package = module if path.name == '__init__.py' else module.rsplit('.', 1)[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(a.name for a in node.names if a.name.split('.')[0] == 'echojax')
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        base = '.'.join(package.split('.')[:len(package.split('.')) - node.level + 1] + ([base] if base else []))
      if base.split('.')[0] != 'echojax':
        continue
      for a in node.names:   # `from echojax.x import y` may name a submodule y
        sub = f'{base}.{a.name}'
        found.add(sub if (ROOT / (sub.replace('.', '/') + '.py')).exists()
                  or (ROOT / sub.replace('.', '/')).is_dir() else base)
  return found - {module}


def import_graph() -> dict[str, set[str]]:
  files = sorted((ROOT / 'echojax').rglob('*.py'))
  return {_module_name(p): _echojax_imports(p, _module_name(p)) for p in files}


def test_every_import_goes_down_the_layer_table():
  bad = []
  for module, imports in import_graph().items():
    layer = _layer(module)
    for imp in imports:
      target = _layer(imp)
      if imp == 'echojax' or target == layer:
        continue
      if target not in ALLOWED[layer]:
        bad.append(f'{module} ({layer}) imports {imp} ({target})')
  assert not bad, '\n'.join(bad)


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = 'open'
    stack.append(m)
    for n in sorted(graph.get(m, ())):
      if n not in graph:
        continue
      if state.get(n) == 'open':
        cycles.append(' → '.join(stack[stack.index(n):] + [n]))
      elif n not in state:
        visit(n)
    stack.pop()
    state[m] = 'done'

  for m in sorted(graph):
    if m not in state:
      visit(m)
  return cycles


def test_import_graph_has_no_cycle():
  assert find_cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a → b → c → a']   # the finder can fail
  cycles = find_cycles(import_graph())
  assert not cycles, '\n'.join(cycles)


def test_layer_rule_catches_an_upward_import(tmp_path):
  # The checker itself must be able to fail: a core module importing jobs is flagged.
  fake = ROOT / 'echojax' / 'core' / 'losses.py'
  assert _layer('echojax.core.losses') == 'core'
  assert 'jobs' not in ALLOWED['core']
  code = 'def f():\n  from echojax.jobs import startup\n'
  p = tmp_path / 'x.py'
  p.write_text(code)
  assert _echojax_imports(p, 'echojax.core.x') == {'echojax.jobs.startup'}
  assert fake.exists()


def test_no_sys_path_edits():
  offenders = []
  for folder in ('echojax', 'configs', 'data_builders', 'scripts', 'tests'):
    for p in (ROOT / folder).rglob('*.py'):
      if p.name == os.path.basename(__file__):
        continue
      for node in ast.walk(ast.parse(p.read_text())):
        if (isinstance(node, ast.Attribute) and node.attr in ('insert', 'append', 'extend')
            and isinstance(node.value, ast.Attribute) and node.value.attr == 'path'
            and isinstance(node.value.value, ast.Name) and node.value.value.id == 'sys'):
          offenders.append(f'{p.relative_to(ROOT)}:{node.lineno}')
  assert not offenders, offenders


def test_pure_jax_layers_import_and_run_without_tensorflow():
  modules = sorted(m for m in import_graph() if _layer(m) in PURE_JAX)
  assert 'echojax.core.steps' in modules and 'echojax.models.resnet3d' in modules
  code = textwrap.dedent(f"""
      import sys, importlib.abc
      BLOCKED = ('tensorflow', 'tensorflow_datasets', 'clu', 'sklearn', 'torch', 'cv2', 'pydicom',
                 'ml_collections')
      class Block(importlib.abc.MetaPathFinder):
          def find_spec(self, name, path, target=None):
              if name.split('.')[0] in BLOCKED:
                  raise ImportError('blocked in this test: ' + name)
      sys.meta_path.insert(0, Block())
      import importlib
      for m in {modules!r}:
          importlib.import_module(m)
      import jax, jax.numpy as jnp, optax
      from echojax import models
      from echojax.core import steps
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
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'OK []' in out.stdout
