"""`echonet_dynamic` TFDS builder: EchoNet-Dynamic apical-4-chamber videos with EF/ESV/EDV labels."""
from .echonet_dynamic_dataset_builder import Builder, EchoNetDynamicConfig, read_file_list

__all__ = ['Builder', 'EchoNetDynamicConfig', 'read_file_list']
