"""Pure-JAX models (Flax): R3D-18 encoder, heads, torchvision import. Never imports TensorFlow."""
