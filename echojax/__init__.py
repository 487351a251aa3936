"""echojax: self-supervised echocardiogram video representations (EchoCLR) in JAX/Flax.

Layers: `echojax.data` (TensorFlow/TFDS input), `echojax.models`/`losses`/`optim`/`steps` (pure JAX),
orchestration (`main`, trainers, checkpointing, evaluation, CLIs).
"""
