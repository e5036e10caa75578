"""tfds + tf.data input pipelines and the embedded demo dataset."""
