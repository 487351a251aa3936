"""Every config key is declared once and read somewhere: the keys declared by configs/*.py (all variants)
equal the keys the code reads (found statically, imports inside functions included), so a dead key or a
key read but never declared fails here instead of being silently ignored by a run."""
import ast
import importlib
import inspect
import pathlib

import ml_collections

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_MODULES = ('ssl', 'finetune', 'evaluate', 'demo')
METHODS = {'get', 'to_dict', 'items', 'keys', 'values', 'unlock', 'lock', 'update', 'copy_and_resolve_references'}

# file → {variable name: the config block it holds}; files not listed read nothing from configs.
ROOTS = {
    'echojax/main.py': {'cfg': ''},
    'echojax/jobs/ssl.py': {'cfg': ''},
    'echojax/jobs/finetune.py': {'cfg': ''},
    'echojax/jobs/evaluate.py': {'cfg': '', 'run_cfg': ''},
    'echojax/jobs/demo.py': {'cfg': '', 'data': 'data', 'pre': '', 'ft': ''},
    'echojax/jobs/probe.py': {'cfg': ''},
    'echojax/jobs/startup.py': {'cfg': ''},
    'echojax/jobs/model_init.py': {'cfg': ''},
    'echojax/jobs/config_lib.py': {'cfg': '', 'train_cfg': 'train'},
    'echojax/data/prepare.py': {'data_cfg': 'data'},
    'echojax/data/pipeline.py': {'cfg': 'data'},
    'echojax/data/clip_sampling.py': {'cfg': 'data'},
    'echojax/tools/predict.py': {'cfg': ''},
    'echojax/tools/saliency.py': {'cfg': ''},
}
# readers by key name: function name → (config block, index of the key argument)
GETTERS = {
    'echojax/core/optim.py': {'_get': ('optim', 1), '_choice': ('optim', 1)},
    'echojax/core/parallel.py': {'_cfg_get': ('distributed', 1), 'required': ('distributed', 0)},
    'echojax/data/augment.py': {'_get': ('data.augment', 1)},
}


# accepted spellings that are not config keys of their own
ALIASES = {'distributed.distributed'}   # parallel.maybe_initialize_distributed: `distributed` = `mode`


def _variants(module):
  return getattr(module, 'VARIANTS', (None,))


def declared_keys() -> set[str]:
  keys = set()

  def walk(prefix, node):
    for k, v in node.items():
      path = f'{prefix}.{k}' if prefix else k
      if isinstance(v, ml_collections.ConfigDict):
        walk(path, v)
      else:
        keys.add(path)

  for name in CONFIG_MODULES:
    module = importlib.import_module(f'configs.{name}')
    for variant in _variants(module):
      walk('', module.get_config(variant))
  return keys


def _chain(node):
  """`cfg.a.b`, `cfg.a.get('b')`, `cfg['a']` → (root name, ['a', 'b']) or None."""
  parts = []
  while True:
    if isinstance(node, ast.Attribute):
      parts.append(node.attr)
      node = node.value
    elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and isinstance(node.slice.value, str):
      parts.append(node.slice.value)
      node = node.value
    else:
      break
  if isinstance(node, ast.Name):
    return node.id, parts[::-1]
  return None


def read_keys() -> set[str]:
  reads = set()
  for rel, roots in ROOTS.items():
    tree = ast.parse((ROOT / rel).read_text())
    for node in ast.walk(tree):
      target = node
      extra = []
      if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == 'get'
          and node.args and isinstance(node.args[0], ast.Constant)):
        target, extra = node.func.value, [node.args[0].value]
      elif not isinstance(node, (ast.Attribute, ast.Subscript)):
        continue
      chain = _chain(target)
      if not chain or chain[0] not in roots:
        continue
      parts = chain[1]
      while parts and parts[-1] in METHODS:
        parts = parts[:-1]
      prefix = roots[chain[0]]
      reads.add('.'.join(([prefix] if prefix else []) + parts + extra))
  for rel, getters in GETTERS.items():
    for node in ast.walk(ast.parse((ROOT / rel).read_text())):
      if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in getters:
        block, idx = getters[node.func.id]
        if len(node.args) > idx and isinstance(node.args[idx], ast.Constant):
          reads.add(f'{block}.{node.args[idx].value}')
  # `factory.*(**cfg.model, …)`: the model block is read through these signatures.
  from echojax.models import factory
  for fn in (factory.encoder_kwargs, factory.ssl_model):
    reads.update(f'model.{p.name}' for p in inspect.signature(fn).parameters.values()
                 if p.kind == p.KEYWORD_ONLY)
  # data.prepare hands the builder's RUN_OPTIONS (view filters) over by name
  from echojax.data import pipeline
  reads.update(f'data.{k}' for k in pipeline.run_option_names('echo_studies'))
  reads.discard('model.num_order_classes')   # the trainer passes it (from data.clip_len), not the config
  reads.discard('model.gradient_balance')    # the trainer passes it (from ssl.gradient_balance)
  reads -= ALIASES
  return reads


def _blocks(keys):
  return {k.rsplit('.', 1)[0] for k in keys if '.' in k}


def _covered(key, reads):
  """A key is read if it, or a block above it that is read whole (`.to_dict()`, copied), is read."""
  parts = key.split('.')
  return any('.'.join(parts[:i]) in reads for i in range(1, len(parts) + 1))


def test_every_declared_key_is_read():
  declared, reads = declared_keys(), read_keys()
  whole = {r for r in reads if r in {'pretrain', 'finetune'}}   # demo hands these blocks whole to the jobs
  dead = sorted(k for k in declared if not (k in reads or _covered(k, whole))
                and not k.startswith(('pretrain.', 'finetune.')))
  assert not dead, f'declared in configs/ but never read: {dead}'


def test_every_read_key_is_declared():
  declared, reads = declared_keys(), read_keys()
  blocks = _blocks(declared) | {''}
  undeclared = sorted(r for r in reads if r not in declared and r not in blocks
                      and not any(r.startswith(d + '.') for d in declared))
  assert not undeclared, f'read by the code but not declared in configs/: {undeclared}'


def test_the_checker_sees_a_dead_and_an_undeclared_key(tmp_path):
  # Guard that the checker can fail: a fake read is found, a missing one is not.
  code = "def f(cfg):\n  return cfg.train.bogus_key, cfg.data.get('other_key')\n"
  tree = ast.parse(code)
  chains = {'.'.join(_chain(n)[1]) for n in ast.walk(tree) if isinstance(n, ast.Attribute) and _chain(n)}
  assert 'train.bogus_key' in chains
  assert 'train.bogus_key' not in declared_keys()
