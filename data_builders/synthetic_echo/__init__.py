"""`synthetic_echo` TFDS builder: procedurally generated PLAX-like cines with an aortic-stenosis label."""
from .synthetic_echo_dataset_builder import Builder, SyntheticEchoConfig

__all__ = ['Builder', 'SyntheticEchoConfig']
