"""`echo_studies` TFDS builder: a user's own echo studies (videos + label CSVs) as echojax records."""
from .echo_studies_dataset_builder import Builder, EchoStudiesConfig, build_echo_studies, format_summary

__all__ = ['Builder', 'EchoStudiesConfig', 'build_echo_studies', 'format_summary']
