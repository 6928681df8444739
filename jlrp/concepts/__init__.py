"""Concept relevance: relevance at any layer and of parameters, conditional heatmaps (CRP), concepts.

Concept Relevance Propagation (Achtibat et al., "From attribution maps to human-understandable
explanations through Concept Relevance Propagation", Nature Machine Intelligence 2023) answers
*what* a model uses, besides *where*: the relevance of each learned concept (a channel, a neuron, an
attention head) and its conditional heatmap, the part of the input relevance that flows through it.

- :func:`attribute`: one call with ``capture=[paths]`` (relevance and activation at any module or op
  output), ``params=[paths]`` (parameter relevance) and ``conditions={path: masks}`` (one conditional
  heatmap per mask, ``vmap``-ed over one forward pass).
- :class:`ChannelConcept`, :class:`HeadConcept`: masks for channels and heads, concept relevance, top-k.
- :func:`attribution_graph`: the lower-layer concepts that contribute most to a concept, layer by layer.
- :func:`references`: the reference samples of each channel over a data set (relevance and activation
  maximisation) with receptive-field boxes; :class:`ReferenceSamples` (``.save``/``.load``) and
  :func:`save_grids` (one PNG per concept).
"""

from ._concept import ChannelConcept, HeadConcept
from ._graph import AttributionGraph, GraphEdge, GraphNode, attribution_graph
from ._references import LayerReferences, ReferenceSamples, layer_dirname, references, save_grids
from ._relevance import ConceptAttribution, attribute, tap_points

__all__ = [
    "attribute",
    "tap_points",
    "ConceptAttribution",
    "ChannelConcept",
    "HeadConcept",
    "attribution_graph",
    "AttributionGraph",
    "GraphNode",
    "GraphEdge",
    "references",
    "ReferenceSamples",
    "LayerReferences",
    "save_grids",
    "layer_dirname",
]
