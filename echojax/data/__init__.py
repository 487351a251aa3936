"""Data layer: the only part of echojax that imports TensorFlow (TFDS builders' shared schema, video
readers, DICOM conversion and the tf.data clip pipeline)."""
