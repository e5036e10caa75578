"""s2d_jax: Selective Spectral Decay (S2D) for quantization-friendly ViTs in JAX/Flax."""

__version__ = "0.1.0"
