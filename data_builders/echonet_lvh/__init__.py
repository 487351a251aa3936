"""`echonet_lvh` TFDS builder: EchoNet-LVH PLAX videos with their wall/cavity caliper measurements."""
from .echonet_lvh_dataset_builder import Builder, EchoNetLVHConfig, read_measurements

__all__ = ['Builder', 'EchoNetLVHConfig', 'read_measurements']
