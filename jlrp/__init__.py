"""jlrp: Layer-wise Relevance Propagation (LRP) for JAX and Flax.

``jlrp.explain(model, composite)`` wraps a Flax linen or NNX model so that its VJP, with the model
output masked to the explained class as cotangent, is the LRP relevance of every input feature.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

from . import (
    attribution,
    canonizers,
    composites,
    core,
    errors,
    layers,
    metrics,
    models,
    ops,
    rules,
    targets,
    text,
    types,
)
from .attribution import attribute
from .audit import audit
from .explain import explain

try:
    __version__ = _version("jlrp")
except PackageNotFoundError:  # a source checkout that was never installed
    __version__ = "0.0.0+unknown"

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
    "targets",
    "text",
    "types",
    "__version__",
]
