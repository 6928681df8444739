"""jlrp: Layer-wise Relevance Propagation (LRP) for JAX and Flax.

``jlrp.explain(model, composite)`` wraps a Flax linen or NNX model so that its VJP, with the model
output masked to the explained class as cotangent, is the LRP relevance of every input feature.
"""

from . import attribution, canonizers, composites, core, errors, layers, metrics, models, ops, rules, types
from .attribution import attribute
from .explain import audit, explain

__version__ = "0.1.0"

__all__ = [
    "explain",
    "attribute",
    "audit",
    "attribution",
    "canonizers",
    "composites",
    "core",
    "errors",
    "layers",
    "metrics",
    "models",
    "ops",
    "rules",
    "types",
    "__version__",
]
