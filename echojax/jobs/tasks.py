"""Fine-tuning task kinds (binary | multiclass | regression), made from the `task` config block's values:
how a record's label becomes the training target (a grade name → class index, a continuous value → 0/1 at
`binarize_at`, a target standardised on the training videos), how many outputs the head has, and the names
reports use. The per-run part (standardisation, validation threshold, recalibration) is
DIR/task_state.json."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Optional, Sequence

import numpy as np

from echojax.data import subsets

KINDS = ('binary', 'multiclass', 'regression')
STATE_FILE = 'task_state.json'
VALIDATION_METRICS = {'binary': ('val_loss', 'val_auroc'), 'multiclass': ('val_loss', 'val_auroc'),
                      'regression': ('val_loss', 'val_mae')}


@dataclasses.dataclass(frozen=True)
class Task:
  kind: str
  label_key: str
  name: str
  class_names: tuple = ()
  binarize_at: Optional[float] = None
  unit: str = ''
  feature_names: tuple = ()      # names of a ClassLabel label feature (index → name), else ()
  target_mean: float = 0.0       # regression targets are trained as (y − mean) / std
  target_std: float = 1.0

  @property
  def num_outputs(self) -> int:
    return len(self.class_names) if self.kind == 'multiclass' else 1

  def label(self, raw):
    """One record label (metadata scalar: number or ClassLabel name) → int class (−1 unknown) or float target
    (NaN unknown)."""
    if self.kind == 'regression':
      value = float(raw)
      return value if math.isfinite(value) else math.nan
    if isinstance(raw, str):
      names = self.class_names if self.kind == 'multiclass' else ()
      return names.index(raw) if raw in names else -1
    value = float(raw)
    if not math.isfinite(value):
      return -1
    if self.binarize_at is not None:
      return int(value >= self.binarize_at)
    if self.feature_names:
      name = self.feature_names[int(value)] if 0 <= value < len(self.feature_names) else ''
      return self.class_names.index(name) if name in self.class_names else -1
    return int(value) if 0 <= value < self.num_outputs + (self.kind == 'binary') else -1

  def labels(self, raw) -> np.ndarray:
    """Labels of a batch (the pipeline's float32 `label`): int classes / float targets, unknown −1 / NaN."""
    raw = np.asarray(raw).reshape(-1)
    out = np.array([self.label(v) for v in raw.tolist()])
    return out.astype(np.float64 if self.kind == 'regression' else np.int64)

  def valid(self, labels) -> np.ndarray:
    labels = np.asarray(labels)
    return np.isfinite(labels) if self.kind == 'regression' else labels >= 0

  def train_targets(self, raw) -> np.ndarray:
    """float32 targets for the step: classes 0..K−1 (−1 = unknown, left out), regression standardised
    (NaN = unknown; the regression step leaves out non-finite targets)."""
    labels = self.labels(raw)
    if self.kind == 'regression':
      return ((labels - self.target_mean) / self.target_std).astype(np.float32)
    return labels.astype(np.float32)

  def outputs_to_values(self, outputs: np.ndarray) -> np.ndarray:
    """Regression head outputs → targets in label units (identity for classification logits)."""
    if self.kind != 'regression':
      return outputs
    return np.asarray(outputs, np.float64) * self.target_std + self.target_mean

  def aggregation_outputs(self) -> str:
    return 'values' if self.kind == 'regression' else 'logits'


def make_task(*, kind: str, label_key: str, name: str = '', class_names: Sequence[str] = (),
              binarize_at: float = -1.0, unit: str = '', builder=None, workdir: Optional[str] = None) -> Task:
  """The Task of a `task` config block's values; `builder` gives ClassLabel names, `workdir` the saved
  standardisation (and the class names of a finished run)."""
  if kind not in KINDS:
    raise ValueError(f'task.kind must be one of {" | ".join(KINDS)}, got {kind!r}')
  feature_names = ()
  if builder is not None:
    features = builder.info.features
    if label_key not in features:
      raise ValueError(f'task.label_key={label_key!r} is not a feature of {builder.name}; scalar '
                       f'features: {sorted(k for k, f in features.items() if tuple(f.shape) == ())}')
    feature_names = tuple(getattr(features[label_key], 'names', ()) or ())
  state = read_state(workdir) if workdir else {}
  class_names = tuple(class_names) or tuple(state.get('class_names', ()))
  feature_names = feature_names or tuple(state.get('feature_names', ()))
  if kind == 'multiclass' and not class_names:
    class_names = tuple(n for n in feature_names if n != 'unknown')
  if kind == 'multiclass' and len(class_names) < 2:
    raise ValueError(f'task.kind=multiclass needs task.class_names (>= 2) or a ClassLabel label_key; '
                     f'{label_key!r} has none')
  if kind == 'binary':
    class_names = class_names or ('negative', 'positive')
    if len(class_names) != 2:
      raise ValueError(f'task.class_names for a binary task are (negative, positive), got {class_names}')
  return Task(kind=kind, label_key=label_key, name=name or label_key, class_names=class_names,
              binarize_at=float(binarize_at) if kind == 'binary' and binarize_at >= 0 else None, unit=unit,
              feature_names=feature_names, target_mean=float(state.get('target_mean', 0.0)),
              target_std=float(state.get('target_std', 1.0)))


def with_standardisation(task: Task, targets: Sequence[float], enabled: bool) -> Task:
  """The regression task standardised on the training targets (mean 0, sd 1), or unchanged."""
  if task.kind != 'regression' or not enabled:
    return task
  targets = np.asarray([t for t in targets if math.isfinite(t)], np.float64)
  if targets.size < 2:
    raise ValueError(f'regression on {task.label_key!r}: {targets.size} training target(s) with a value')
  return dataclasses.replace(task, target_mean=float(targets.mean()), target_std=float(targets.std() or 1.0))


def mapped_metadata(meta: Sequence[dict], task: Task) -> list[dict]:
  """Per-video metadata with `label_key` replaced by the task label (for subsets and class weights)."""
  return [{**m, task.label_key: task.label(m[task.label_key])} for m in meta]


def read_state(workdir: str) -> dict:
  path = os.path.join(workdir, STATE_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f)


def update_state(workdir: str, **values) -> dict:
  """Merges values into DIR/task_state.json (kind, standardisation, threshold, recalibration, ...)."""
  state = read_state(workdir)
  state.update(values)
  with open(os.path.join(workdir, STATE_FILE), 'w') as f:
    json.dump(state, f, indent=1, allow_nan=False)
  return state


def check_early_stopping_metric(task: Task, metric: str) -> None:
  if metric not in VALIDATION_METRICS[task.kind]:
    raise ValueError(f'train.early_stopping_metric={metric!r} does not exist for a {task.kind} task; '
                     f'choose one of {VALIDATION_METRICS[task.kind]}')


def _regression_study_targets(meta: Sequence[dict], key: str) -> dict[str, float]:
  out: dict[str, float] = {}
  for m in meta:
    if math.isfinite(m[key]) and not math.isclose(out.setdefault(m['study_id'], m[key]), m[key]):
      raise ValueError(f'study {m["study_id"]!r} has videos with different {key} targets; study-level '
                       'evaluation needs one target per study')
  return out


def training_subset(task: Task, meta: Sequence[dict], frac: float, subset_seed: int,
                    class_weighted: bool) -> dict:
  """The label fraction of training studies (nested, seeded), its videos' targets, the binary class weight
  and a one-line description; classification needs both classes in the subset."""
  key = task.label_key
  mapped = mapped_metadata(meta, task)
  if task.kind == 'regression':
    by_study = _regression_study_targets(mapped, key)
  else:
    by_study = subsets.study_labels(mapped, key)
  chosen = subsets.nested_study_subset(sorted(by_study), frac, subset_seed)
  if task.kind != 'regression':
    subsets.check_both_classes({s: by_study[s] for s in chosen}, frac)
  chosen_set = set(chosen)
  targets = [m[key] for m in mapped if m['study_id'] in chosen_set and task.valid(m[key])]
  pos_weight = 1.0
  if task.kind == 'binary':
    pos_weight = subsets.pos_weight(mapped, key, chosen_set) if class_weighted else 1.0
    describe = f'{sum(1 for s in chosen if by_study[s] > 0)} positive'
  elif task.kind == 'multiclass':
    counts = np.bincount([by_study[s] for s in chosen], minlength=task.num_outputs)
    describe = ', '.join(f'{n} {c}' for c, n in zip(task.class_names, counts))
  else:
    values = np.asarray([by_study[s] for s in chosen])
    describe = f'{task.label_key} {values.mean():.3g} ± {values.std():.3g}'
  return {'chosen': chosen, 'n_studies': len(by_study), 'targets': targets, 'n_videos': len(targets),
          'pos_weight': pos_weight, 'describe': describe}


def state_of(task: Task) -> dict:
  """What evaluation, prediction and a rebuilt model need to know of the task (kept in task_state.json)."""
  return {'kind': task.kind, 'label_key': task.label_key, 'name': task.name,
          'class_names': list(task.class_names), 'feature_names': list(task.feature_names),
          'num_outputs': task.num_outputs, 'unit': task.unit,
          'binarize_at': task.binarize_at, 'target_mean': task.target_mean, 'target_std': task.target_std}
