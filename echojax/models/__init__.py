"""Pure-JAX models (Flax): R3D-18 encoder, heads, torchvision import. Never imports TensorFlow."""
from echojax.models.batchnorm import BatchNorm
from echojax.models.encoder_io import (KINETICS_NORMALIZATION, encoder_from_spec, load_encoder,
                                       make_encoder_spec, read_encoder, save_encoder)
from echojax.models.heads import (Classifier, ClassifierHead, FrameOrderHead, ProjectionHead,
                                  SSLModel)
from echojax.models.resnet3d import (ResNet3D, encoder_param_count, encoder_variable_shapes,
                                     global_average_pool)
from echojax.models.torchvision_import import (flax_to_torchvision, load_state_dict_file,
                                               torchvision_to_flax)

__all__ = [
    'BatchNorm', 'Classifier', 'ClassifierHead', 'FrameOrderHead', 'KINETICS_NORMALIZATION',
    'ProjectionHead', 'ResNet3D', 'SSLModel', 'encoder_from_spec', 'encoder_param_count',
    'encoder_variable_shapes', 'flax_to_torchvision', 'global_average_pool', 'load_encoder',
    'load_state_dict_file', 'make_encoder_spec', 'read_encoder', 'save_encoder', 'torchvision_to_flax',
]
