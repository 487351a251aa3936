"""`MODEL_CARD.md` of a fine-tuning run (Mitchell et al. 2019, condensed): model, intended use, data and
splits, training, evaluation per split with CIs, calibration and threshold, and limits — filled from the
run's config, task state and evaluation summaries. Paths are left out (folder names may identify patients)."""
from __future__ import annotations

import os
from typing import Mapping

from echojax.evaluation.html_report import HEADLINE
from echojax.evaluation.plots import ci_text
from echojax.evaluation.reports import _metric_title

_SYNTHETIC = ('synthetic_echo',)


def _split_lines(name: str, summary: Mapping) -> list[str]:
  part = summary['study']
  positives = f", {part['n_pos']} positive" if 'n_pos' in part else ''
  lines = [f"### {name} split ({part['n']} studies{positives}; {summary['video']['n']} videos)", '',
           f"| Metric (study level) | Value [{round(summary['ci_level'] * 100)}% CI] | Note |", '|---|---|---|']
  for metric in HEADLINE[summary.get('task', 'binary')]:
    entry = part['metrics'].get(metric)
    if entry:
      note = '; '.join(x for x in (entry.get('note'),) if x)   # an n/a value already says why
      lines.append(f'| {_metric_title(metric)} | {ci_text(entry)} | {note} |')
  return lines + ['']


def write_model_card(workdir: str, cfg: Mapping, state: Mapping, summaries: Mapping[str, Mapping]) -> str:
  """Writes workdir/MODEL_CARD.md; cfg is the run's config as a dict, state its task_state.json."""
  data, task, model = cfg['data'], cfg['task'], cfg['model']
  kind = state.get('kind', task['kind'])
  dataset = f"{data['name']}" + (f"/{data['builder_config']}" if data['name'] in _SYNTHETIC else '')
  output = {'binary': f"a study-level probability of {task['name']} (mean over the study's videos of each "
                      "video's mean over its eval clips)",
            'multiclass': f"study-level probabilities of each {task['name']} class "
                          f"({', '.join(state.get('class_names', []))})",
            'regression': f"a study-level estimate of {task['name']} {state.get('unit', '')}".rstrip()}[kind]
  calibration = state.get('calibration') or {}
  threshold = (state.get('threshold') or {}).get('study')
  lines = [f"# Model card: {task['name']}", '',
           '## Model', '',
           f"- 3D ResNet (R3D, width {model['width']}, stages {list(model['stage_depths'])}) with a "
           f"{kind} head ({state.get('num_outputs', 1)} output(s)), fine-tuned from a `{cfg.get('init')}` "
           'initialisation.',
           f"- Input: {data['eval_num_clips']} clips of {data['eval_clip_len']} frames per video, "
           f"{data['image_size']}² grayscale; output: {output}.",
           f"- Label: `{task['label_key']}`"
           + (f" ≥ {state['binarize_at']:g} → positive" if state.get('binarize_at') is not None else '') + '.',
           '', '## Intended use', '',
           '- Research on echocardiogram representation learning and label-efficient fine-tuning; screening '
           'studies under a clinician\'s review. **Not a medical device**: it has not been validated '
           'prospectively, and no output should drive care on its own.',
           '- Inputs like the training data: de-identified, sector-masked 2D grayscale cines of the same view '
           'and acquisition range.',
           '', '## Data', '',
           f'- Dataset: `{dataset}`; splits train `{data["train_split"]}`, validation `{data["val_split"]}`, '
           f'test `{data["test_split"]}` (disjoint by study).',
           f"- Labelled training fraction: {cfg.get('frac', 1.0):g} of the training studies "
           f"(seed {cfg.get('subset_seed', 0)})"
           + (f", {state['train_studies']} studies / {state.get('train_videos')} videos with a label"
              if 'train_studies' in state else '') + '.']
  if data['name'] in _SYNTHETIC:
    lines.append('- **Synthetic data**: procedurally generated PLAX cines; performance here says nothing '
                 'about patients.')
  train, optim = cfg.get('train', {}), cfg.get('optim', {})
  loss = {'binary': 'BCE' + (' weighted by n_neg/n_pos' if task.get('class_weighted') else ''),
          'multiclass': 'softmax cross-entropy',
          'regression': 'mean squared error on the standardised target'}[kind]
  if train and optim:
    duration = (f"{train['num_steps']} steps" if train.get('num_steps', -1) > 0
                else f"up to {train.get('num_epochs')} epochs")
    lines += ['', '## Training', '',
              f"- {optim.get('name')} (lr {optim.get('lr')}), global batch {train.get('global_batch_size')} clips of "
              f"{data.get('finetune_clip_len')} frames, {duration}; early stopping on "
              f"`{train.get('early_stopping_metric')}` (patience {train.get('patience')}), best weights kept.",
              f"- Loss: {loss}; dropout {task.get('dropout')} on the {task.get('dropout_on')}.",
              f"- Encoder {'frozen (linear probe)' if task.get('freeze_encoder') else 'fine-tuned end to end'}."]
  lines += ['', '## Evaluation', '',
            'Study-level metrics with study-bootstrap percentile CIs (eval/<split>/summary.json and report.html '
            'hold every metric at study and video level).', '']
  for split, summary in summaries.items():
    lines += _split_lines(split, summary)
  lines += ['## Calibration and decision threshold', '']
  if kind == 'binary':
    lines.append(f"- Recalibration: {calibration.get('method', 'none')}"
                 + (' (fitted on the validation split; the validation report is in-sample for it).'
                    if calibration.get('method', 'none') != 'none' else
                    '. Training used class-weighted BCE, so outputs are **scores, not calibrated '
                    'probabilities**; see the reliability diagram.'))
    lines.append(f'- Decision threshold: {threshold:.4f} (chosen on validation by '
                 f"{state.get('threshold_method')})." if threshold is not None else
                 '- Decision threshold: none chosen (validation had one class); 0.5 is used.')
  else:
    lines.append('- Not applicable to this task kind.')
  lines += ['', '## Limits', '',
            '- CIs marked "rests on < 10 events" are unstable; a small test split cannot rule out large '
            'differences.',
            '- Performance may drop under shift in scanner, view quality, population or label definition; '
            'check on local data before any use.',
            '- Grad-CAM maps (report gallery) show where the network\'s evidence lies at layer4 resolution; '
            'they are not a segmentation and can highlight confounders.', '']
  path = os.path.join(workdir, 'MODEL_CARD.md')
  with open(path, 'w', encoding='utf-8') as f:
    f.write('\n'.join(lines))
  return path
