"""echojax.data.prepare: `data.name` resolves to the project's builder with that builder's own default
config unless `data.builder_config` names one of its configs (the shared default 'small' is
synthetic_echo's), and unknown names list the project's builders."""
import pytest

from echojax.data import pipeline, prepare


def test_builder_config_defaults_per_builder():
  assert prepare.builder_config_for('synthetic_echo', 'small') == 'small'
  assert 'small' in pipeline.builder_config_names('synthetic_echo')
  # the config default 'small' must not reach builders that have no such config
  for name in ('echo_studies', 'echonet_dynamic', 'echonet_lvh'):
    assert prepare.builder_config_for(name, 'small') is None, name
    assert prepare.builder_config_for(name, '') is None, name
  names = pipeline.builder_config_names('echo_studies')
  if names:
    assert prepare.builder_config_for('echo_studies', names[0]) == names[0]
  with pytest.raises(ValueError, match="data.builder_config='nope' is not a config of synthetic_echo; choose one of"):
    prepare.builder_config_for('synthetic_echo', 'nope')


def test_own_data_builder_instantiates_with_its_default_config(tmp_path):
  config = prepare.builder_config_for('echo_studies', 'small')
  builder = pipeline.get_builder('echo_studies', config, str(tmp_path))
  assert builder.name == 'echo_studies'


def test_unknown_dataset_lists_the_project_builders(tmp_path):
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(name='echo_studys', builder_config='small', data_dir=str(tmp_path),
                                       manual_dir='', auto_build=False))
  with pytest.raises(ValueError) as e:
    prepare.prepare_dataset(cfg, log=lambda *_: None)
  msg = str(e.value)
  assert msg.startswith("unknown dataset 'echo_studys'") and 'echo_studies, echonet_dynamic' in msg
  assert len(msg.splitlines()) == 1
