"""jlrp: Layer-wise Relevance Propagation for JAX and Flax."""

__version__ = "0.1.0"
