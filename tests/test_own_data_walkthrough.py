"""The README's "Your own DICOM export" walk-through, command for command, on a generated PACS export with
a registry CSV (fake identities everywhere): convert + join the registry → fine-tune with
`--config.data.name=echo_studies --config.data.manual_dir=DIR` and nothing else about the data → predict on
the export; a corrected registry label then stops the next run until `--config.data.rebuild=True`. Every
output and log is searched for the identities. Runs from a directory outside the checkout."""
import os
import subprocess
import sys

import pytest

from tests import registry_fixtures as R

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config.model.width=4', '--config.model.stage_depths=1,1,1,1', '--config.data.image_size=32',
        '--config.data.finetune_clip_len=8', '--config.data.eval_clip_len=8', '--config.data.eval_num_clips=2',
        '--config.train.global_batch_size=8', '--config.train.num_epochs=1', '--config.model.conv_impl=xla',
        '--config.eval.bootstrap_resamples=50']


def _run(args, cwd, env):
  out = subprocess.run([sys.executable, '-m', *args], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=900)
  return out.returncode, out.stdout + out.stderr


@pytest.mark.slow
def test_readme_walkthrough_on_a_generated_export(tmp_path):
  export, out, private, data = tmp_path / 'EXPORT', tmp_path / 'my_echo', tmp_path / 'private', tmp_path / 'tfds'
  private.mkdir()
  R.write_export(export)
  registry = R.write_registry(tmp_path / 'registry.csv', R.registry_rows())
  (private / 'salt.txt').write_text(R.SALT + '\n')
  env = dict(os.environ, PYTHONPATH=ROOT, TFDS_DATA_DIR=str(data), JAX_PLATFORMS='cpu',
             JAX_NUM_CPU_DEVICES='1', XLA_FLAGS='')
  work = tmp_path / 'elsewhere'
  work.mkdir()
  logs = []

  # 1. convert + join the registry (splits made: patient-grouped, stratified, seeded)
  code, log = _run(['echojax.data.convert_dicom', '--input', str(export), '--output', str(out),
                    '--salt-file', str(private / 'salt.txt'), '--labels', registry, '--study-col', 'Accession',
                    '--patient-col', 'MRN', '--label-col', 'AS_Grade', '--split-fractions', '0.4,0.3,0.3',
                    '--key-map', str(private / 'keys.csv')],
                   work, env)
  logs.append(log)
  assert code == 0, log
  assert (out / 'labels.csv').exists()

  # 2. fine-tune on it: only the data name and manual dir say which data
  run = tmp_path / 'run'
  code, log = _run(['echojax.main', '--config=configs/finetune.py:demo', f'--workdir={run}',
                    '--config.data.name=echo_studies', f'--config.data.manual_dir={out}', *TINY], work, env)
  logs.append(log)
  assert code == 0, log[-4000:]
  assert (run / 'eval' / 'test').is_dir()

  # 3. predict on the raw export (converted and de-identified on the way, same salt → same ids)
  preds = tmp_path / 'preds'
  env_salt = dict(env, ECHOJAX_DICOM_SALT=R.SALT)
  code, log = _run(['echojax.predict', '--checkpoint', str(run), '--input', str(export), '--out', str(preds)],
                   work, env_salt)
  logs.append(log)
  assert code == 0, log[-4000:]
  import csv
  labels = {r['study_id'] for r in csv.DictReader(open(out / 'labels.csv'))}
  predicted = {r['study_id'] for r in csv.DictReader(open(preds / 'study_predictions.csv'))}
  assert predicted and predicted <= labels | predicted and len(predicted & labels) == len(labels)

  # 4. a corrected registry label makes the built dataset stale: the run stops and names the fix
  rows = R.registry_rows()
  rows[2]['AS_Grade'] = 'Severe'
  registry = R.write_registry(tmp_path / 'registry.csv', rows)
  code, log = _run(['echojax.data.convert_dicom', '--input', str(export), '--output', str(out),
                    '--salt-file', str(private / 'salt.txt'), '--labels', registry, '--study-col', 'Accession',
                    '--patient-col', 'MRN', '--label-col', 'AS_Grade', '--split-fractions', '0.4,0.3,0.3'],
                   work, env)
  assert code == 0, log
  code, log = _run(['echojax.main', '--config=configs/finetune.py:demo', f'--workdir={tmp_path / "run2"}',
                    '--config.data.name=echo_studies', f'--config.data.manual_dir={out}', *TINY], work, env)
  logs.append(log)
  assert code != 0 and 'labels.csv changed' in log and '--config.data.rebuild=True' in log, log[-3000:]

  # no identity anywhere: outputs, dataset, run, predictions, logs (the private key map excepted)
  secrets = [v for v in R.raw_identifiers() if len(v) >= 6]
  for folder in (out, data, run, preds):
    for dirpath, _, files in os.walk(folder):
      for name in files:
        blob = open(os.path.join(dirpath, name), 'rb').read()
        for s in secrets:
          assert s.encode() not in blob and s not in name, (os.path.join(dirpath, name), s)
  for log in logs:
    for s in secrets:
      assert s not in log, s
