"""TFDS builders, one folder each (`<name>/<name>_dataset_builder.py` defining `class Builder`)."""
