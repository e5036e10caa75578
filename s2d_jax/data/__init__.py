"""tfds + tf.data input pipelines (`input_pipeline`) and the embedded demo dataset (`demo`).

Submodules are imported on first use.
"""

from s2d_jax import _lazy
_SUBMODULES = ("input_pipeline", "demo")


__getattr__, __dir__ = _lazy.attach(__name__, _SUBMODULES, globals())
